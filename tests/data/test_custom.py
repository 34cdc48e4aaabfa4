"""`data=custom`: a JSONL + a feature file, no code; derived vocabulary / splits written next to the data; every
problem named by file and line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_cfg
from vl.build import build_datamodule
from vl.data.features.region_lmdb import write_region_lmdb
from vl.errors import DataError
from vl.pipeline import train

COLOURS = ("red", "green", "blue")


def _features(root: Path, dims: dict[str, int] | None = None) -> None:
    """Ten images `img000`..`img009` with 2 regions; feature dimension 8 (or `dims[id]`)."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(10):
        sid = f"img{i:03d}"
        d = (dims or {}).get(sid, 8)
        feats = rng.normal(size=(2, d)).astype(np.float32)
        feats[:, 0] = i % 3  # the colour is in the features
        boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], dtype=np.float32)
        records.append({"image_id": sid, "image_h": 32, "image_w": 32, "boxes": boxes, "features": feats})
    write_region_lmdb(root / "regions.lmdb", records)


def _lines(n: int = 30, split: bool = True) -> list[dict]:
    out = []
    for k in range(n):
        i = k % 10
        row = {"image_id": f"img{i:03d}", "text": "what colour is it?", "answers": [COLOURS[i % 3]] * 2 + ["grey"]}
        if split:
            row["split"] = "train" if k < 20 else "val" if k < 25 else "test"
        out.append(row)
    out[0]["answers"] = ["purple"]  # on one train line only
    return out


def _write(root: Path, rows: list) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "data.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(root: Path, tmp_path: Path, data_dir: Path, *extra: str):
    return compose_cfg(
        ["experiment=none", "data=custom", f"data.root={root}", "trainer.max_epochs=1", *extra],
        output_dir=tmp_path / "run",
        data_dir=data_dir,
    )


def test_custom_vqa_trains_and_writes_derived_files(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    rows = _lines()
    _write(root, rows)
    _features(root)
    metrics, _ = train(_cfg(root, tmp_path, data_dir, "data.min_answer_count=2"))
    assert 0.0 <= metrics["test/vqa_acc"] <= 1.0
    # vocabulary: answers on >= 2 train lines, counted here from the lines themselves
    counts = Counter(a for r in rows if r["split"] == "train" for a in set(r["answers"]))
    assert json.loads((root / "data.vl" / "answers.json").read_text()) == sorted(a for a, c in counts.items() if c >= 2)
    splits = json.loads((root / "data.vl" / "splits.json").read_text())
    assert splits["test"] == [26, 27, 28, 29, 30]  # file line numbers
    assert json.loads((root / "data.vl" / "info.json").read_text())["visual_dim"] == 8


def test_a_seeded_split_when_the_file_has_none(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    _write(root, _lines(split=False))
    _features(root)
    dm = build_datamodule(_cfg(root, tmp_path, data_dir))
    lines = dm.lines()
    numbers = sorted(r["line"] for s in lines.values() for r in s)
    assert numbers == list(range(1, 31)) and [len(lines[s]) for s in ("train", "val", "test")] == [24, 3, 3]
    again = build_datamodule(_cfg(root, tmp_path, data_dir)).lines()
    assert [r["line"] for r in again["test"]] == [r["line"] for r in lines["test"]]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"image_id": "img999", "text": "q", "answers": ["a"]}, "data.jsonl:3: image id 'img999' has no features in"),
        ({"image_id": "img001", "text": " ", "answers": ["a"]}, "data.jsonl:3: empty or missing 'text'"),
        ({"image_id": "img001", "text": "q", "anwsers": ["a"]}, "data.jsonl:3: unknown field 'anwsers' .*'answers'"),
        ({"image_id": "img001", "text": "q"}, r"data.jsonl:3: no 'answers' \(data.objectives has 'vqa'\)"),
        ('{"image_id": "img001", "text": ', "data.jsonl:3: not JSON"),
        ({"image_id": "img001", "text": "q", "answers": ["a"], "split": "dev"}, "data.jsonl:3: split 'dev'"),
    ],
)
def test_every_problem_names_file_and_line(bad, message: str, tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    rows = _lines(split=False)
    rows[2] = bad
    _write(root, rows)
    _features(root)
    with pytest.raises(DataError, match=message):
        build_datamodule(_cfg(root, tmp_path, data_dir))


def test_mixed_feature_dimensions_name_the_lines(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    _write(root, _lines(split=False))
    _features(root, dims={"img004": 6})
    with pytest.raises(DataError, match=r"data.jsonl:5: image id 'img004' has 6-d features, line 1's image has 8-d"):
        build_datamodule(_cfg(root, tmp_path, data_dir))


def test_custom_captions_pretraining_with_the_files_labels(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    rows = [
        {"image_id": f"img{k % 10:03d}", "text": f"a {COLOURS[(k + k % 2) % 3]} shape", "label": 1 - k % 2}
        for k in range(30)
    ]
    _write(root, rows)
    _features(root)
    cfg = _cfg(root, tmp_path, data_dir, "data.objectives=[mlm,itm]", "data.monitor=val/itm_acc")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    train_lines = dm.lines()["train"]
    assert [dm.datasets["train"][i]["itm_label"] for i in range(len(train_lines))] == [r["label"] for r in train_lines]
    metrics, _ = train(cfg)
    assert {"test/itm_acc", "test/mlm_acc"} <= set(metrics)
    rows[4]["label"] = 2
    _write(root, rows)
    with pytest.raises(DataError, match="data.jsonl:5: 'label' 2 is not 0 or 1"):
        build_datamodule(cfg)
