"""`data=clip_vil_vqa` on an unlabelled test split: LXMERT's official `vqa/test.json` (test-dev / test-std) has no
"label" in any row. Its examples carry no target, the test stage (train's and `evaluate.py`'s) writes the EvalAI file
`vqa_predictions.json` for every question and no accuracy, loss or baseline; a file with some rows labelled, or an
unlabelled file named for training, fails in one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.conftest import compose_cfg
from tests.test_model_modes import _SMALL_CLIP_VIL
from vl.data.scenes import SceneSettings, ensure_corpus
from vl.data.scenes.writers.images import ensure_image_corpus
from vl.errors import DataError
from vl.pipeline import evaluate, train

SETTINGS = SceneSettings(num_images=36)
#: a tiny fit from pixels: the point is the test stage, not accuracy
QUICK = (
    "experiment=none",
    "data=clip_vil_vqa",
    "data.train_splits=[train]",  # the embedded corpus writes no nominival
    "model=clip_vil_tiny",
    *_SMALL_CLIP_VIL,
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "data.batch_size=8",
    "data.batch_size_per_device=8",
)


def _read(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The embedded pixel corpus as a `data.root` in the seed's layout, with `vqa/test.json` as LXMERT releases it
    (the embedded test questions, no "label" key) and `vqa/labelled.json` = the same questions with their labels;
    `mixed.json`: one row without a label; `orphan.json`: unlabelled, one question on an image the size file lacks."""
    pixels = ensure_image_corpus(ensure_corpus(data_dir, SETTINGS), SETTINGS)
    root = tmp_path_factory.mktemp("clip-vil-test-split") / "data"
    (root / "vqa").mkdir(parents=True)
    for entry in pixels.iterdir():
        if entry.name != "vqa":
            (root / entry.name).symlink_to(entry)
    for f in (pixels / "vqa").iterdir():
        if f.name != "test.json":
            (root / "vqa" / f.name).symlink_to(f)
    labelled = _read(pixels / "vqa" / "test.json")
    unlabelled = [{k: v for k, v in q.items() if k != "label"} for q in labelled]
    (root / "vqa" / "labelled.json").write_text(json.dumps(labelled))
    (root / "vqa" / "test.json").write_text(json.dumps(unlabelled))
    (root / "vqa" / "mixed.json").write_text(json.dumps([labelled[0], unlabelled[1], *labelled[2:]]))
    orphan = {**unlabelled[0], "question_id": 99_999_001, "img_id": "COCO_test2015_000000999999"}
    (root / "vqa" / "orphan.json").write_text(json.dumps([*unlabelled, orphan]))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, corpus: Path) -> tuple[Path, dict[str, float]]:
    """A tiny fit whose own test stage is the default `data.splits.test=test`: the unlabelled file."""
    out = tmp_path_factory.mktemp("clip-vil-test-split-run")
    cfg = compose_cfg((*QUICK, f"data.root={corpus}"), output_dir=out, data_dir=data_dir)
    metrics, _ = train(cfg)
    return out, metrics


def _answers(path: Path) -> dict[int, str]:
    rows = _read(path)
    assert all(set(row) == {"question_id", "answer"} for row in rows)
    answers = {row["question_id"]: row["answer"] for row in rows}
    assert len(answers) == len(rows)  # one row per question
    return answers


def _evaluate(make_cfg, ckpt: Path, name: str, *overrides: str) -> tuple[dict[str, float], Path]:
    cfg = make_cfg(f"ckpt_path={ckpt}", *overrides, name=name, config_name="evaluate", tiny=False)
    return evaluate(cfg), Path(cfg.paths.output_dir)


def test_train_test_stage_writes_every_answer_and_no_metric(corpus: Path, run) -> None:
    out, metrics = run
    assert "val/vqa_acc" in metrics and "val/loss" in metrics  # validation (minival) is labelled
    # no accuracy, loss or baseline; only the loader's own count of unreadable images
    assert [k for k in metrics if k.startswith("test/")] == ["test/images_skipped"], metrics
    assert not any(key in (out / "results.md").read_text() for key in ("test/vqa", "test/loss"))
    ids = [q["question_id"] for q in _read(corpus / "vqa" / "test.json")]
    answers = _answers(out / "vqa_predictions.json")
    assert sorted(answers) == sorted(ids)
    assert set(answers.values()) <= set(_read(corpus / "vqa" / "trainval_label2ans.json"))


def test_evaluate_answers_equal_the_labelled_paths(make_cfg, corpus: Path, run) -> None:
    """The same checkpoint on the unlabelled file and on its questions with their labels: the same answers; only
    the labelled one is scored."""
    out, _ = run
    ckpt = out / "checkpoints" / "last.ckpt"
    test_metrics, test_dir = _evaluate(make_cfg, ckpt, "unlabelled")
    assert test_metrics == {"test/images_skipped": 0.0} and "vqa_acc" not in (test_dir / "results.md").read_text()
    unlabelled = _answers(test_dir / "vqa_predictions.json")
    assert sorted(unlabelled) == sorted(q["question_id"] for q in _read(corpus / "vqa" / "test.json"))
    assert unlabelled == _answers(out / "vqa_predictions.json")  # train's own test stage, same weights
    scored, labelled_dir = _evaluate(make_cfg, ckpt, "labelled", "+overrides.data.splits.test=labelled")
    assert {"test/vqa_acc", "test/loss", "test/vqa_acc_prior", "test/vqa_acc_chance"} <= set(scored)
    assert _answers(labelled_dir / "vqa_predictions.json") == unlabelled

    # and each is label2ans of the argmax of the checkpoint's logits for its question (`vl.load`'s model, `infer`)
    from vl import load

    predictor = load(ckpt)
    label2ans = predictor.dm.label2ans
    by_logits = {}
    for batch in predictor.dm.test_dataloader():
        best = predictor.model.infer(batch)["vqa_logits"].argmax(-1)
        by_logits |= {int(q): label2ans[int(i)] for q, i in zip(batch["question_id"], best)}
    assert by_logits == unlabelled


def _module(make_cfg, root: Path, *overrides: str):
    cfg = make_cfg("experiment=none", "data=clip_vil_vqa", "data.train_splits=[train]", f"data.root={root}", *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    return dm


def test_unlabelled_examples_records_and_batches_have_no_target(make_cfg, corpus: Path) -> None:
    dm = _module(make_cfg, corpus, "data.transform_options.min_size=32", "data.transform_options.max_size=48")
    dm.setup("test")
    data = dm.datasets["test"]
    assert not dm.labelled("test") and not data.labelled
    assert [q["question_id"] for q in data.questions] == [q["question_id"] for q in _read(corpus / "vqa/test.json")]
    example = data[0]
    assert "vqa_target" not in example and example["pixels"].ndim == 3
    finished = data.finish(data.record(0), 0)  # the streaming path: a record, then its finish
    assert "vqa_target" not in finished and finished["question_id"] == example["question_id"]
    batch = dm.collator("test")([data[i] for i in range(4)])
    assert "vqa_targets" not in batch
    assert batch["question_id"].tolist() == [q["question_id"] for q in data.questions[:4]]
    assert dm.baselines("test") == {}
    labelled = _module(make_cfg, corpus, "+data.splits.test=labelled")
    labelled.setup("test")
    assert labelled.labelled("test") and "vqa_target" in labelled.datasets["test"][0]
    assert labelled.baselines("test").keys() == {"test/vqa_acc_chance", "test/vqa_acc_prior"}


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message and all(part in message for part in parts), message


def test_mixed_files_and_unlabelled_training_files_fail_in_one_line(make_cfg, tmp_path: Path, corpus: Path) -> None:
    mixed = str(corpus / "vqa" / "mixed.json")
    second = _read(corpus / "vqa" / "test.json")[1]["question_id"]
    with pytest.raises(DataError) as err:  # at prepare_data: before any model is built or trained
        _module(make_cfg, corpus, "+data.splits.test=mixed")
    _one_line(err, mixed, f"question {second} has no 'label'")
    with pytest.raises(DataError) as err:  # through train.py: before the fit writes anything
        train(make_cfg(*QUICK, f"data.root={corpus}", "+data.splits.test=mixed", name="mixed"))
    _one_line(err, mixed, f"question {second} ")
    assert not (tmp_path / "mixed" / "checkpoints").exists()

    test = str(corpus / "vqa" / "test.json")
    dm = _module(make_cfg, corpus, "data.train_splits=[train,test]")
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    _one_line(err, test, "no question has a 'label'", "data.train_splits names 'test'", "training needs answers")
    with pytest.raises(DataError) as err:
        _module(make_cfg, corpus, "+data.splits.val=test").setup("fit")
    _one_line(err, test, "data.splits.val names 'test'")

    with pytest.raises(DataError) as err:  # a submission answers every question: none is dropped silently
        _module(make_cfg, corpus, "+data.splits.test=orphan")
    _one_line(err, str(corpus / "vqa" / "orphan.json"), "99999001", "mscoco/test2015/COCO_test2015_000000999999.jpg")
