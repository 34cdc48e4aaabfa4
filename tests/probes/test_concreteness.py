"""The concreteness probe's arithmetic against independent computations (PCA by eigen-decomposition, Pearson r by its
formula), its input readers (the seed's .npy layout, CSV) with their errors, the embedded default's words, and the
report files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vl.errors import DataError
from vl.eval.probes.concreteness import (
    concreteness_correlations,
    embedded_words,
    load_csv_inputs,
    load_npy_inputs,
    pc1,
    write_report,
)


def _pearson(a, b) -> float:
    a, b = np.asarray(a, float) - np.mean(a), np.asarray(b, float) - np.mean(b)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_pc1_and_correlations_by_independent_formulas() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1])
    cov = np.cov(x.T)
    vals, vecs = np.linalg.eigh(cov)
    axis = vecs[:, np.argmax(vals)]
    ref = (x - x.mean(0)) @ axis
    got = pc1(x)
    assert np.allclose(np.abs(got), np.abs(ref)) and abs(_pearson(got, ref)) == pytest.approx(1.0)
    ratings = rng.normal(size=12)
    cats = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    select = np.ones(12, bool)
    select[0] = False
    res = concreteness_correlations(x, ratings, cats, select)
    word_r = abs(_pearson(ref[select], ratings[select]))
    assert res["word_r"] == pytest.approx(word_r)
    oriented = res["pc1"]
    cat_pc = [oriented[1:4].mean(), oriented[4:8].mean(), oriented[8:12].mean()]
    cat_rt = [ratings[1:4].mean(), ratings[4:8].mean(), ratings[8:12].mean()]
    assert res["category_r"] == pytest.approx(_pearson(cat_pc, cat_rt))


def test_npy_and_csv_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", np.array(["dog", "cat", "idea"]))
    np.save(tmp_path / "c.npy", np.array([["animal", "2"], ["abstract", "1"]]))
    np.save(tmp_path / "r.npy", np.array([4.9, 4.8, 1.6]))
    np.save(tmp_path / "i.npy", np.array([1, 0, 1]))
    words, cats, ratings, select = load_npy_inputs(*(tmp_path / f"{n}.npy" for n in "wcri"))
    assert words == ["dog", "cat", "idea"] and cats == ["animal", "animal", "abstract"] and select.tolist() == [1, 0, 1]
    np.save(tmp_path / "r2.npy", np.array([4.9, 4.8]))
    with pytest.raises(DataError, match=r"r2\.npy: 2 ratings for 3 words"):
        load_npy_inputs(tmp_path / "w.npy", tmp_path / "c.npy", tmp_path / "r2.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy: not a plain \.npy array"):
        load_npy_inputs(tmp_path / "obj.npy", tmp_path / "c.npy", tmp_path / "r.npy")
    (tmp_path / "x.csv").write_text("word,category,concreteness\ndog,animal,4.9\nidea,abstract,1.6\n")
    words, cats, ratings, select = load_csv_inputs(tmp_path / "x.csv")
    assert words == ["dog", "idea"] and ratings.tolist() == [4.9, 1.6] and select.all()
    (tmp_path / "bad.csv").write_text("word,concreteness\ndog,4.9\n")
    with pytest.raises(DataError, match=r"bad\.csv: needs the columns"):
        load_csv_inputs(tmp_path / "bad.csv")
    (tmp_path / "sel.csv").write_text("word,category,concreteness,common\ndog,animal,4.9,1\nidea,abstract,1.6,0\n")
    assert load_csv_inputs(tmp_path / "sel.csv")[3].tolist() == [True, False]
    (tmp_path / "nan.csv").write_text("word,category,concreteness\ndog,animal,4.9\nidea,abstract,nan\n")
    with pytest.raises(DataError, match=r"nan\.csv:3: concreteness 'nan' is not a finite number"):
        load_csv_inputs(tmp_path / "nan.csv")
    (tmp_path / "blank.csv").write_text("word,category,concreteness,common\ndog,animal,4.9,1\nidea,abstract,1.6,\n")
    with pytest.raises(DataError, match=r"blank\.csv:3: empty 'common' cell"):  # it counted as selected
        load_csv_inputs(tmp_path / "blank.csv")


def test_embedded_default_and_report(tmp_path: Path) -> None:
    words, cats, ratings, select = embedded_words()
    assert {"red", "circle", "the", "left"} <= set(words) and len(words) == len(cats) == len(ratings)
    assert ratings[words.index("circle")] > ratings[words.index("the")]
    rng = np.random.default_rng(1)
    res = concreteness_correlations(rng.normal(size=(len(words), 6)), ratings, cats, select)
    write_report(tmp_path, "m", words, cats, ratings, res)
    assert (tmp_path / "concreteness.png").stat().st_size > 1000
    assert "word-level r" in (tmp_path / "concreteness.md").read_text()
    assert len((tmp_path / "concreteness.csv").read_text().splitlines()) == len(words) + 1
