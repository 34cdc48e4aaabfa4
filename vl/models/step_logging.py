"""What a training step logs, and when (`StepLogging`, a LightningModule base `vl.models.system.VLSystem` builds on).

`self.log` costs ~0.4 ms a call on CPU: Lightning walks the logged value's state on every call (~3 % of a tiny step
for one value, `bench/train_step.py`). So a training step logs a value only on the steps something reads it through
Lightning:
- the per-term losses (`log_step_value`) on the steps the loggers write (`trainer.log_every_n_steps`): the loggers
  receive exactly what a per-step `self.log` gave them, and a step's cost does not grow with the number of terms;
- `train/loss` (`log_train_loss`) on those steps too, and on every step when a progress bar other than vl's
  (`vl.callbacks.RichProgressBar`, which shows `last_train_loss` itself) or a callback monitoring `train/loss` reads
  it. The step's loss is always kept as `last_train_loss`; vl's own readers (the bar, `MetricsLine`, the metrics
  `train()` returns) take it from there, so they see every step's loss as before.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

__all__ = ["LIVE_LOSS_BAR", "StepLogging"]

#: attribute of a progress-bar callback that shows the module's `last_train_loss` itself (`vl.callbacks`)
LIVE_LOSS_BAR = "shows_last_train_loss"


class StepLogging(L.LightningModule):
    """`log_train_loss` and `log_step_value` (see the module docstring)."""

    def log_train_loss(self, loss: torch.Tensor, *, batch_size: int) -> None:
        """Keep the step's total loss as `last_train_loss`; `self.log` it as `train/loss` when it is read."""
        self.last_train_loss = loss.detach()
        if self._train_loss_read_this_step():
            self.log("train/loss", loss, batch_size=batch_size, prog_bar=True)

    def log_step_value(self, key: str, value: Any, *, batch_size: int) -> None:
        """`self.log` a training value that only the loggers show (not the progress bar), on the steps they write."""
        if self._loggers_write_this_step():
            self.log(key, value, batch_size=batch_size)

    def _train_loss_read_this_step(self) -> bool:
        """The loggers write this step, or a progress bar other than vl's or a callback monitoring `train/loss` reads
        it every step (both looked up once per trainer)."""
        trainer = self._trainer
        if trainer is None or trainer.fast_dev_run or self._loggers_write_this_step():
            return True
        cached = self.__dict__.get("_train_loss_readers")
        if cached is None or cached[0] is not trainer:
            bar = trainer.progress_bar_callback
            monitored = any(getattr(cb, "monitor", None) == "train/loss" for cb in trainer.callbacks)
            cached = (trainer, monitored or (bar is not None and not getattr(bar, LIVE_LOSS_BAR, False)))
            self.__dict__["_train_loss_readers"] = cached
        return cached[1]

    def _loggers_write_this_step(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return True
        if not trainer.loggers:
            return False
        if trainer.fast_dev_run:
            return True
        # Lightning's own test (logger_connector.should_update_logs); it is evaluated with the same step counter
        # after the training step, so the answer here is the one Lightning acts on
        return bool(getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", True))
