"""Samplers that make data randomness a function of (seed, epoch, index) and evaluation shards exact."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vl.data.draws import global_seed  # noqa: F401  (re-exported: the run's seed)

log = logging.getLogger(__name__)

__all__ = [
    "global_seed",
    "split_key",
    "EpochShuffleSampler",
    "AlternatingStepSampler",
    "step_micro_batches",
    "ResumableDataLoader",
    "UnpaddedDistributedSampler",
    "GroupedEvalSampler",
    "IndexBatches",
    "eval_batches",
]


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


def step_micro_batches(n: int, micro_batch: int, accumulation: int) -> list[list[int]]:
    """How `AlternatingStepSampler` cuts one rank's `n` examples of one block into optimizer steps: a list of steps,
    each the sizes of its `accumulation` micro-batches. Full steps are `accumulation` x `micro_batch`; the remainder
    (the seed loader's last, smaller batch) is one more step split into `accumulation` near-equal micro-batches, or,
    when it has fewer examples than micro-batches, joins the step before it (near-equal micro-batches of at most
    `micro_batch` + 1). Every example is in exactly one micro-batch and no micro-batch is empty, so Lightning's
    accumulation (every `accumulation` micro-batches) ends each step exactly where one block's step ends."""
    if n < accumulation:
        raise ValueError(f"{n} examples cannot fill the {accumulation} micro-batches of one optimizer step")
    per_step = micro_batch * accumulation
    full, tail = divmod(n, per_step)
    steps = [[micro_batch] * accumulation for _ in range(full)]
    if tail:
        if tail < accumulation:  # too few for a step of their own (full >= 1 here, as n >= accumulation)
            steps.pop()
            tail += per_step
        steps.append([tail // accumulation + (i < tail % accumulation) for i in range(accumulation)])
    return steps


class AlternatingStepSampler(EpochShuffleSampler):
    """One optimizer step per block in turn, each block with its own shuffle of the same examples: ViLBERT's
    multi-task loop (vilbert_beta `train_tasks.py`), where VCR Q->A and QA->R are two tasks with two shuffled loaders
    over the same questions and every iteration takes one batch, one backward and one optimizer step per task.

    Yields one key per micro-batch (use it with `batch_size=None`): `(epoch, block, indices)`, the dataset turning it
    into that block's examples. Epoch e: block b's order is the `b`-th `randperm` of a generator seeded with
    `seed + e` (block 0's is `EpochShuffleSampler`'s order), padded and sharded over ranks as `DistributedSampler`
    does; each rank cuts its share into steps (`step_micro_batches`); then step s of block 0, step s of block 1, ...
    for s = 0, 1, ..., every step `accumulation` consecutive micro-batches, so Lightning's accumulation window is one
    block's step (the global step = the seed's batch s of that task: ranks hold interleaved shares of it). The epoch
    has `len(self)` micro-batches = blocks x steps x accumulation; `resume_at` skips micro-batches (the loader's
    `batch_size` is None, so `ResumableDataLoader` counts them), and `layout` is part of the loader's saved position.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int,
        rank: int,
        seed: int,
        micro_batch: int,
        accumulation: int = 1,
        blocks: int = 2,
        shuffle: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.micro_batch = int(micro_batch)
        self.accumulation = int(accumulation)
        self.blocks = int(blocks)
        self.steps = step_micro_batches(self.num_samples, self.micro_batch, self.accumulation)

    @property
    def layout(self) -> dict[str, int]:
        """What a saved position (micro-batches consumed) means: the per-device batch and the accumulation."""
        return {"batch_size": self.micro_batch, "accumulation": self.accumulation, "blocks": self.blocks}

    def __len__(self) -> int:
        return self.blocks * len(self.steps) * self.accumulation

    def block_orders(self, epoch: int) -> list[list[int]]:
        """This rank's share of each block's order in `epoch` (padded to equal shares as `DistributedSampler`)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        orders = []
        for _ in range(self.blocks):
            order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
            order += (order * (self.total_size // max(1, n) + 1))[: self.total_size - n]
            orders.append(order[self.rank : self.total_size : self.num_replicas])
        return orders

    def micro_batches(self, epoch: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """Every key of `epoch`, in order."""
        orders = self.block_orders(epoch)
        keys = []
        starts = [0] * self.blocks
        for sizes in self.steps:
            for block, order in enumerate(orders):
                for size in sizes:
                    keys.append((epoch, block, tuple(order[starts[block] : starts[block] + size])))
                    starts[block] += size
        return keys

    def __iter__(self) -> Iterator[tuple[int, int, tuple[int, ...]]]:  # type: ignore[override]
        epoch = self.epoch
        skip = self.resume_at[1] if self.resume_at is not None and self.resume_at[0] == epoch else 0
        self.resume_at = None
        return iter(self.micro_batches(epoch)[skip:])


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

    def layout(self) -> dict[str, int]:
        """What a saved position means: the per-device batch size and the number of processes (an
        `AlternatingStepSampler` adds its micro-batch size and accumulation: this loader then hands out its keys one
        micro-batch at a time, `batch_size=None`)."""
        return {
            "batch_size": int(self.batch_size or 1),
            "num_replicas": int(getattr(self.sampler, "num_replicas", 1)),
            **getattr(self.sampler, "layout", {}),
        }

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._consumed, **self.layout()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, EpochShuffleSampler):  # e.g. overfit_batches swaps in a sequential sampler
            return
        now = self.layout()
        # a key only one side has (the step sampler's: a separate-steps position in a plain loader) differs too
        keys = (set(now) | set(state)) - {"epoch", "batches"}
        saved = {key: int(state.get(key, 0)) for key in sorted(keys)}
        now = {key: int(now.get(key, 0)) for key in sorted(keys)}
        if saved != now:
            log.warning(
                "resume: the checkpoint's loader position is for %s, this run has %s; epoch %s restarts at its first "
                "batch",
                saved,
                now,
                state.get("epoch"),
            )
            return
        self._resume = (int(state["epoch"]), int(state["batches"]))
        # sampler positions: examples, or micro-batch keys when the loader does not batch (`batch_size=None`)
        self.sampler.resume_at = (self._resume[0], self._resume[1] * int(self.batch_size or 1))


class _ContinuingIterator:
    """`ContinuingDataLoader`'s one iterator: pass after pass of the loader (pass p: sampler epoch p), counting the
    batches handed out in the current pass; a saved position is applied when the first pass starts."""

    def __init__(self, loader: ContinuingDataLoader) -> None:
        self.loader = loader
        self.inner: Iterator[Any] | None = None

    def __iter__(self) -> _ContinuingIterator:
        return self

    def _start_pass(self, epoch: int, consumed: int = 0) -> None:
        loader = self.loader
        loader._epoch, loader._consumed = epoch, consumed
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)  # after Lightning's set_epoch: the pass's own number
        self.inner = DataLoader.__iter__(loader)

    def __next__(self) -> Any:
        loader = self.loader
        if self.inner is None:
            resume, loader._resume = loader._resume, None
            self._start_pass(*(resume if resume is not None else (loader._epoch, 0)))
        try:
            batch = next(self.inner)  # type: ignore[arg-type]
        except StopIteration:
            self._start_pass(loader._epoch + 1)
            batch = next(self.inner)  # type: ignore[arg-type]
        loader._consumed += 1
        return batch


class ContinuingDataLoader(ResumableDataLoader):
    """A `ResumableDataLoader` that never ends and is not restarted by a new training epoch: every `iter()` returns
    the same iterator, which runs pass after pass of the data (pass p shuffled with sampler epoch p), as the seed's
    ``MultiTaskDataLoader`` keeps its secondary loaders' iterators across epochs (MM-BERT's aux text corpus). Its
    length is at least ``epoch_batches`` (the primary loader's), so a ``min_size`` CombinedLoader's epoch is the
    primary loader's. The position (pass, batches of it) is saved and restored as `ResumableDataLoader`'s, and applies
    whatever the training epoch at resume."""

    epoch_batches = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._live: _ContinuingIterator | None = None

    def __iter__(self) -> _ContinuingIterator:  # type: ignore[override]
        if self._live is None:
            self._live = _ContinuingIterator(self)
        return self._live

    def __len__(self) -> int:
        return max(super().__len__(), int(self.epoch_batches))


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sharding without padding: rank r gets examples r, r + world, ... so every example is scored exactly
    once (torch's DistributedSampler repeats examples to even out the ranks, which would count them twice)."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, epoch_keys: bool = False) -> None:
        """`epoch_keys`: yield `(epoch, index)` keys (the epoch Lightning sets before each evaluation: the fit's epoch,
        0 in a separate test), for a dataset whose evaluation examples vary by epoch as its seed's did."""
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]
        self.epoch_keys = epoch_keys

    def __iter__(self) -> Iterator[Any]:
        indices = range(self.rank, self.total_size, self.num_replicas)
        return iter([(self.epoch, i) for i in indices] if self.epoch_keys else indices)


def eval_batches(indices: Sequence[int], groups: Sequence[int], batch_size: int) -> list[tuple[int, ...]]:
    """Evaluation batches that never mix groups: each group's `indices` (in their order) cut into consecutive chunks
    of at most `batch_size`; the batches ordered by their first example's position. Every index exactly once."""
    position = {int(index): i for i, index in enumerate(indices)}
    by_group: dict[int, list[int]] = {}
    for index in indices:
        by_group.setdefault(int(groups[index]), []).append(int(index))
    batches = [
        tuple(members[start : start + batch_size])
        for members in by_group.values()
        for start in range(0, len(members), batch_size)
    ]
    return sorted(batches, key=lambda batch: position[batch[0]])


class GroupedEvalSampler(DistributedSampler):
    """Val / test batches of one group each (e.g. CLIP-ViL's canvas orientation, so a prediction does not depend on
    what shares its batch): this rank's examples r, r + world, ... (`UnpaddedDistributedSampler`'s share: every
    example scored exactly once over the ranks), cut by `eval_batches`. Yields one tuple of indices per batch: use it
    with `batch_size=None` over `IndexBatches(dataset)`. A DistributedSampler, so Lightning keeps it under DDP."""

    def __init__(
        self, dataset: Dataset, *, groups: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)  # type: ignore[arg-type]
        if len(groups) != n:
            raise ValueError(f"{len(groups)} groups for {n} examples")
        self.num_samples = len(range(rank, n, num_replicas))
        self.total_size = n
        self.batch_size = int(batch_size)
        self.batches = eval_batches(range(rank, n, num_replicas), groups, self.batch_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[int, ...]]:  # type: ignore[override]
        return iter(self.batches)


class IndexBatches(Dataset):
    """`dataset` read a batch at a time: key = a tuple of indices (`GroupedEvalSampler`'s) -> the list of examples,
    which the loader's collate function (`batch_size=None`) turns into the batch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Sequence[int]) -> list[Any]:
        return [self.dataset[index] for index in key]
