"""VG-BERT learns on the embedded corpus from pixels at the tiny size, through the configs users run (slow tier):
stage-2 retrieval above chance (k / N of the split), stage-3 relation accuracy above the majority-relation baseline
(computed on the split), transfer retrieval above chance, and the concreteness probe (embedded default: synthetic
ratings, a mechanics check) correlating positively after grounding and more than before it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vl.pipeline import train

GROUNDING = ("experiment=vg_bert_grounding_tiny", "data.corpus.num_images=3000", "trainer.max_epochs=12")


def _test_metrics(metrics: dict) -> dict:
    return {k: round(float(v), 4) for k, v in metrics.items() if k.startswith("test/")}


@pytest.mark.slow  # ~15-25 min on 2 busy cores
def test_grounding_retrieval_above_chance_then_transfer_and_concreteness(make_cfg) -> None:
    from vl.build import build_datamodule, build_model
    from vl.checkpoint import read_checkpoint
    from vl.data.collate import load_tokenizer
    from vl.eval.probes.concreteness import embedded_words, run_concreteness

    cfg = make_cfg(*GROUNDING, name="grounding")
    metrics, _ = train(cfg)
    print("grounding", _test_metrics(metrics))
    assert metrics["test/r5_mean"] > 2 * metrics["test/r5_mean_chance"], metrics
    assert metrics["test/r10_mean"] > metrics["test/r10_mean_chance"] + 0.05, metrics

    # concreteness (embedded synthetic ratings: mechanics only): after grounding vs the same model at random init
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    tok = load_tokenizer("minilm")
    grounded = build_model(cfg, build_datamodule(cfg))
    grounded.load_state_dict(read_checkpoint(ckpt)["state_dict"])
    torch.manual_seed(0)
    before = run_concreteness(build_model(cfg, build_datamodule(cfg)).encoder, tok, Path(cfg.paths.output_dir) / "c0")
    after = run_concreteness(grounded.encoder, tok, Path(cfg.paths.output_dir) / "c1")
    print("concreteness before", before, "after", after, "words", len(embedded_words()[0]))
    assert after["test/concreteness_word_r"] > 0 and after["test/concreteness_word_r"] > before["test/concreteness_word_r"]

    transfer = make_cfg(
        "experiment=vg_bert_transfer_retrieval_tiny", "data.corpus.num_images=3000", "trainer.max_epochs=6",
        f"model.init_from={ckpt}", name="transfer",
    )  # fmt: skip
    metrics, _ = train(transfer)
    print("transfer", _test_metrics(metrics))
    assert metrics["test/r10_mean"] > metrics["test/r10_mean_chance"] + 0.05, metrics


@pytest.mark.slow  # ~10-15 min on 2 busy cores
def test_relational_accuracy_above_the_majority_relation(make_cfg) -> None:
    cfg = make_cfg("experiment=vg_bert_relational_tiny", "data.corpus.num_images=3000", "trainer.max_epochs=8")
    metrics, _ = train(cfg)
    print("relational", _test_metrics(metrics))
    assert metrics["test/rel_acc"] > metrics["test/rel_acc_majority"] + 0.05, metrics
