"""Every downstream task fine-tunes on the embedded corpus past chance, and `evaluate.py` reproduces its test metrics
and writes its submission file (VQA is covered in test_learning / test_pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import save_run_config
from vl.pipeline import evaluate, train

#: task -> (experiment, headline metric, its chance reference, margin over chance, submission file, quick settings)
TASKS: dict[str, tuple[str, str, str, float, str, tuple[str, ...]]] = {
    "vcr": (
        "vcr_finetune",
        "test/vcr_q2ar_acc",
        "test/vcr_q2ar_acc_chance",
        0.15,
        "vcr_submission.csv",
        ("data.corpus.num_images=400", "trainer.max_epochs=4"),
    ),
    "refcoco": (
        "refcoco_finetune",
        "test/refer_acc",
        "test/refer_acc_chance",
        0.25,
        "refcoco_predictions.json",
        ("data.corpus.num_images=300", "trainer.max_epochs=4"),
    ),
    "retrieval": (
        "retrieval_finetune",
        "test/recall@1",
        "test/recall@1_chance",
        0.1,
        "retrieval_predictions.json",
        # PyTorch's head init: from a random encoder the seeds' N(0, initializer_range) retrieval head (`model.head_init`
        # default; 0.1 in the tiny config) learns slower. Measured 2026-12-05, 2 epochs, seeds 12345 / 1 / 2 / 3: R@1
        # 0.07 / 0.27 / 0.15 / 0.12 with it, 0.23 / 0.33 / 0.22 / 0.30 with `torch` (chance 0.03, threshold 0.13)
        ("data.corpus.num_images=300", "trainer.max_epochs=2", "data.captions_per_image=2", "model.head_init=torch"),
    ),
}
#: ViLBERT-tiny needs more steps from random init than the single-stream model. Retrieval at the recipe's lr 1e-3
#: collapses to a constant score (R@1 = chance exactly, loss ln 4) since the layer-order fix; at 3e-4 it learns
#: (measured: R@1 0.47, R@10 0.98 against chance 0.03 / 0.33).
#: VCR keeps the AdamW decay groups (`model.weight_decay_groups=vl`): with the seed's swapped groups (the default, for
#: fine-tuning from a pretrained BERT) this random-init run stays near chance (measured in CI 2026-12-05: Q->AR 0.121
#: against chance 0.0625, threshold 0.2125; 0.246 with `vl`).
#: VCR also keeps vl's earlier joint Q->A + QA->R steps (`data.vcr_steps=joint`): with the seed's separate steps (the
#: default) this run ends just under the threshold (measured 2026-12-05: Q->A 0.437, QA->R 0.442, Q->AR 0.201 against
#: 0.2125; joint, measured the same day: 0.523 / 0.427 / 0.246); the single-stream VCR test above passes with the
#: seed's separate steps (Q->AR 0.58).
VILBERT_EXTRA = {
    "vcr": (
        "data.corpus.num_images=1500",
        "trainer.max_epochs=8",
        "model.weight_decay_groups=vl",
        "data.vcr_steps=joint",
    ),
    "retrieval": ("trainer.max_epochs=8", "model.optimizer.lr=3e-4"),
}
VILBERT_METRIC: dict[str, tuple[str, str, float]] = {}


def _finetune_and_evaluate(task: str, model: str, make_cfg, extra: tuple[str, ...] = ()) -> None:
    experiment, metric, chance, margin, submission, quick = TASKS[task]
    if model.startswith("vilbert"):
        metric, chance, margin = VILBERT_METRIC.get(task, (metric, chance, margin))
    cfg = make_cfg(f"experiment={experiment}", f"model={model}", *quick, *extra)
    metrics, _ = train(cfg)
    assert metrics[metric] > metrics[chance] + margin, {k: v for k, v in metrics.items() if k.startswith("test/")}
    run = Path(cfg.paths.output_dir)
    assert (run / submission).is_file()
    save_run_config(cfg)
    eval_cfg = make_cfg(
        f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", name="eval", config_name="evaluate", tiny=False
    )
    again = evaluate(eval_cfg)
    assert again[metric] == pytest.approx(metrics[metric], abs=1e-6)
    written = Path(eval_cfg.paths.output_dir) / submission
    assert written.is_file() and written.read_bytes() == (run / submission).read_bytes()
    if submission.endswith(".json"):
        assert json.loads(written.read_text())
    if task == "retrieval":  # the evaluate task ranks the same gallery: exhaustive and shortlist(k = N) agree with test
        ckpt = run / "checkpoints" / "best.ckpt"
        for i, mode in enumerate(("task.text_chunk=4", "task.shortlist_k=1000")):
            zs = make_cfg(
                f"ckpt_path={ckpt}",
                "task=zero_shot_retrieval",
                mode,
                name=f"zs{i}",
                config_name="evaluate",
                tiny=False,
            )
            got = evaluate(zs)
            assert got["test/recall@1"] == pytest.approx(metrics["test/recall@1"], abs=1e-6)
            assert got["test/median_rank"] == metrics["test/median_rank"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_single_stream_finetunes_above_chance(task: str, make_cfg) -> None:
    _finetune_and_evaluate(task, "visual_bert_tiny", make_cfg)


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_vilbert_finetunes_above_chance(task: str, make_cfg) -> None:
    _finetune_and_evaluate(task, "vilbert_tiny", make_cfg, VILBERT_EXTRA.get(task, ("trainer.max_epochs=8",)))


@pytest.mark.slow  # DDP spawns
@pytest.mark.parametrize("task", ["retrieval", "vcr"])
def test_ddp_cpu_evaluation_matches_one_process(task: str, make_cfg) -> None:
    """2 spawned processes score every query / question once: metrics and submission equal the 1-process ones."""
    experiment, metric, _, _, submission, _ = TASKS[task]
    cfg = make_cfg(
        f"experiment={experiment}",
        "model=visual_bert_tiny",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "data.captions_per_image=2" if task == "retrieval" else "data.max_text_len=40",
    )
    train(cfg)
    save_run_config(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    one = evaluate(make_cfg(f"ckpt_path={ckpt}", name="eval1", config_name="evaluate", tiny=False))
    two = evaluate(make_cfg(f"ckpt_path={ckpt}", "hardware=ddp_cpu", name="eval2", config_name="evaluate", tiny=False))
    keys = [k for k in one if k.startswith("test/")]
    assert keys and {k: two[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, abs=1e-6)
    root = Path(cfg.paths.output_dir).parent
    first, second = (_rows(root / name / submission) for name in ("eval1", "eval2"))
    assert len(first) == len(second) and [r[0] for r in first] == [r[0] for r in second]  # same ids, no duplicates
    assert len({r[0] for r in first}) == len(first)
    for a, b in zip(first, second):
        assert a[1:] == pytest.approx(b[1:], abs=1e-5)


def _rows(path: Path) -> list[list]:
    """Submission rows as [id, values...]: CSV (VCR) or a JSON list of records (retrieval)."""
    if path.suffix == ".csv":
        lines = path.read_text().splitlines()[1:]
        return [[cells[0], *map(float, cells[1:])] for cells in (line.split(",") for line in lines)]
    return [[r["query_index"], r["rank"]] for r in json.loads(path.read_text())]
