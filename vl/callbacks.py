"""Callbacks every `vl` fit gets (added by `vl.pipeline.build_trainer`, whatever `callbacks=` holds)."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

__all__ = [
    "MetricsLine",
    "RichProgressBar",
    "Throughput",
    "ValidateAtMaxSteps",
    "non_embedding_parameters",
    "positions",
]


class ValidateAtMaxSteps(L.Callback):
    """When `trainer.max_steps` ends training inside an epoch, validate right there, as at an epoch end.

    Without it a run shorter than one epoch never validates: EarlyStopping (checked at the train epoch end) fails on
    the missing monitored metric after all the training, and no checkpoint is written. Here the last step sets
    `should_stop` (Lightning then validates before leaving the epoch) and waives `min_epochs`, which `max_steps`
    overrules anyway: the monitored metric exists, best/last checkpoints are written, the test stage runs.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        max_steps = trainer.max_steps
        if max_steps is None or max_steps < 0 or trainer.global_step < max_steps or trainer.should_stop:
            return
        if trainer.fit_loop.min_epochs:
            log.info(
                "trainer.max_steps=%d reached in epoch %d: min_epochs=%d is waived",
                max_steps,
                trainer.current_epoch,
                trainer.fit_loop.min_epochs,
            )
            trainer.fit_loop.min_epochs = 0
        trainer.should_stop = True


def _parts(batch: Any) -> list[Any]:
    """The model batches inside `batch`: itself, or the parts of a `CombinedLoader` batch (``{"main": ..., "aux":
    ...}``: a dict of dicts; a part that ran out is None)."""
    if isinstance(batch, dict) and batch and all(v is None or isinstance(v, dict) for v in batch.values()):
        return [part for part in batch.values() if part is not None]
    return [batch]


def _rows(part: Any) -> int:
    """Examples in a batch part: its `index` (every vl collator writes one), else its first tensor's length."""
    import torch

    for key in ("index", "input_ids"):
        if key in part:
            return int(part[key].shape[0])
    return next((int(v.shape[0]) for v in part.values() if isinstance(v, torch.Tensor) and v.ndim), 0)


def _batch_size(batch: Any) -> int:
    return sum(_rows(part) for part in _parts(batch))


def _text_tokens(batch: Any) -> int:
    """Real text tokens (0 for a part without text, e.g. pixels only)."""
    return sum(int(part["attention_mask"].sum()) for part in _parts(batch) if "attention_mask" in part)


def _visual_positions(batch: Any) -> int:
    """Real visual positions (regions, or grid / patch cells of a pixel model when the batch says how many:
    `visual_mask`; 0 for a part without one)."""
    return sum(int(part["visual_mask"].sum()) for part in _parts(batch) if "visual_mask" in part)


def positions(batch: Any) -> int:
    """Sequence positions a batch runs through the model: real text tokens + real visual positions; summed over the
    parts of a combined loader's batch."""
    return _text_tokens(batch) + _visual_positions(batch)


def non_embedding_parameters(module: Any) -> int:
    """Trainable parameters outside `nn.Embedding` tables (the N of the 6·N·tokens estimate)."""
    from torch import nn

    embedded = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if p.requires_grad and id(p) not in embedded)


class Throughput(L.pytorch.callbacks.ThroughputMonitor):
    """Lightning's `ThroughputMonitor` for `vl` batches: `train|validate/{batches,samples,items}_per_sec` (items =
    real text tokens), per device and in total, and `device/mfu` (model FLOPs per second over the device's peak).

    FLOPs per batch are the standard transformer estimate 6 · N · positions (forward + backward; N = trainable
    non-embedding parameters, positions = real text tokens + real visual positions), as in the PaLM MFU definition
    without its attention term, so MFU is slightly underestimated at long sequences. The peak comes from
    Lightning's table for the device and precision (GPUs/TPUs; none on CPU, so no MFU there) or from `peak_flops`
    (per device, e.g. `hardware.peak_flops=989e12` for an H100 SXM in bf16)."""

    def __init__(self, *, window_size: int = 10, peak_flops: float | None = None) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=self._length, window_size=window_size)
        self.peak_flops = peak_flops
        self._params: int | None = None
        self._counted: tuple[int, int] | None = None  # (id of the batch counted at its start, its text tokens)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = float(self.peak_flops)
            for throughput in self._throughputs.values():
                throughput.available_flops = float(self.peak_flops)

    def _length(self, batch: Any) -> int:
        """`length_fn`: the text tokens counted at the batch's start (each count is a device sync), else counted."""
        counted, self._counted = self._counted, None
        if counted is not None and counted[0] == id(batch):
            return counted[1]
        return _text_tokens(batch)

    def _flops_per_batch(self, pl_module: L.LightningModule, batch: Any, per_position: int) -> None:
        if self._params is None:
            self._params = non_embedding_parameters(pl_module)
        text = _text_tokens(batch)
        self._counted = (id(batch), text)
        pl_module.flops_per_batch = per_position * self._params * (text + _visual_positions(batch))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *_: Any) -> None:
        self._flops_per_batch(pl_module, batch, 6)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *_: Any, **__: Any
    ) -> None:
        self._flops_per_batch(pl_module, batch, 2)  # forward only


class RichProgressBar(L.pytorch.callbacks.RichProgressBar):
    """Lightning's rich progress bar, showing each training step's `train/loss` from the module's `last_train_loss`,
    so the system need not `self.log` it on every step (`vl.models.step_logging`); the value shown is the one a
    per-step `self.log` showed.

    The training bar and its metrics are updated at most `refresh_rate` times a second (and always at an epoch's
    last batch), not after every batch: rich redraws at that rate anyway, and updating the bar, reading the step's
    metrics and the loss (a device sync) after each of ~50 tiny steps a second cost ~1 % of a step (`bench/
    train_step.py`). Lightning's default is 100 redraws a second; 10 looks the same."""

    shows_last_train_loss = True  # vl.models.step_logging.LIVE_LOSS_BAR

    def __init__(self, *, refresh_rate: int = 10, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._drawn_at = float("-inf")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "last_train_loss", None)
        if loss is not None:
            items["train/loss"] = float(loss)
        return items

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_enabled:
            now = time.monotonic()
            if now - self._drawn_at < 1.0 / self.refresh_rate and batch_idx + 1 < self.total_train_batches:
                return  # the bar's position is absolute: the next update catches up
            self._drawn_at = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class MetricsLine(L.Callback):
    """One log line per validation (`epoch 3 step 120: train/loss=0.41 val/loss=0.52 val/vqa_acc=0.61`): the run's
    `.log` file shows progress under SLURM or nohup, where the progress bar is invisible."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = dict(trainer.callback_metrics)
        if getattr(pl_module, "last_train_loss", None) is not None:  # the last step's (logged or not)
            values["train/loss"] = pl_module.last_train_loss
        parts = [
            f"{key}={float(value):.4g}"
            for key, value in sorted(values.items())
            if key.startswith("val/") or key == "train/loss"
            if getattr(value, "numel", lambda: 1)() == 1
        ]
        if parts:
            log.info("epoch %d step %d: %s", trainer.current_epoch, trainer.global_step, " ".join(parts))
