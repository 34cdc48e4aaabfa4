"""Samplers that make data randomness a function of (seed, epoch, index) and evaluation shards exact."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler

__all__ = ["split_key", "EpochShuffleSampler", "UnpaddedDistributedSampler"]


def split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """Dataset keys are an index, or (epoch, index) from `EpochShuffleSampler`: -> (epoch, index)."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))


class EpochShuffleSampler(DistributedSampler):
    """Shuffles with its own generator seeded by (seed + epoch) and yields `(epoch, index)` keys, so every random
    choice a dataset or collator makes can be derived from (seed, epoch, index) instead of the global RNG.

    This is what makes a run resumed from `last.ckpt` see exactly the batches of an uninterrupted run: Lightning
    creates the first iterator of a resumed fit before any epoch hook runs. Rank-aware (a DistributedSampler), so
    Lightning keeps it under DDP.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        for index in super().__iter__():
            yield (epoch, index)


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sharding without padding: rank r gets examples r, r + world, ... so every example is scored exactly
    once (torch's DistributedSampler repeats examples to even out the ranks, which would count them twice)."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))
