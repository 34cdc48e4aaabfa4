"""What makes a `vl` training run safe to stop, resume and trust, as a LightningModule base (`ReliableTraining`) that
`vl.models.system.VLSystem` builds on; every system inherits it.

- **Exact resume.** Dropout is reseeded per micro-batch from (seed, epoch, batch, rank) (`step_seed`), the training
  loader's position is restored from the checkpoint before the first batch is fetched (Lightning restores it too late
  when `configure_optimizers` built the loader first), and a checkpoint taken inside a gradient-accumulation window
  carries every rank's gradients so far (`PARTIAL_GRADS`), so the resumed run's next optimizer step is the one the
  uninterrupted run took.
- **Divergence guard.** Before each optimizer step the loss terms of its micro-batches and the gradients are checked
  in one reduction and one device sync: a non-finite value stops the run with `TrainingDiverged` naming the step, the
  micro-batch and the term (or the parameters), and the step is not applied.
- **No bad checkpoint.** A checkpoint with non-finite weights is never written (as best, last or any other).

A subclass records each micro-batch's weighted loss terms in `self._terms` during `training_step` and appends
`(epoch, batch_idx, terms)` to `self._pending_terms` (`VLSystem.training_step` does).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from vl.errors import TrainingDiverged

log = logging.getLogger(__name__)

__all__ = ["PARTIAL_GRADS", "ReliableTraining", "step_seed"]

PARTIAL_GRADS = "vl_partial_gradients"  # checkpoint key: per-rank gradients of an unfinished accumulation window


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The global-RNG seed of one training micro-batch (a hash: distinct for every (seed, epoch, batch, rank))."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{batch_idx}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ReliableTraining(L.LightningModule):
    """Exact resume, the divergence guard and the non-finite checkpoint refusal (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._terms: dict[str, torch.Tensor] = {}  # weighted loss terms of the current training micro-batch
        self._pending_terms: list[tuple[int, int, dict[str, torch.Tensor]]] = []  # since the last optimizer step
        self._guarded: list[nn.Parameter] | None = None  # the parameters the divergence guard checks (at fit start)
        self._loader_states: list[Any] = []
        self._partial_grads: list[dict[str, torch.Tensor]] | None = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # where the training loader stood (ResumableDataLoader.state_dict, saved by Lightning's fit loop)
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = list(fit_state.get("combined_loader") or [])
        self._partial_grads = checkpoint.get(PARTIAL_GRADS)

    def on_train_start(self) -> None:
        self._guarded = None  # (re)collected at the first step: a strategy may have wrapped or replaced parameters
        # Lightning only restores loader states when the fit loop builds the train loader after the checkpoint is
        # loaded; `configure_optimizers` (trainer.estimated_stepping_batches) builds it earlier. Apply them here, before
        # the first batch is fetched (ResumableDataLoader creates its iterator at the first fetch).
        states = getattr(self, "_loader_states", None)
        if states:
            loaders = self.trainer.train_dataloader
            stateful = [
                dl
                for dl in (loaders if isinstance(loaders, (list, tuple)) else [loaders])
                if hasattr(dl, "load_state_dict")
            ]
            for loader, state in zip(stateful, states):
                loader.load_state_dict(state)
            self._loader_states = []
        partial, self._partial_grads = getattr(self, "_partial_grads", None), None
        if partial:  # a checkpoint taken inside an accumulation window: its micro-batches' gradients so far
            if len(partial) != self.trainer.world_size:
                log.warning(
                    "resume: the checkpoint was taken inside an accumulation window by %d process(es), this run has "
                    "%d; the window's partial gradients are dropped",
                    len(partial),
                    self.trainer.world_size,
                )
                return
            grads = partial[self.global_rank]
            for name, param in self.named_parameters():
                if name in grads:
                    param.grad = grads[name].to(param.device, param.dtype)

    def _partial_gradients(self) -> list[dict[str, torch.Tensor]] | None:
        """Every rank's accumulated gradients when a checkpoint is taken inside an accumulation window (validation
        every N micro-batches can end there), else None. Lightning clears gradients only when a window starts."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or trainer.accumulate_grad_batches <= 1:
            return None
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.current.ready % trainer.accumulate_grad_batches == 0 or progress.is_last_batch:
            return None  # at an optimizer step
        mine = {n: p.grad.detach().cpu().clone() for n, p in self.named_parameters() if p.grad is not None}
        if trainer.world_size == 1:
            return [mine]
        everyone: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(everyone, mine)
        return everyone

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Reseed per micro-batch from (seed, epoch, batch, rank), so a run resumed from any checkpoint, also one taken
        # mid-epoch, draws the same dropout as an uninterrupted run (data randomness is derived from (seed, epoch,
        # index): see EpochShuffleSampler / ResumableDataLoader).
        seed = step_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.current_epoch, batch_idx, self.global_rank)
        if self.device.type == "cpu":  # only the CPU generator draws here; `torch.manual_seed` would also queue
            torch.default_generator.manual_seed(seed)  # lazy CUDA/XPU/MTIA seeding with a stack trace: ~1.5 ms/step
        else:
            torch.manual_seed(seed)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Stop before an optimizer step that would apply a non-finite loss or gradient: `TrainingDiverged` naming
        the step, the micro-batch and the loss term(s). One device sync per optimizer step. Under DDP the gradients are
        already all-reduced here, so every rank stops at the same step. With a GradScaler (fp16) inf gradients are the
        scaler's business (it skips the step); only the losses are checked."""
        records, self._pending_terms = self._pending_terms, []
        # one reduction and one device sync: a non-finite value makes its term, or its tensor's norm, non-finite
        values = [v.detach().float().reshape(-1) for _, _, terms in records for v in terms.values()]
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            if self._guarded is None:  # the parameter list, once (walking the module tree costs ~0.2 ms a step)
                self._guarded = list(self.parameters())
            grads = [p.grad for p in self._guarded if p.grad is not None]
            if grads:
                values.append(torch.stack(torch._foreach_norm(grads)).float())
        if not values or bool(torch.isfinite(torch.cat(values)).all()):
            return
        step = self.trainer.global_step + 1
        bad_terms = [
            f"{name}={float(v):g} (epoch {epoch}, micro-batch {batch_idx})"
            for epoch, batch_idx, terms in records
            for name, v in terms.items()
            if not torch.isfinite(v).all()
        ]
        if bad_terms:
            what = "non-finite loss term " + ", ".join(bad_terms)
        else:
            names = [n for n, p in self.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            last = records[-1] if records else (self.current_epoch, -1, {})
            finite = ", ".join(f"{k}={float(v):.4g}" for k, v in last[2].items())
            what = (
                f"non-finite gradient in {len(names) or 'some'} parameter(s) (e.g. {', '.join(names[:3])}) while the "
                f"loss terms were finite ({finite}; epoch {last[0]}, micro-batch {last[1]})"
            )
        raise TrainingDiverged(
            f"training diverged at optimizer step {step}: {what}. The step was not applied and no checkpoint of a "
            "non-finite state is written; lower model.optimizer.lr, set trainer.gradient_clip_val, or check the data"
        )

    def on_train_epoch_end(self) -> None:
        self._pending_terms = []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Never write non-finite weights (as best, last or any checkpoint); inside an accumulation window also store
        the window's gradients so far (per rank), so the resumed run's next optimizer step is the uninterrupted one."""
        bad = [
            name
            for name, value in checkpoint.get("state_dict", {}).items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
        ]
        if bad:
            raise TrainingDiverged(
                f"training diverged by optimizer step {self.trainer.global_step}: {len(bad)} parameter tensor(s) are "
                f"non-finite (e.g. {', '.join(bad[:3])}); refusing to write this checkpoint"
            )
        partial = self._partial_gradients()
        if partial is not None:
            checkpoint[PARTIAL_GRADS] = partial
