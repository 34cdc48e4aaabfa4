"""VG-BERT learns on the embedded corpus from pixels at the tiny size, through the configs users run (slow tier):
stage 2 (grounding) retrieval above chance (k / N of the split); from the stage-2 checkpoint, stage 3 (relational)
relation accuracy above the majority-relation baseline (computed on the split) and transfer retrieval (only the
heads train) above chance (the published order starts transfer from stage 3: at this size the tiny stage-3
checkpoint's features left the heads at chance, README); and the concreteness probe's mechanics (embedded default:
synthetic ratings) on the grounded model."""

from __future__ import annotations

from pathlib import Path

import pytest

from vl.pipeline import train

CORPUS = "data.corpus.num_images=3000"  # 1 000 square images: ~800 train, ~100 val, ~100 test


def _test_metrics(metrics: dict) -> dict:
    return {k: round(float(v), 4) for k, v in metrics.items() if k.startswith("test/")}


def _best(cfg) -> Path:
    return Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"


@pytest.mark.slow  # ~30-40 min on 2 busy cores: three tiny fits from pixels
def test_grounding_then_relational_then_transfer_learn(make_cfg) -> None:
    from vl.build import build_datamodule, build_model
    from vl.checkpoint import read_checkpoint
    from vl.data.collate import load_tokenizer
    from vl.eval.probes.concreteness import run_concreteness

    grounding = make_cfg("experiment=vg_bert_grounding_tiny", CORPUS, "trainer.max_epochs=12", name="grounding")
    metrics, _ = train(grounding)
    print("grounding", _test_metrics(metrics))
    assert metrics["test/r5_mean"] > 2 * metrics["test/r5_mean_chance"], metrics
    assert metrics["test/r10_mean"] > metrics["test/r10_mean_chance"] + 0.05, metrics

    # the probe's mechanics on the grounded model (synthetic ratings: no claim about concreteness is tested)
    system = build_model(grounding, build_datamodule(grounding))
    system.load_state_dict(read_checkpoint(_best(grounding))["state_dict"])
    result = run_concreteness(system.encoder, load_tokenizer("minilm"), Path(grounding.paths.output_dir) / "probe")
    assert 0 <= result["test/concreteness_word_r"] <= 1 and result["test/concreteness_categories"] == 5
    assert (Path(grounding.paths.output_dir) / "probe" / "concreteness.png").is_file()

    relational = make_cfg(
        "experiment=vg_bert_relational_tiny", CORPUS, "trainer.max_epochs=8", f"model.init_from={_best(grounding)}",
        name="relational",
    )  # fmt: skip
    metrics, _ = train(relational)
    print("relational", _test_metrics(metrics))
    assert metrics["test/rel_acc"] > metrics["test/rel_acc_majority"] + 0.05, metrics

    transfer = make_cfg(
        "experiment=vg_bert_transfer_retrieval_tiny", CORPUS, "trainer.max_epochs=6",
        f"model.init_from={_best(grounding)}", name="transfer",
    )  # fmt: skip
    metrics, _ = train(transfer)
    print("transfer", _test_metrics(metrics))
    assert metrics["test/r10_mean"] > metrics["test/r10_mean_chance"] + 0.05, metrics


@pytest.mark.slow  # three short pipeline runs (~1-2 min)
@pytest.mark.parametrize(
    ("experiment", "metric", "baseline"),
    [("vg_bert_grounding_tiny", "test/r1_mean", "test/r1_mean_chance"),
     ("vg_bert_relational_tiny", "test/rel_acc", "test/rel_acc_majority"),
     ("vg_bert_transfer_retrieval_tiny", "test/r10_mean", "test/r10_mean_chance")],
)  # fmt: skip
def test_each_experiment_runs_through_the_pipeline(make_cfg, experiment, metric, baseline) -> None:
    cfg = make_cfg(f"experiment={experiment}", "data.num_workers=0", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=2", name=experiment)  # fmt: skip
    metrics, _ = train(cfg)
    assert metric in metrics and baseline in metrics, sorted(metrics)
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt").is_file()
