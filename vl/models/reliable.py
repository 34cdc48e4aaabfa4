"""What makes a `vl` training run safe to stop, resume and trust, as a LightningModule base (`ReliableTraining`) that
`vl.models.system.VLSystem` builds on; every system inherits it.

- **Exact resume.** Dropout is reseeded per micro-batch from (seed, epoch, batch, rank) (`step_seed`), the training
  loader's position is restored from the checkpoint before the first batch is fetched (Lightning restores it too late
  when `configure_optimizers` built the loader first), and a checkpoint taken inside a gradient-accumulation window
  carries every rank's gradients so far (`PARTIAL_GRADS`), so the resumed run's next optimizer step is the one the
  uninterrupted run took.
- **Divergence guard.** Before each optimizer step the loss terms of its micro-batches and the gradients are checked
  in one pass and one device sync (`all_finite`): a non-finite value stops the run with `TrainingDiverged` naming the
  step, the micro-batch and the term (or the parameters), and the step is not applied. A large embedding table whose
  gradient can only come from lookups is checked at the looked-up rows alone (`LookupRows`: the same verdict, without
  reading the whole table: the word embeddings are ~90 % of a tiny BERT's gradient values).
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
from torch.nn import functional as F

from vl.errors import TrainingDiverged

log = logging.getLogger(__name__)

__all__ = ["PARTIAL_GRADS", "ReliableTraining", "all_finite", "step_seed"]

PARTIAL_GRADS = "vl_partial_gradients"  # checkpoint key: per-rank gradients of an unfinished accumulation window
LOOKUP_ROWS_MIN = 1 << 16  # embedding tables of at least this many values are checked by their looked-up rows


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The global-RNG seed of one training micro-batch (a hash: distinct for every (seed, epoch, batch, rank))."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{batch_idx}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def all_finite(tensors: list[torch.Tensor], flags: dict[torch.device, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether every value of `tensors` is finite, in one pass and one sync per device: the kernel GradScaler asks the
    same question with (`_amp_foreach_non_finite_check_and_unscale_`), at scale 1, which leaves every value as it was
    (x * 1 == x bit for bit, NaN and inf included); any floating dtype. One C++ loop over the list, so on CPU it costs
    ~50 us for a tiny BERT's 48 gradients where a norm per tensor + max cost ~160 us (`bench/step_parts.py`); and it
    does not overflow as a norm of large finite values (~1e19 in float32) does. A sparse gradient is checked by its
    coalesced values. `flags`: {device: (found, one)}, kept by the caller between calls."""
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t.coalesce().values() if t.is_sparse else t)
    found_any = []
    for device, group in groups.items():
        if device not in flags:
            flags[device] = (torch.zeros((), device=device), torch.ones((), device=device))
        found, one = flags[device]
        found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
        found_any.append(found)
    return not any(bool(found) for found in found_any)


class _Accumulations:
    """Post-accumulate-grad hook: counts the times autograd added a gradient into each watched parameter."""

    def __init__(self) -> None:
        self.count: dict[int, int] = {}

    def __call__(self, param: torch.Tensor) -> None:
        self.count[id(param)] = self.count.get(id(param), 0) + 1


class LookupRows:
    """The divergence guard's exact shortcut for large embedding tables, over one accumulation window.

    A table's gradient is checked at the rows its lookups read, not in full, when in every backward pass of the window
    its only consumers in the autograd graph are embedding lookups (`EmbeddingBackward0`, whose saved indices give the
    rows), autograd accumulated into it exactly once per such pass (a post-accumulate-grad hook counts: a backward
    pass vl did not see makes the count differ), and it had no gradient when the window began (a gradient restored
    from a checkpoint, or left by other code, is not lookup-shaped; a callback that edits gradients in place after
    the backward pass is not seen). Then every other row of its gradient is exactly
    zero (the lookup backward adds into zeros), so "the looked-up rows are finite" is "the gradient is finite", also
    when summing repeated ids overflows (that sum lands in a looked-up row). Anything else (a tied decoder using the
    weight as a matrix, `torch.compile`, an embedding inside a checkpointed block, several processes, whose
    all-reduced gradients carry the other ranks' rows) checks the whole table, as for every other parameter."""

    def __init__(self, tables: list[nn.Parameter]) -> None:
        self.tables = {id(w): w for w in tables}
        self.accumulated = _Accumulations()
        self.handles = [w.register_post_accumulate_grad_hook(self.accumulated) for w in tables]
        self.reset()

    def reset(self) -> None:
        self.open = False  # a backward pass seen in this window
        self.rows: dict[int, list[torch.Tensor]] = {}
        self.expected: dict[int, int] = {}
        self.dense: set[int] = set()
        self.accumulated.count = {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def note_backward(self, loss: torch.Tensor, *, copy_ids: bool = False) -> None:
        """Before a backward pass of `loss`: each table's consumers in its graph, and the rows of its lookups (the
        batch's own id tensors, or copies when `copy_ids`: inside an accumulation window, so a finished micro-batch's
        memory, e.g. its shared-memory slot from a loader worker, is not held until the window's optimizer step)."""
        if not self.open:
            self.open = True
            self.dense.update(pid for pid, w in self.tables.items() if w.grad is not None)
        if loss.grad_fn is None:
            return
        accumulators = {}
        with torch.enable_grad():
            for pid, w in self.tables.items():
                view = w.view_as(w)  # its grad_fn's next function: the AccumulateGrad node of w, the graph's own
                if pid in self.dense or view.grad_fn is None:  # (a weight frozen since the fit began: not checked here)
                    continue
                accumulators[view.grad_fn.next_functions[0][0]] = pid
        if not accumulators:
            return
        seen = {loss.grad_fn}
        stack = [loss.grad_fn]
        found: dict[int, list[torch.Tensor] | None] = {}
        while stack:
            node = stack.pop()
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                pid = accumulators.get(nxt)
                if pid is not None and found.get(pid, []) is not None:
                    ids = None
                    if type(node).__name__ == "EmbeddingBackward0":
                        try:
                            ids = node._saved_indices.clone() if copy_ids else node._saved_indices
                        except (AttributeError, RuntimeError):
                            ids = None
                    found[pid] = None if ids is None else [*found.get(pid, []), ids]  # type: ignore[list-item]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        for pid, rows in found.items():
            if rows is None:
                self.dense.add(pid)
            else:
                self.rows.setdefault(pid, []).extend(rows)
                self.expected[pid] = self.expected.get(pid, 0) + 1

    def checked_rows(self) -> dict[int, list[torch.Tensor]]:
        """{table id: its gradient's rows at each lookup} for the tables the window lets be checked that way."""
        out = {}
        for pid, w in self.tables.items():
            grad = w.grad
            if (
                grad is None
                or pid in self.dense
                or not self.expected.get(pid)
                or self.expected[pid] != self.accumulated.count.get(pid, 0)
            ):
                continue
            out[pid] = [F.embedding(ids, grad) for ids in self.rows[pid]]  # grad[ids], any shape of ids
        return out


class ReliableTraining(L.LightningModule):
    """Exact resume, the divergence guard and the non-finite checkpoint refusal (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._terms: dict[str, torch.Tensor] = {}  # weighted loss terms of the current training micro-batch
        self._pending_terms: list[tuple[int, int, dict[str, torch.Tensor]]] = []  # since the last optimizer step
        self._guarded: list[nn.Parameter] | None = None  # the parameters the divergence guard checks (at fit start)
        self._lookups: LookupRows | None = None  # its large embedding tables checked by looked-up rows
        self._loader_states: list[Any] = []
        self._partial_grads: list[dict[str, torch.Tensor]] | None = None
        self._finite_flags: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # all_finite's, per device

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # where the training loader stood (ResumableDataLoader.state_dict, saved by Lightning's fit loop)
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = list(fit_state.get("combined_loader") or [])
        self._partial_grads = checkpoint.get(PARTIAL_GRADS)

    def on_train_start(self) -> None:
        self._forget_guarded()  # (re)collected at the first step: a strategy may have wrapped or replaced parameters
        # Lightning only restores loader states when the fit loop builds the train loader after the checkpoint is
        # loaded; `configure_optimizers` (trainer.estimated_stepping_batches) builds it earlier. Apply them here, before
        # the first batch is fetched (ResumableDataLoader creates its iterator at the first fetch).
        states = getattr(self, "_loader_states", None)
        if states:
            # the saved states are Lightning's: one per stateful loader of its CombinedLoader's flattened iterables, in
            # that order (a datamodule's dict / list of loaders, e.g. MM-BERT's {"main": images, "aux": text})
            from lightning.pytorch.utilities import CombinedLoader

            loaders = self.trainer.train_dataloader
            flat = CombinedLoader(loaders).flattened if loaders is not None else []
            stateful = [dl for dl in flat if hasattr(dl, "load_state_dict") and hasattr(dl, "state_dict")]
            if len(stateful) != len(states):
                log.warning(
                    "resume: the checkpoint holds %d training-loader position(s), this run has %d stateful loader(s); "
                    "the epoch restarts at its first batch",
                    len(states),
                    len(stateful),
                )
            else:
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

    def on_train_end(self) -> None:
        self._forget_guarded()

    def _forget_guarded(self) -> None:
        if getattr(self, "_lookups", None) is not None:
            self._lookups.remove()
        self._guarded, self._lookups = None, None

    def _checks_gradients(self) -> bool:
        """Gradients are the guard's to check (with a GradScaler, fp16, inf gradients are the scaler's business)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) is None

    def _collect_guarded(self) -> None:
        """The parameter list, once per fit (walking the module tree costs ~0.2 ms a step), and the embedding tables
        `LookupRows` may check by rows: large, dense, trainable, outside checkpointed blocks, in a single CPU process."""
        self._guarded = list(self.parameters())
        tables: dict[int, nn.Parameter] = {}
        # CPU only: there reading a table costs memory bandwidth the step needs (~0.3 ms for a tiny BERT's 2 M word
        # embedding values); a GPU reads it in microseconds, less than walking the graph in Python costs
        if self.trainer.world_size == 1 and self.device.type == "cpu":
            checkpointed = [m for m in self.modules() if getattr(m, "_vl_checkpointed", False)]
            inside = {id(sub) for block in checkpointed for sub in block.modules()}
            for module in self.modules():
                w = getattr(module, "weight", None)
                if (
                    isinstance(module, nn.Embedding)
                    and not module.sparse
                    and id(module) not in inside
                    and isinstance(w, nn.Parameter)
                    and w.requires_grad
                    and w.numel() >= LOOKUP_ROWS_MIN
                ):
                    tables[id(w)] = w
        self._lookups = LookupRows(list(tables.values())) if tables else None

    def on_before_backward(self, loss: torch.Tensor) -> None:
        if self._trainer is None or not self._checks_gradients():
            return
        if self._guarded is None:
            self._collect_guarded()
        if self._lookups is not None:
            self._lookups.note_backward(loss, copy_ids=self.trainer.accumulate_grad_batches > 1)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Stop before an optimizer step that would apply a non-finite loss or gradient: `TrainingDiverged` naming
        the step, the micro-batch and the loss term(s). One device sync per optimizer step. Under DDP the gradients are
        already all-reduced here, so every rank stops at the same step. With a GradScaler (fp16) inf gradients are the
        scaler's business (it skips the step); only the losses are checked."""
        records, self._pending_terms = self._pending_terms, []
        # one check over the loss terms (a stacked copy: the check runs in place) and the gradients (all_finite)
        terms = [v.detach() for _, _, step_terms in records for v in step_terms.values()]
        tensors = [torch.stack(terms)] if terms else []
        if self._checks_gradients():
            if self._guarded is None:
                self._collect_guarded()
            rows: dict[int, list[torch.Tensor]] = {}
            if self._lookups is not None:
                rows = self._lookups.checked_rows()
                self._lookups.reset()
            tensors += [p.grad for p in self._guarded if p.grad is not None and id(p) not in rows]  # type: ignore[union-attr]
            tensors += [r for gathered in rows.values() for r in gathered]
        if all_finite(tensors, self._finite_flags):
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
