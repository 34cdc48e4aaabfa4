"""Samplers that make data randomness a function of (seed, epoch, index) and evaluation shards exact."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)

__all__ = ["global_seed", "split_key", "EpochShuffleSampler", "ResumableDataLoader", "UnpaddedDistributedSampler"]


def global_seed() -> int:
    """The run's seed (`$PL_GLOBAL_SEED`, which `L.seed_everything` sets; 0 without one): data randomness is drawn
    from it with (epoch, index), never from the global RNG."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """Dataset keys are an index, or (epoch, index) from `EpochShuffleSampler`: -> (epoch, index)."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))


class EpochShuffleSampler(DistributedSampler):
    """Shuffles with its own generator seeded by (seed + epoch) and yields `(epoch, index)` keys, so every random
    choice a dataset or collator makes can be derived from (seed, epoch, index) instead of the global RNG.

    This is what makes a run resumed from `last.ckpt` see exactly the batches of an uninterrupted run; a mid-epoch
    resume skips the micro-batches the checkpoint's `ResumableDataLoader` state says were consumed (`resume_at`).
    Rank-aware (a DistributedSampler), so Lightning keeps it under DDP.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_at: tuple[int, int] | None = None  # (epoch, indices of this rank's order already consumed)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        skip = self.resume_at[1] if self.resume_at is not None and self.resume_at[0] == epoch else 0
        self.resume_at = None
        for position, index in enumerate(super().__iter__()):
            if position >= skip:
                yield (epoch, index)


class _CountingIterator:
    """Creates the loader's iterator at the first `next()` (after Lightning's `set_epoch`, also with workers, whose
    prefetching reads the sampler at creation) and counts the batches handed out."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.inner: Iterator[Any] | None = None

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        loader = self.loader
        if self.inner is None:
            loader._epoch = int(getattr(loader.sampler, "epoch", 0))
            resume, loader._resume = loader._resume, None
            loader._consumed = resume[1] if resume is not None and resume[0] == loader._epoch else 0
            self.inner = DataLoader.__iter__(loader)
        batch = next(self.inner)
        loader._consumed += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A training DataLoader whose position is part of the checkpoint: Lightning's fit loop stores `state_dict()` (the
    epoch and how many micro-batches of it were handed to the training loop); on resume `VLSystem.on_train_start`
    calls `load_state_dict()` before the first fetch, and the `EpochShuffleSampler` skips exactly those micro-batches
    of that epoch's order (every rank skips the same number of its own batches). Counting happens in the main process,
    at the consumer, so worker prefetching does not shift it. A resume with another per-device batch size or world
    size restarts the epoch (with a warning): the position would not mean the same examples."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._consumed = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> _CountingIterator:  # type: ignore[override]
        return _CountingIterator(self)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "batches": self._consumed,
            "batch_size": int(self.batch_size or 1),
            "num_replicas": int(getattr(self.sampler, "num_replicas", 1)),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, EpochShuffleSampler):  # e.g. overfit_batches swaps in a sequential sampler
            return
        saved = (int(state.get("batch_size", 0)), int(state.get("num_replicas", 0)))
        now = (int(self.batch_size or 1), int(self.sampler.num_replicas))
        if saved != now:
            log.warning(
                "resume: the checkpoint's loader position is for per-device batch %d x %d processes, this run has "
                "%d x %d; epoch %s restarts at its first batch",
                *saved,
                *now,
                state.get("epoch"),
            )
            return
        self._resume = (int(state["epoch"]), int(state["batches"]))
        self.sampler.resume_at = (self._resume[0], self._resume[1] * int(self.batch_size or 1))


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sharding without padding: rank r gets examples r, r + world, ... so every example is scored exactly
    once (torch's DistributedSampler repeats examples to even out the ranks, which would count them twice)."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))
