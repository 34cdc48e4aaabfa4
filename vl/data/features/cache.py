"""A decoded-item cache in front of any region-feature reader (`CachedRegions`).

Reading an image's regions costs far more than using them: an LMDB or FRCNN-JSON record is base64 float32, decoded on
every access (~5 ms of a ~30 ms tiny training step on CPU, measured by `bench/loader.py`), and a corpus reads each
image once per question or caption about it. The cache keeps decoded items, least recently used out first, up to a
byte budget per process (`data.feature_cache_mb`; 0 turns it off). Values are unchanged: each access returns the
cached arrays marked read-only (no copy: copying a 32-image batch's items cost ~1 ms of a ~12 ms tiny step), so a consumer that writes into
one fails at once (`ValueError: assignment destination is read-only`) instead of changing what the next example sees;
a consumer that must change an array copies it first. A pickled cache (DataLoader workers, DDP processes) starts
empty in its new process.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["CachedRegions", "ReaderView", "cached"]


def _nbytes(item: dict[str, Any]) -> int:
    return sum(v.nbytes for v in item.values() if isinstance(v, np.ndarray)) + 256


def _frozen(item: dict[str, Any]) -> dict[str, Any]:
    """A new dict of `item`'s values, its arrays as read-only views (the dict itself may be changed by the caller)."""
    out = {}
    for k, v in item.items():
        if isinstance(v, np.ndarray):
            v = v.view()
            v.flags.writeable = False
        out[k] = v
    return out


class ReaderView:
    """Base of a wrapper around a region reader: `in`, `len` and every other attribute (`path`, `ids()`) pass
    through; a subclass changes `reader[image_id]`."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __getitem__(self, image_id: str | int) -> dict[str, Any]:
        return self.reader[image_id]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getattr__(self, name: str) -> Any:
        if name == "reader":  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.reader, name)


class CachedRegions(ReaderView):
    """`reader[image_id]` through an LRU of decoded items of at most `max_bytes`; everything else of the reader
    (`path`, `ids()`, `in`, `len`) passes through."""

    def __init__(self, reader: Any, max_bytes: int) -> None:
        super().__init__(reader)
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __getitem__(self, image_id: str | int) -> dict[str, Any]:
        sid = str(image_id)
        item = self._items.get(sid)
        if item is not None:
            self._items.move_to_end(sid)
            self.hits += 1
            return dict(item)
        self.misses += 1
        item = self.reader[sid]
        size = _nbytes(item)
        if size <= self.max_bytes:
            item = _frozen(item)
            self._items[sid] = dict(item)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= _nbytes(old)
        return item

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._items or image_id in self.reader

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_items"], state["_bytes"], state["hits"], state["misses"] = OrderedDict(), 0, 0, 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def cached(reader: Any, megabytes: float) -> Any:
    """`reader` behind a `CachedRegions` of `megabytes` MiB, or `reader` itself when `megabytes` <= 0."""
    return CachedRegions(reader, int(megabytes * 2**20)) if megabytes and megabytes > 0 else reader
