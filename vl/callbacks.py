"""Callbacks every `vl` fit gets (added by `vl.pipeline.build_trainer`, whatever `callbacks=` holds)."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

__all__ = ["MetricsLine", "ValidateAtMaxSteps"]


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


class MetricsLine(L.Callback):
    """One log line per validation (`epoch 3 step 120: train/loss=0.41 val/loss=0.52 val/vqa_acc=0.61`): the run's
    `.log` file shows progress under SLURM or nohup, where the progress bar is invisible."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        parts = [
            f"{key}={float(value):.4g}"
            for key, value in sorted(trainer.callback_metrics.items())
            if key.startswith("val/") or key == "train/loss"
            if getattr(value, "numel", lambda: 1)() == 1
        ]
        if parts:
            log.info("epoch %d step %d: %s", trainer.current_epoch, trainer.global_step, " ".join(parts))
