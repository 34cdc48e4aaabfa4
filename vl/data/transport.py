"""Batches from DataLoader workers through reusable shared-memory slots (`SlotCollate`), instead of one new shared
segment and one file descriptor per tensor per batch.

PyTorch's worker path moves every tensor of a batch into a fresh shared-memory segment in the worker and sends its
file descriptor to the training process, which fetches each descriptor from the worker's resource-sharer socket:
~10 tensors a batch cost the training process 3.4 ms a batch (median, default VQA batch, measured by hand on 2
cores), a quarter of a tiny training step and more than collating the batch in-process. Here each worker owns a few
shared byte buffers ("slots"), allocated on first use and sent to the training process once; a batch's tensors are
packed into a free slot of the worker and only a small descriptor travels through the result queue. The training
process unpickles the descriptor into views of the slot's bytes (no copy); the slot is free again when the last
tensor of that batch is freed (the views' storage holds a finalizer), so a batch the training loop keeps is never
overwritten. A worker that finds all its slots held sends its batch the ordinary way: slower, never wrong. Measured
(`bench/loader.py --workers 1`): receiving a batch costs the training process ~0.45 ms instead of 3.4 ms.

Only the top level of a dict batch is packed (contiguous-or-not dense CPU tensors without grad); every other value
(strings, nested structures) travels by ordinary pickling. Off in the training process itself (`num_workers=0`):
nothing is transported there. `data.worker_slots=false` restores PyTorch's own path.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["SLOTS_PER_WORKER", "SlotCollate", "worker_collate"]

_ALIGN = 64  # bytes: every packed tensor starts on a cache line (and any dtype's alignment)
_HEADER = _ALIGN  # slot bytes [0, 8): int64 state (0 free, 1 holds an unreceived batch)
_FREE, _FULL = 0, 1
#: the training process's received slots: (worker pid, worker token, slot index, generation) -> the slot's uint8 tensor
_RECEIVED: OrderedDict[tuple[int, str, int, int], np.ndarray] = OrderedDict()
_RECEIVED_LOCK = threading.Lock()
_RECEIVED_MAX = 4096  # a bound, not a working size: ended workers' slots are dropped as new ones arrive


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _state(slot: torch.Tensor) -> torch.Tensor:
    return slot[:8].view(torch.int64)


def _packable(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.device.type == "cpu"
        and value.layout == torch.strided
        and not value.requires_grad
        and not value.is_nested
        and not value.is_quantized
        and not value.is_complex()
    )


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) is a test only on POSIX
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(state: np.ndarray) -> None:
    state[0] = _FREE


def _unpack(
    key: tuple[int, str, int, int],
    slot: torch.Tensor | None,
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int]],
    used: int,
    rest: dict[str, Any],
    order: list[str],
) -> dict[str, Any]:
    """Runs in the receiving process when a `_Packed` descriptor is unpickled: the batch, as views of its slot that
    free the slot when the last of them is gone."""
    with _RECEIVED_LOCK:  # loaders' pin-memory threads may unpickle at the same time
        if slot is not None:  # a new slot (rare): drop the same slot's smaller predecessor and those of ended workers
            for old in [k for k in _RECEIVED if k[:3] == key[:3] or not _alive(k[0])]:
                del _RECEIVED[old]
            _RECEIVED[key] = slot.numpy()
            while len(_RECEIVED) > _RECEIVED_MAX:
                _RECEIVED.popitem(last=False)
        memory = _RECEIVED.get(key)
        if memory is None:
            raise RuntimeError(
                f"DataLoader worker batch refers to shared slot {key} that this process never received (or dropped "
                f"after {_RECEIVED_MAX} slots); set data.worker_slots=false"
            )
        _RECEIVED.move_to_end(key)
    state = memory[:8].view(np.int64)
    if state[0] != _FULL:
        raise RuntimeError(f"DataLoader worker slot {key} holds no batch (state {state[0]}): refusing a stale read")
    if used:
        view = memory[_HEADER : _HEADER + used]
        # the tensor's storage keeps `view` alive; when the last tensor of the batch is freed, so is `view`, and the
        # worker may write the slot again
        weakref.finalize(view, _release, state)
        data = torch.frombuffer(view, dtype=torch.uint8)
        del view
    else:
        state[0] = _FREE
        data = torch.empty(0, dtype=torch.uint8)
    tensors = {
        name: data[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, dtype, shape, offset in layout
    }
    return {name: tensors[name] if name in tensors else rest[name] for name in order}


class _Packed:
    """What a worker sends instead of the batch: where its tensors lie in a slot (and the slot itself the first time)."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]:
        return _unpack, self.args


class SlotCollate:
    """`collate_fn` for a DataLoader with workers: in a worker, the batch `collate_fn(examples)` packed into one of
    `slots` reusable shared-memory slots of that worker (see the module docstring); in the main process, the batch
    itself."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], *, slots: int = 5) -> None:
        if slots < 1:
            raise ValueError(f"SlotCollate: slots must be >= 1, got {slots}")
        self.collate_fn = collate_fn
        self.slots = int(slots)
        self._token: tuple[int, str] | None = None
        self._buffers: list[torch.Tensor | None] = []
        self._generation: list[int] = []
        self._next = 0
        self.fallbacks = 0  # batches this worker sent the ordinary way (all its slots held)

    def __call__(self, examples: list[Any]) -> Any:
        batch = self.collate_fn(examples)
        if get_worker_info() is None or type(batch) is not dict:  # another mapping type would come back a dict
            return batch
        return self.pack(batch)

    def pack(self, batch: Mapping[str, Any]) -> Any:
        """The worker side: `batch` written into the next slot, as a `_Packed` descriptor (or `batch` itself)."""
        if self._token is None or self._token[0] != os.getpid():  # first call in this worker process
            self._token = (os.getpid(), uuid.uuid4().hex)
            self._buffers, self._generation, self._next = [None] * self.slots, [0] * self.slots, 0
        tensors, rest, seen = [], {}, {}
        for name, value in batch.items():
            if _packable(value):
                tensors.append((name, value))
            else:
                rest[name] = value
        if not tensors:
            return batch
        for step in range(self.slots):  # the next free slot (a batch the consumer keeps holds its slot)
            index = (self._next + step) % self.slots
            slot = self._buffers[index]
            if slot is None or int(_state(slot)) == _FREE:
                break
        else:
            self.fallbacks += 1
            return batch
        self._next = index + 1
        layout, offset = [], 0
        for name, value in tensors:
            if id(value) in seen:  # one tensor under two keys: packed once (aliasing kept)
                layout.append((name, value.dtype, tuple(value.shape), seen[id(value)]))
                continue
            seen[id(value)] = offset
            layout.append((name, value.dtype, tuple(value.shape), offset))
            offset += _aligned(value.numel() * value.element_size())
        used = offset
        send = None
        if slot is None or slot.numel() < _HEADER + used:
            slot = torch.zeros(_HEADER + _aligned(used + used // 4), dtype=torch.uint8).share_memory_()
            self._buffers[index] = send = slot
            self._generation[index] += 1
        for name, dtype, shape, start in layout:
            value = batch[name]
            nbytes = value.numel() * value.element_size()
            if nbytes:
                slot[_HEADER + start : _HEADER + start + nbytes].view(dtype).view(shape).copy_(value)
        _state(slot).fill_(_FULL)
        key = (*self._token, index, self._generation[index])
        return _Packed(key, send, layout, used, rest, list(batch))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_token"], state["_buffers"], state["_generation"], state["_next"] = None, [], [], 0
        return state


#: slots per worker: PyTorch's default 2 batches in flight, the one the step uses, the one Lightning fetched ahead,
#: and one spare for a batch the loop holds a little longer
SLOTS_PER_WORKER = 2 + 3


def worker_collate(
    collate_fn: Callable[[list[Any]], Any], *, num_workers: int, slots: bool = True
) -> Callable[[list[Any]], Any]:
    """`collate_fn` wrapped in a `SlotCollate` of `SLOTS_PER_WORKER` slots when batches come from workers
    (`num_workers > 0` and `slots`), else `collate_fn` itself."""
    if num_workers <= 0 or not slots:
        return collate_fn
    return SlotCollate(collate_fn, slots=SLOTS_PER_WORKER)
