"""Random draws of one example that do not depend on its batch: masks from (run seed, epoch, example index, row).

A batch-seeded generator makes an example's MLM / region masks depend on which examples share its batch and on the
batch's padded width, so the same command on 2 processes (another batch composition), with gradient accumulation or
another `batch_size_per_device` masked every example differently, and validation metrics on masked inputs (MLM
accuracy, ITM accuracy on masked pairs, `val/loss`) moved with the world size. Here each uniform draw is a
counter-based hash (splitmix64) of the example's key, the position in its own row and a stream number: the same
example gets the same draws at every position in any batch, any padding, any rank. `global_seed` is the run's seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["example_keys", "global_seed", "uniforms"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def global_seed() -> int:
    """The run's seed (`$PL_GLOBAL_SEED`, which `L.seed_everything` sets; 0 without one): data randomness is drawn
    from it with (epoch, index), never from the global RNG."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def example_keys(
    seed: int, epochs: Sequence[int], indices: Sequence[int], rows: Sequence[int] | None = None
) -> np.ndarray:
    """(B,) uint64 keys of (seed, epoch, index, row) per batch row (`rows`: a row's number within its example, e.g.
    a multiple-choice example's choice; 0 by default)."""
    n = len(indices)
    key = _mix(np.full(n, int(seed) & 0xFFFF_FFFF_FFFF_FFFF, dtype=np.uint64) ^ _GOLDEN)
    for part in (epochs, indices, rows if rows is not None else [0] * n):
        key = _mix(key ^ (np.asarray(part, dtype=np.int64).astype(np.uint64) + _GOLDEN))
    return key


def uniforms(keys: np.ndarray, length: int, stream: int) -> np.ndarray:
    """(B, length) float64 uniforms in [0, 1): entry (b, j) a function of (keys[b], j, stream) only."""
    counters = np.arange(length, dtype=np.uint64) + np.uint64(stream) * np.uint64(1 << 32)
    x = _mix(keys[:, None] ^ _mix(counters * _GOLDEN + _GOLDEN)[None, :])
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
