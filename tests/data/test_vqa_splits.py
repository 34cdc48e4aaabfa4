"""ViLBERT's composed VQA splits (`vilbert/datasets/vqa_dataset.py:_load_dataset`): trainval = train + val but the last
N by question id, minval = those last N. Checked against the rule computed here from the files themselves."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from vl.data.scenes import SceneSettings, ensure_corpus
from vl.errors import DataError

QUESTIONS = "vqa/v2_OpenEnded_mscoco_{}2014_questions.json"
TARGETS = "vqa/cache/{}_target.pkl"


@pytest.fixture
def corpus(tmp_path: Path, data_dir: Path) -> Path:
    """A writable copy of the embedded corpus whose val questions file is shuffled (the rule sorts by id first)."""
    dst = tmp_path / "corpus"
    shutil.copytree(ensure_corpus(data_dir, SceneSettings(num_images=150), "all"), dst)
    path = dst / QUESTIONS.format("val")
    data = json.loads(path.read_text())
    random.Random(0).shuffle(data["questions"])
    path.write_text(json.dumps(data))
    return dst


def _module(make_cfg, root: Path, *overrides: str):
    cfg = make_cfg("experiment=none", "data=vqa", f"data.root={root}", *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _seed_split(root: Path, name: str, held_out: int) -> list[dict]:
    """The seed's `_load_dataset(name)`: (question, target) pairs of each file sorted by question id, then sliced."""

    def load(file_split: str) -> list[tuple[dict, dict]]:
        questions = json.loads((root / QUESTIONS.format(file_split)).read_text())["questions"]
        with open(root / TARGETS.format(file_split), "rb") as f:
            answers = pickle.load(f)
        questions = sorted(questions, key=lambda x: x["question_id"])
        answers = sorted(answers, key=lambda x: x["question_id"])
        assert [q["question_id"] for q in questions] == [a["question_id"] for a in answers]
        return list(zip(questions, answers))

    if name == "trainval":
        return load("train") + load("val")[:-held_out]
    return load("val")[-held_out:]


@pytest.mark.parametrize("held_out", [7, 30, 1000])  # 1000: more than val holds (the seed: all of val)
def test_trainval_and_minval_are_the_seeds_slices(make_cfg, corpus: Path, held_out: int) -> None:
    dm = _module(
        make_cfg, corpus, "+data.splits.train=trainval", "+data.splits.val=minval", f"data.minval_size={held_out}"
    )
    for role, name in (("train", "trainval"), ("val", "minval")):
        expected = _seed_split(corpus, name, held_out)
        data = dm.datasets[role]
        assert [q["question_id"] for q in data.questions] == [q["question_id"] for q, _ in expected]
        for i, (q, a) in enumerate(expected):
            item = data[i]
            assert item["text"] == q["question"] and item["image_id"] == q["image_id"]
            dense = [0.0] * data.num_answers
            for label, score in zip(a["labels"], a["scores"]):
                dense[label] = score
            assert item["vqa_target"].tolist() == pytest.approx(dense)
    val_ids = {q["question_id"] for q in json.loads((corpus / QUESTIONS.format("val")).read_text())["questions"]}
    train_ids = {q["question_id"] for q in dm.datasets["train"].questions}
    minval_ids = {q["question_id"] for q in dm.datasets["val"].questions}
    assert len(minval_ids) == min(held_out, len(val_ids)) and not train_ids & minval_ids and minval_ids <= val_ids
    assert len(train_ids & val_ids) == len(val_ids) - len(minval_ids)


def test_plain_splits_are_unchanged(make_cfg, corpus: Path) -> None:
    dm = _module(make_cfg, corpus)
    val = json.loads((corpus / QUESTIONS.format("val")).read_text())["questions"]
    assert [q["question_id"] for q in dm.datasets["val"].questions] == [q["question_id"] for q in val]


def test_minval_size_is_checked_and_a_missing_val_file_named(make_cfg, corpus: Path) -> None:
    with pytest.raises(InstantiationException, match="data.minval_size=-1"):  # ConfigError, through Hydra
        _module(make_cfg, corpus, "+data.splits.val=minval", "data.minval_size=-1")
    (corpus / TARGETS.format("val")).unlink()
    with pytest.raises(DataError, match="val_target.pkl: file not found"):
        _module(make_cfg, corpus, "+data.splits.train=trainval", "+data.splits.val=minval")
