"""The official unlabelled VQA v2 test splits (`data.split_files`, `vl.data.vqa.OFFICIAL_SPLIT_FILES`): test2015 /
test-dev2015 questions files without targets, their images in their own region-feature LMDB (the seed's
`COCO_test_*.lmdb` next to the trainval one). The test stage (train's and `evaluate.py`'s) writes the EvalAI file
`vqa_predictions.json` for every question and no accuracy, loss or baseline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from tests.conftest import compose_cfg
from vl.data.features import open_region_features
from vl.data.features.convert import reader_records
from vl.data.features.region_lmdb import write_region_lmdb
from vl.data.scenes import SceneSettings, ensure_corpus
from vl.errors import DataError
from vl.pipeline import evaluate, train

QUESTIONS = "vqa/v2_OpenEnded_mscoco_{}_questions.json"
TEST_FEATURES = "coco/COCO_test_resnext152_faster_rcnn_genome.lmdb"
#: the test images' ids in their own LMDB: absent from the trainval features, so reading them proves the override
SHIFT = 10_000_000
#: a tiny fit: the point is the test stage, not accuracy
QUICK = (
    "experiment=none",
    "data=vqa",
    "model=visual_bert_tiny",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "data.batch_size=16",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The embedded corpus's VQA files + features, plus test2015 = its labelled test questions on images renumbered
    into a test-image LMDB (no targets), and test-dev2015 = every other one of them."""
    src = ensure_corpus(data_dir, SceneSettings(num_images=150), "all")
    dst = tmp_path_factory.mktemp("vqa-test-split") / "corpus"
    shutil.copytree(src / "vqa", dst / "vqa")
    shutil.copytree(src / "regions.lmdb", dst / "regions.lmdb")
    labelled = json.loads((dst / QUESTIONS.format("test2014")).read_text())
    test = [{**q, "image_id": q["image_id"] + SHIFT} for q in labelled["questions"]]
    images = {q["image_id"] for q in labelled["questions"]}
    (dst / QUESTIONS.format("test2015")).write_text(json.dumps({**labelled, "questions": test}))
    (dst / QUESTIONS.format("test-dev2015")).write_text(json.dumps({**labelled, "questions": test[::2]}))
    records = [r for r in reader_records(open_region_features(dst / "regions.lmdb")) if int(r["image_id"]) in images]
    write_region_lmdb(dst / TEST_FEATURES, ({**r, "image_id": int(r["image_id"]) + SHIFT} for r in records))
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, corpus: Path) -> tuple[Path, dict[str, float], Path]:
    """A tiny fit whose own test stage is test2015 (train's path: metrics, loggers, results.md). `visual_bert_tiny`
    (mean pooling, wide init): after two steps its answers already differ between questions, so that answers
    following each question's own logits is checked (the default tiny model answers one word to all)."""
    out = tmp_path_factory.mktemp("vqa-test-split-run")
    cfg = compose_cfg(
        (
            *QUICK,
            f"data.root={corpus}",
            "+data.splits.test=test2015",
            f"data.split_files.test2015.features={TEST_FEATURES}",
        ),
        output_dir=out,
        data_dir=data_dir,
    )
    metrics, _ = train(cfg)
    return out, metrics, out / "checkpoints" / "last.ckpt"


def _questions(corpus: Path, split: str) -> list[dict]:
    return json.loads((corpus / QUESTIONS.format(split)).read_text())["questions"]


def _evaluate(make_cfg, ckpt: Path, name: str, *overrides: str) -> tuple[dict[str, float], Path]:
    cfg = make_cfg(f"ckpt_path={ckpt}", *overrides, name=name, config_name="evaluate", tiny=False)
    return evaluate(cfg), Path(cfg.paths.output_dir)


def _answers(path: Path) -> dict[int, str]:
    rows = json.loads(path.read_text())
    assert all(set(row) == {"question_id", "answer"} for row in rows)
    answers = {row["question_id"]: row["answer"] for row in rows}
    assert len(answers) == len(rows)  # one row per question
    return answers


TEST2015 = ("+overrides.data.splits.test=test2015", f"+overrides.data.split_files.test2015.features={TEST_FEATURES}")


def test_unlabelled_test_splits_write_the_evalai_file_and_no_metric(make_cfg, corpus: Path, run) -> None:
    out, metrics, ckpt = run
    assert not [k for k in metrics if k.startswith("test/")], metrics  # no accuracy, loss or baseline: no labels
    assert "test/" not in (out / "results.md").read_text()
    ids = sorted(q["question_id"] for q in _questions(corpus, "test2015"))
    assert sorted(_answers(out / "vqa_predictions.json")) == ids

    test_metrics, test_dir = _evaluate(make_cfg, ckpt, "test2015", *TEST2015)
    assert test_metrics == {} and "vqa_acc" not in (test_dir / "results.md").read_text()
    test2015 = _answers(test_dir / "vqa_predictions.json")
    assert sorted(test2015) == ids
    assert set(test2015.values()) <= set(json.loads((corpus / "vqa/trainval_label2ans.json").read_text()))
    assert len(set(test2015.values())) >= 3
    # the labelled test split: the same questions on the same (renumbered) features, scored
    labelled_metrics, labelled_dir = _evaluate(make_cfg, ckpt, "labelled", "+overrides.data.splits.test=test")
    assert "test/vqa_acc" in labelled_metrics and "test/vqa_acc_prior" in labelled_metrics
    assert _answers(labelled_dir / "vqa_predictions.json") == test2015

    dev_metrics, dev_dir = _evaluate(
        make_cfg,
        ckpt,
        "dev",
        "+overrides.data.splits.test=test-dev2015",
        f"+overrides.data.split_files.test-dev2015.features={TEST_FEATURES}",
    )
    assert dev_metrics == {}
    dev = _answers(dev_dir / "vqa_predictions.json")
    assert sorted(dev) == sorted(q["question_id"] for q in _questions(corpus, "test-dev2015"))
    assert dev == {q: test2015[q] for q in dev}


def test_answers_are_the_argmax_of_the_models_logits(make_cfg, corpus: Path, run) -> None:
    """Four test2015 questions through `vl.load` (its own batching; the test LMDB's features given as arrays)."""
    from vl import load

    _, _, ckpt = run
    _, test_dir = _evaluate(make_cfg, ckpt, "test2015", *TEST2015)
    written = _answers(test_dir / "vqa_predictions.json")
    model = load(ckpt)
    reader = open_region_features(corpus / TEST_FEATURES)
    questions = _questions(corpus, "test2015")[:4]
    images = [reader[str(q["image_id"])] for q in questions]
    answers = model.answer(
        [{"features": item["features"], "boxes_norm": item["boxes_norm"]} for item in images],
        [q["question"] for q in questions],
        k=1,
    )
    assert [written[q["question_id"]] for q in questions] == [a[0][0] for a in answers]


def _module(make_cfg, root: Path, *overrides: str):
    cfg = make_cfg("experiment=none", "data=vqa", f"data.root={root}", *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    return dm


def test_unlabelled_examples_have_no_target(make_cfg, corpus: Path) -> None:
    dm = _module(make_cfg, corpus, "+data.splits.test=test2015", f"data.split_files.test2015.features={TEST_FEATURES}")
    dm.setup("test")
    data = dm.datasets["test"]
    assert not data.labelled and len(data) == len(_questions(corpus, "test2015"))
    example = data[0]
    assert "vqa_target" not in example and example["visual"]["features"].shape[0] > 0
    batch = dm.collator("test")([data[i] for i in range(4)])
    assert "vqa_targets" not in batch and batch["question_id"].tolist() == [
        q["question_id"] for q in data.questions[:4]
    ]
    assert dm.baselines("test") == {}
    labelled = _module(make_cfg, corpus)  # the default test split still reads its targets
    labelled.setup("test")
    assert labelled.datasets["test"].labelled and "vqa_target" in labelled.datasets["test"][0]


def test_missing_or_wrong_files_are_named_before_compute(make_cfg, corpus: Path) -> None:
    dev = _module(make_cfg, corpus, "+data.splits.test=test-dev2015")  # the official file name; no targets file
    assert corpus / QUESTIONS.format("test-dev2015") in dev.required_files()
    assert not [p for p in dev.required_files() if "test-dev2015" in p.name and p.name.endswith(".pkl")]
    with pytest.raises(DataError, match=r"vqa/missing\.json: file not found"):
        _module(
            make_cfg,
            corpus,
            "+data.splits.test=test-dev2015",
            "data.split_files.test-dev2015.questions=vqa/missing.json",
        )
    with pytest.raises(DataError, match=r"nowhere\.lmdb: file not found"):  # the test images' features, named
        _module(make_cfg, corpus, "+data.splits.test=test2015", "data.split_files.test2015.features=nowhere.lmdb")
    # without the override the test images are looked up in the trainval features, and are not there
    first = _questions(corpus, "test2015")[0]["image_id"]
    with pytest.raises(DataError, match=rf"regions\.lmdb: no region features for image id {first} "):
        _module(make_cfg, corpus, "+data.splits.test=test2015").setup("test")
    # a split outside `split_files` is read through the templates: the error says how to name its own file
    with pytest.raises(DataError, match=r"test20162014_questions\.json: file not found.*data\.split_files\.test2016"):
        _module(make_cfg, corpus, "+data.splits.test=test2016")
    with pytest.raises(InstantiationException, match=r"data\.split_files\.test2015\.feature: unknown key"):
        _module(make_cfg, corpus, "+data.split_files.test2015.feature=x.lmdb")
    with pytest.raises(InstantiationException, match=r"data\.splits\.val=test-dev2015: .* only data\.splits\.test"):
        _module(make_cfg, corpus, "+data.splits.val=test-dev2015")


def test_a_labelled_question_without_a_target_entry_is_named(make_cfg, corpus: Path) -> None:
    """The seed's reader asserts that questions and targets line up; a targets file missing a question's entry would
    otherwise train and score that question against an all-zero target."""
    from vl.data.formats.vqa import load_targets

    entries = load_targets(corpus / "vqa/cache/val_target.pkl")
    first = _questions(corpus, "val2014")[0]["question_id"]
    kept = [e for e in entries if int(e["question_id"]) != first]
    assert len(kept) == len(entries) - 1
    (corpus / "vqa/cache/val_target_gap.json").write_text(json.dumps(kept))
    dm = _module(make_cfg, corpus, "+data.split_files.val.targets=vqa/cache/val_target_gap.json")
    with pytest.raises(DataError, match=rf"val_target_gap\.json: no target entry for question {first} of .*val"):
        dm.setup("fit")


def test_a_target_on_another_image_than_its_question_is_named(make_cfg, corpus: Path) -> None:
    """The seed's reader asserts each target's image id is its question's."""
    from vl.data.formats.vqa import load_targets

    entries = load_targets(corpus / "vqa/cache/val_target.pkl")
    first = _questions(corpus, "val2014")[0]
    moved = [{**e, "image_id": e["image_id"] + 1} if e["question_id"] == first["question_id"] else e for e in entries]
    (corpus / "vqa/cache/val_target_moved.json").write_text(json.dumps(moved))
    dm = _module(make_cfg, corpus, "+data.split_files.val.targets=vqa/cache/val_target_moved.json")
    with pytest.raises(
        DataError,
        match=rf"val_target_moved\.json: question {first['question_id']} is on image {first['image_id'] + 1} there",
    ):
        dm.setup("fit")
