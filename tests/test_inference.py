"""Self-contained checkpoints and one-call inference: `from vl import load`, `evaluate.py mode=predict`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, compose_cfg
from vl.data.formats.vqa import load_answer_vocab, load_questions, load_targets
from vl.errors import ConfigError, DataError
from vl.pipeline import build_datamodule, evaluate, train

VQA = (
    "experiment=none",
    "data=vqa",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
)


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[object, dict[str, float], Path]:
    """A tiny VQA run (no `.hydra/` dir is written: the checkpoint alone must do)."""
    out = tmp_path_factory.mktemp("vqa-run")
    cfg = compose_cfg(VQA, output_dir=out / "run", data_dir=data_dir)
    metrics, _ = train(cfg)
    return cfg, metrics, out / "run"


def _alone(run: Path, tmp_path: Path) -> Path:
    """best.ckpt copied to a dir of its own: no run dir, no `.hydra/` beside it."""
    alone = tmp_path / "elsewhere" / "model.ckpt"
    alone.parent.mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "best.ckpt", alone)
    return alone


def _soft_accuracy(cfg, answers_per_question: dict[int, str]) -> float:
    """Soft VQA accuracy from the corpus files themselves (questions, targets, vocabulary): independent of vl's
    metric and prediction code."""
    dm = build_datamodule(cfg)
    vocab = load_answer_vocab(dm.path(dm.answers_file))
    targets = {int(t["question_id"]): t for t in load_targets(dm.path(dm.targets_file, "test"))}
    scores = []
    for qid, answer in answers_per_question.items():
        t = targets.get(qid, {"labels": [], "scores": []})
        scores.append(dict(zip((int(x) for x in t["labels"]), t["scores"])).get(vocab[answer], 0.0))
    return sum(scores) / len(scores)


def test_checkpoint_holds_its_run(vqa_run) -> None:
    cfg, _, run = vqa_run
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    record = ckpt["vl_run"]
    dm = build_datamodule(cfg)
    vocab = load_answer_vocab(dm.path(dm.answers_file))
    assert record["answers"] == sorted(vocab, key=vocab.get)  # label index -> answer string, from the file itself
    assert record["tokenizer"] == "minilm"
    assert record["config"]["model"]["encoder"]["text_encoder"]["hidden_size"] == 32
    assert "${" not in json.dumps(record["config"])  # resolved
    assert ckpt["hyper_parameters"]["init_from"] is None


def test_python_api_answers_as_well_as_the_test_stage(vqa_run, tmp_path: Path) -> None:
    from vl import load

    cfg, metrics, run = vqa_run
    model = load(_alone(run, tmp_path), batch_size=16)
    dm = build_datamodule(cfg)
    questions = load_questions(dm.path(dm.questions_file, "test"))
    top = model.answer([q["image_id"] for q in questions], [q["question"] for q in questions], k=3)
    assert all(len(t) == 3 and t[0][1] >= t[1][1] >= t[2][1] for t in top)
    predicted = {int(q["question_id"]): t[0][0] for q, t in zip(questions, top)}
    assert _soft_accuracy(cfg, predicted) == pytest.approx(metrics["test/vqa_acc"], abs=1e-6)
    # the test stage's own submission file names the same answers
    stage = {r["question_id"]: r["answer"] for r in json.loads((run / "vqa_predictions.json").read_text())}
    assert sum(stage[q] == a for q, a in predicted.items()) >= 0.99 * len(predicted)
    single = model.answer(questions[0]["image_id"], questions[0]["question"], k=3)
    assert [a for a, _ in single] == [a for a, _ in top[0]]
    with pytest.raises(ConfigError, match="needs a model with a 'itm' head"):
        model.match(questions[0]["image_id"], "a red circle")
    with pytest.raises(DataError, match="no features for image id 'no-such-image'"):
        model.answer("no-such-image", "what colour is the circle?")


def test_evaluate_needs_only_the_checkpoint(vqa_run, tmp_path: Path, data_dir: Path) -> None:
    _, metrics, run = vqa_run
    alone = _alone(run, tmp_path)
    eval_cfg = compose_cfg(
        [f"ckpt_path={alone}"], output_dir=tmp_path / "eval", data_dir=data_dir, config_name="evaluate", tiny=False
    )
    again = evaluate(eval_cfg)
    assert again["test/vqa_acc"] == pytest.approx(metrics["test/vqa_acc"], abs=1e-6)


def test_predict_mode_writes_the_test_stage_answers(vqa_run, tmp_path: Path, data_dir: Path) -> None:
    cfg, _, run = vqa_run
    dm = build_datamodule(cfg)
    questions = load_questions(dm.path(dm.questions_file, "test"))[:20]
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"image": q["image_id"], "text": q["question"]}) + "\n" for q in questions))
    eval_cfg = compose_cfg(
        [f"ckpt_path={_alone(run, tmp_path)}", "mode=predict", f"+input={queries}", "top_k=2"],
        output_dir=tmp_path / "predict",
        data_dir=data_dir,
        config_name="evaluate",
        tiny=False,
    )
    assert evaluate(eval_cfg) == {"predict/queries": 20.0}
    rows = [json.loads(line) for line in (tmp_path / "predict" / "predictions.jsonl").read_text().splitlines()]
    stage = {r["question_id"]: r["answer"] for r in json.loads((run / "vqa_predictions.json").read_text())}
    assert [r["text"] for r in rows] == [q["question"] for q in questions]
    assert all(len(r["answers"]) == 2 for r in rows)
    agree = sum(r["answers"][0][0] == stage[q["question_id"]] for r, q in zip(rows, questions))
    assert agree >= 19, agree


def test_predict_input_problems_name_file_and_line(vqa_run, tmp_path: Path, data_dir: Path) -> None:
    _, _, run = vqa_run
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"image": 1, "text": "what shape?"}\n{"image": 1}\n')
    eval_cfg = compose_cfg(
        [f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "mode=predict", f"+input={queries}"],
        output_dir=tmp_path / "predict",
        data_dir=data_dir,
        config_name="evaluate",
        tiny=False,
    )
    with pytest.raises(DataError, match=r"queries.jsonl:2: a query needs a non-empty 'text'"):
        evaluate(eval_cfg)


def test_load_refuses_another_architecture_or_a_newer_format(vqa_run, tmp_path: Path) -> None:
    from vl import load

    _, _, run = vqa_run
    with pytest.raises(ConfigError, match="holds a SingleStreamEncoder checkpoint, not the VilbertEncoder asked for"):
        load(run, architecture="VilbertEncoder")
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["vl_run"]["format"] = 99
    ckpt["vl_run"]["vl_version"] = "9.0.0"
    future = tmp_path / "future.ckpt"
    torch.save(ckpt, future)
    with pytest.raises(ConfigError, match=r"written by vl 9\.0\.0 \(checkpoint format 99\); this vl .* reads format 1"):
        load(future)


@pytest.fixture(scope="module")
def captions_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[object, Path]:
    """A tiny MLM + ITM run, its checkpoint then used as `model.init_from` of a VQA run, and moved away."""
    out = tmp_path_factory.mktemp("captions-run")
    cfg = compose_cfg(
        (
            "experiment=none",
            "data=captions",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=1",
            "test=false",
        ),
        output_dir=out / "run",
        data_dir=data_dir,
    )
    train(cfg)
    return cfg, out / "run"


def _direct(model, dm, image_id, text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ITM aligned probability, MLM probabilities (T, V), input ids) of one pair, built by hand from the tokenizer
    and the feature file, one example per forward (no batching or padding)."""
    enc = dm.tokenizer(text, return_tensors="pt", return_token_type_ids=True)
    region = dm.regions[str(image_id)]
    n = min(region["features"].shape[0], dm.max_regions)
    batch = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc["token_type_ids"],
        "visual_feats": torch.as_tensor(region["features"][:n]).float()[None],
        "visual_boxes": torch.as_tensor(region["boxes_norm"][:n]).float()[None],
        "visual_mask": torch.ones(1, n, dtype=torch.long),
        "index": torch.zeros(1, dtype=torch.long),
    }
    system = model.model
    with torch.no_grad():
        out = system.encoder(batch)
        itm = system.objectives["itm"].classifier(out.pooled).softmax(-1)[0, 1]
        mlm = system.objectives["mlm"].logits(out.text[0]).softmax(-1)
    return itm, mlm, enc["input_ids"][0]


def test_match_rank_fill_mask_equal_a_direct_forward(captions_run) -> None:
    from vl import load

    cfg, run = captions_run
    model = load(run / "checkpoints" / "last.ckpt", batch_size=3)
    dm = build_datamodule(cfg)
    images = dm.regions.ids()[:5]
    texts = ["a red circle and a blue square", "two green triangles", "a small yellow star", "the", "a big shape"]
    batched = model.match(images, texts)  # batches of 3 with padding
    for image, text, p in zip(images, texts, batched):
        itm, _, _ = _direct(model, dm, image, text)
        assert p == pytest.approx(float(itm), abs=1e-5)
    ranking = model.rank("a red circle", images)
    direct = [float(_direct(model, dm, im, "a red circle")[0]) for im in images]
    assert [i for i, _ in ranking] == sorted(range(5), key=lambda i: -direct[i])
    assert [s for _, s in ranking] == pytest.approx(sorted(direct, reverse=True), abs=1e-5)
    filled = model.fill_mask("a [MASK] circle and a [MASK] square", images[0], k=4)
    _, probs, ids = _direct(model, dm, images[0], "a [MASK] circle and a [MASK] square")
    positions = (ids == dm.tokenizer.mask_token_id).nonzero()[:, 0].tolist()
    assert len(filled) == len(positions) == 2
    for fill, pos in zip(filled, positions):
        top = probs[pos].topk(4)
        assert [t for t, _ in fill] == dm.tokenizer.convert_ids_to_tokens(top.indices.tolist())
        assert [s for _, s in fill] == pytest.approx(top.values.tolist(), abs=1e-5)
    with pytest.raises(ConfigError, match=r"no \[MASK\] in 'a red circle'"):
        model.fill_mask("a red circle", images[0])


def test_init_from_is_not_reread_and_another_architecture_is_refused(captions_run, tmp_path: Path, data_dir) -> None:
    from vl import load

    _, run = captions_run
    init = tmp_path / "pretrained.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", init)
    cfg = compose_cfg(
        (
            *VQA[:2],
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "test=false",
            f"model.init_from={init}",
        ),
        output_dir=tmp_path / "vqa",
        data_dir=data_dir,
    )
    train(cfg)
    init.unlink()  # the pretraining run has moved
    ckpt = torch.load(tmp_path / "vqa" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["init_from"] is None and ckpt["vl_run"]["config"]["model"]["init_from"] is None
    image = build_datamodule(cfg).regions.ids()[0]
    assert len(load(tmp_path / "vqa").answer(image, "what colour is the circle?", k=1)) == 1
    foreign = compose_cfg(
        ("experiment=none", "data=vqa", "model=vilbert_tiny", f"model.init_from={run / 'checkpoints' / 'last.ckpt'}"),
        output_dir=tmp_path / "foreign",
        data_dir=data_dir,
    )
    with pytest.raises(ConfigError, match="holds a SingleStreamEncoder checkpoint, but this model is a VilbertEncoder"):
        train(foreign)


def test_import_vl_stays_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, vl; assert callable(vl.load); print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def _predict_cli(ckpt: Path, queries: Path, out: Path, data_dir: Path, *extra: str) -> tuple[list[dict], str]:
    """`python evaluate.py mode=predict ckpt_path=... +input=...` as a user runs it; (the rows it writes, its log)."""
    import os
    import subprocess
    import sys

    args = [f"ckpt_path={ckpt}", "mode=predict", f"+input={queries}", "top_k=3"]
    args += [f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args],
        cwd=out.parent,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return rows, done.stdout + done.stderr


def _assert_same_rows(one: list[dict], two: list[dict]) -> None:
    """Same queries in the same order; every score equal to 1e-6; the same answers / tokens."""
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items() if k not in ("match", "answers", "fill_mask")} == {
            k: v for k, v in b.items() if k not in ("match", "answers", "fill_mask")
        }
        assert a.keys() == b.keys()
        if "match" in a:
            assert b["match"] == pytest.approx(a["match"], abs=1e-6)
        if "answers" in a:
            assert [x[0] for x in a["answers"]] == [x[0] for x in b["answers"]]
            assert [x[1] for x in b["answers"]] == pytest.approx([x[1] for x in a["answers"]], abs=1e-6)
        for mask_a, mask_b in zip(a.get("fill_mask", []), b.get("fill_mask", [])):
            assert [t for t, _ in mask_a] == [t for t, _ in mask_b]
            assert [p for _, p in mask_b] == pytest.approx([p for _, p in mask_a], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["vqa", "captions"])
def test_ddp_predict_writes_the_one_process_predictions(which, request, tmp_path: Path, data_dir: Path) -> None:
    """`mode=predict` on `hardware=ddp_cpu` (2 spawned gloo processes, an uneven number of queries: the sampler
    pads one rank) writes the rows one process writes: same queries by id, same scores to 1e-6."""
    run = request.getfixturevalue(f"{which}_run")[-1]
    cfg = request.getfixturevalue(f"{which}_run")[0]
    dm = build_datamodule(cfg)
    ids = dm.regions.ids()[:9]
    texts = ["what colour is the circle?", "a red [MASK] on the left", "how many shapes are there?"]
    queries = tmp_path / "queries.jsonl"
    rows = [{"image": i, "text": t, "id": f"q{n}"} for n, (i, t) in enumerate((i, t) for i in ids for t in texts)]
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))  # 27 queries
    ckpt = _alone(run, tmp_path)
    one, _ = _predict_cli(ckpt, queries, tmp_path / "one", data_dir)
    two, log = _predict_cli(ckpt, queries, tmp_path / "two", data_dir, "hardware=ddp_cpu")
    assert "MEMBER: 2/2" in log  # two processes did predict
    assert [r["id"] for r in one] == [r["id"] for r in rows]
    assert ("answers" in one[0]) == (which == "vqa") and ("fill_mask" in one[1]) == (which == "captions")
    _assert_same_rows(one, two)
    assert not list((tmp_path / "two").glob("predict.rank*.pt"))  # the per-rank parts are merged and removed


def test_vqa_answers_rank_by_logit_where_sigmoid_scores_tie() -> None:
    """Logits of 18-40 all have a float32 sigmoid of exactly 1.0: the answers still come in logit order, each with its
    sigmoid score."""
    from vl.inference import rows_from_outputs

    logits = torch.tensor([[18.0, 40.0, -3.0, 25.0, 30.0]])
    probs = logits.sigmoid()
    assert (probs[0, [0, 1, 3, 4]] == 1.0).all()  # the tie
    out = {"index": torch.tensor([7]), "vqa": probs, "vqa_logits": logits}
    rows = rows_from_outputs([out], ["a", "b", "c", "d", "e"], tokenizer=None, k=4)
    assert [a for a, _ in rows[7]["answers"]] == ["b", "e", "d", "a"]
    assert [s for _, s in rows[7]["answers"]] == [1.0, 1.0, 1.0, 1.0]
