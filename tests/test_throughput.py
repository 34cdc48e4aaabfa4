"""Throughput and MFU logging (vl.callbacks.Throughput on Lightning's ThroughputMonitor)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from vl.callbacks import non_embedding_parameters, positions
from vl.pipeline import train


def test_flop_estimate_parts_count_what_they_name() -> None:
    module = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 4), nn.LayerNorm(4))
    module[2].weight.requires_grad_(False)
    assert non_embedding_parameters(module) == 8 * 4 + 4 + 4  # linear weight + bias, LayerNorm bias (weight frozen)
    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "visual_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
    }
    assert positions(batch) == 8 + 3


def test_a_combined_loader_batch_counts_all_its_parts() -> None:
    """MM-BERT's pretraining batch is Lightning's CombinedLoader dict {"main": ..., "aux": ...} (the aux text part has
    no regions); a part that ran out is None."""
    from vl.callbacks import _batch_size, _text_tokens

    main = {
        "input_ids": torch.zeros(2, 3, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
        "visual_mask": torch.tensor([[1, 1], [1, 0]]),
    }
    aux = {"input_ids": torch.zeros(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4, dtype=torch.long)}
    combined = {"main": main, "aux": aux, "other": None}
    assert positions(combined) == (5 + 3) + 12
    assert _batch_size(combined) == 2 + 3 and _text_tokens(combined) == 5 + 12


def test_a_batch_without_text_counts_its_rows_and_regions() -> None:
    """A pixels-only or regions-only batch (no `input_ids` / `attention_mask`) is counted by its `index` rows and its
    visual positions; it is not mistaken for a combined loader's dict."""
    from vl.callbacks import _batch_size, _text_tokens

    pixels = {"index": torch.arange(4), "pixels": torch.zeros(4, 3, 8, 8), "visual_mask": torch.ones(4, 6)}
    assert _batch_size(pixels) == 4 and _text_tokens(pixels) == 0 and positions(pixels) == 24
    assert _batch_size({"main": pixels, "aux": None}) == 4


def test_mfu_is_the_logged_flops_over_the_given_peak(make_cfg) -> None:
    cfg = make_cfg(
        "experiment=none",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=12",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "data.batch_size=8",
        "data.batch_size_per_device=8",
        "callbacks.throughput.window_size=4",
        "hardware.peak_flops=1e11",
    )
    train(cfg)
    rows = [
        r for r in csv.DictReader(open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")) if r.get("train/device/mfu")
    ]
    assert rows, "no MFU logged"
    for row in rows:
        flops, mfu = float(row["train/device/flops_per_sec"]), float(row["train/device/mfu"])
        assert mfu == pytest.approx(flops / 1e11, rel=1e-6)
        assert float(row["train/device/samples_per_sec"]) > 0 and float(row["train/device/items_per_sec"]) > 0


def test_the_progress_bar_draws_at_most_refresh_rate_times_a_second_and_always_the_epochs_last_batch(
    monkeypatch,
) -> None:
    """vl's rich bar skips a batch's update when the last one is under 1 / refresh_rate s old, except at the epoch's
    last batch (the bar's position is absolute, so the next update catches up)."""
    import lightning as L

    from vl.callbacks import RichProgressBar

    drawn: list[int] = []
    original = L.pytorch.callbacks.RichProgressBar.on_train_batch_end

    def record(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        drawn.append(batch_idx)
        original(self, trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(L.pytorch.callbacks.RichProgressBar, "on_train_batch_end", record)

    class Toy(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(40, 2), batch_size=1)

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[RichProgressBar(refresh_rate=1)],  # at most once a second: 40 toy steps take far less
    )
    trainer.fit(Toy())
    assert drawn[0] == 0 and drawn[-1] == 39
    assert len(drawn) <= 5, drawn
