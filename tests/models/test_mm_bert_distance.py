"""MM-BERT's cosine-distance translation retrieval (`evaluate.py task=distance_translation`, vl/eval/distance.py):
the scores against a transcription of the seed's `retrieval/evaluate_distance.py`, the seed's result files, and an
end-to-end evaluation of a (3-step) MM-BERT checkpoint with and without vision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from tests.conftest import save_run_config
from vl.errors import ConfigError
from vl.eval.distance import distance_recalls
from vl.pipeline import evaluate, train

CPU = ("callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false")


def seed_evaluate_distance(outputs_en: np.ndarray, outputs_de: np.ndarray) -> dict[str, float]:
    """phaedonmit/VL-BERT `retrieval/evaluate_distance.py` Steps 3-4 (its printed percentages, as fractions)."""
    x, y = outputs_en, outputs_de
    cos = (x @ y.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1))
    out = {}
    for name, scores in (("de", cos), ("en", cos.T)):  # "German Caption retrieval", then "English Caption retrieval"
        cos_sorted = np.argsort(scores, axis=1)[:, ::-1]
        answers = np.arange(scores.shape[0])
        for rank in [1, 5, 10]:
            total_correct = 0
            for position in range(rank):
                total_correct += np.sum(cos_sorted[:, position] == answers)
            out[f"{name}@{rank}"] = total_correct / scores.shape[0]
    return out


def seed_file_vectors(path: Path) -> np.ndarray:
    """Step 1-2 of `evaluate_distance.py`: the result file's `logit` lists as a float64 array."""
    data = json.loads(path.read_text())
    outputs = np.zeros((len(data), len(data[0]["logit"])))
    for ind, p in enumerate(data):
        outputs[ind] = np.array(p["logit"])
    return outputs


@pytest.mark.parametrize("n", [10, 23, 40])  # the seed's script needs N >= 10
def test_distance_recalls_are_the_seeds(n: int) -> None:
    rng = np.random.default_rng(n)
    en = rng.standard_normal((n, 16)).astype(np.float32)
    de = en + rng.standard_normal((n, 16)).astype(np.float32) * 1.5  # partly aligned: recalls between 0 and 1
    got = distance_recalls(en, de, prefix="val")
    want = seed_evaluate_distance(en.astype(np.float64), de.astype(np.float64))
    for key, value in want.items():
        lang, k = key.split("@")
        assert got[f"val/distance_{lang}_recall@{k}"] == pytest.approx(value, abs=1e-12), key
        assert got[f"val/distance_{lang}_recall@{k}_chance"] == pytest.approx(min(int(k), n) / n)
    assert got["val/distance_de_recall@1"] <= got["val/distance_de_recall@5"] <= got["val/distance_de_recall@10"]
    with pytest.raises(ValueError, match="must both be"):
        distance_recalls(en, de[:, :3])
    small = distance_recalls(en[:3], de[:3])  # fewer lines than k: R@k counts every position, chance 1
    assert small["test/distance_de_recall@5"] == small["test/distance_de_recall@5_chance"] == 1.0


@pytest.fixture(scope="module")
def mm_bert_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    from tests.conftest import trained_run

    out = tmp_path_factory.mktemp("mm_bert_distance")
    overrides = ["experiment=mm_bert_pretrain_tiny", "trainer.max_steps=3", "trainer.max_epochs=1", *CPU]
    cfg, _ = trained_run(overrides, output_dir=out / "run", data_dir=data_dir)
    return cfg, Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", out


def _evaluate(mm_bert_run, data_dir: Path, name: str, *overrides: str) -> tuple[dict[str, float], Path]:
    from tests.conftest import compose_cfg

    _, ckpt, out = mm_bert_run
    ev = compose_cfg(
        [f"ckpt_path={ckpt}", "task=distance_translation", *overrides],
        output_dir=out / name,
        data_dir=data_dir,
        config_name="evaluate",
        tiny=False,
    )
    return evaluate(ev), Path(ev.paths.output_dir)


@pytest.mark.parametrize("vision", [False, True])
def test_distance_translation_of_an_mm_bert_checkpoint(mm_bert_run, data_dir: Path, vision: bool) -> None:
    """The seed's two result files (one [CLS] vector per line and language), and metrics that the seed's evaluation
    script computes from those files; with vision every EN i / DE i row pair shares line i's image."""
    cfg = mm_bert_run[0]
    metrics, out = _evaluate(mm_bert_run, data_dir, f"ev_{vision}", f"task.vision={str(vision).lower()}")
    en, de = (seed_file_vectors(out / f"distance_{lang}_test.json") for lang in ("en", "de"))
    n = len(json.loads((out / "distance_en_test.json").read_text()))
    hidden = int(cfg.model.encoder.text_encoder.hidden_size)
    assert en.shape == de.shape == (n, hidden) and n > 10
    rows = json.loads((out / "distance_de_test.json").read_text())
    assert [(r["caption_en_index"], r["caption_de_index"]) for r in rows] == [(i, i) for i in range(n)]
    want = seed_evaluate_distance(en, de)
    for key, value in want.items():
        lang, k = key.split("@")
        assert metrics[f"test/distance_{lang}_recall@{k}"] == pytest.approx(value, abs=1e-9), key
    assert metrics["test/distance_de_recall@1_chance"] == pytest.approx(1 / n)
    if vision:  # the image changes each vector (the no-vision files are the other parametrisation's)
        plain = seed_file_vectors(out.parent / "ev_False" / "distance_en_test.json")
        assert not np.allclose(plain, en)


def test_distance_translation_needs_an_mm_bert_run(tmp_path: Path, make_cfg, data_dir: Path) -> None:
    cfg = make_cfg("experiment=none", "data=vqa", "trainer.max_steps=1", "trainer.max_epochs=1", *CPU)
    train(cfg)
    save_run_config(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ev = make_cfg(f"ckpt_path={ckpt}", "task=distance_translation", name="ev", config_name="evaluate", tiny=False)
    with open_dict(ev):
        ev.task.batch_size = 8
    with pytest.raises(ConfigError, match="Multi30k corpus"):
        evaluate(ev)
