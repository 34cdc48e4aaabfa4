"""CLIP global embeddings in HDF5 (``ClipFeatureReader`` / ``write_clip_hdf5``): dataset ``features`` float (N,D)
and dataset ``ids`` fixed-length bytes ``S{maxlen}`` (N,) holding ``str(image_id)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.features.base import check_finite, hdf5_errors, open_hdf5, read_hdf5_ids, remove_path, tmp_sibling
from vl.errors import DataError


def write_clip_hdf5(path: str | Path, ids: Sequence[str | int], features: np.ndarray) -> None:
    """Write ``features`` float32 (N,D) and ``ids`` as fixed-length bytes ``S{maxlen}`` (N,) to an HDF5 file.

    Written to a temporary sibling then renamed."""
    import h5py

    path = Path(path)
    feats = np.ascontiguousarray(features, dtype=np.float32)
    str_ids = [str(i) for i in ids]
    if feats.ndim != 2 or feats.shape[0] != len(str_ids):
        raise ValueError(f"features {feats.shape} must be (N,D) with N = len(ids) = {len(str_ids)}")
    if len(set(str_ids)) != len(str_ids):
        raise ValueError("ids must be unique")
    encoded = [s.encode() for s in str_ids]
    maxlen = max((len(b) for b in encoded), default=1) or 1
    tmp = tmp_sibling(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feats)
            f.create_dataset("ids", data=np.array(encoded, dtype=f"S{maxlen}"))
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


_IN_MEMORY_LIMIT = 256 * 1024 * 1024


class ClipFeatureReader:
    """Reads CLIP-style global embeddings from HDF5. ``reader[image_id]`` -> float32 (D,).

    ``in_memory``: load ``features`` into RAM on first access (default: when it is at most 256 MiB)."""

    def __init__(self, path: str | Path, *, in_memory: bool | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: CLIP feature HDF5 file not found")
        self.in_memory = in_memory
        self._index: dict[str, int] | None = None
        self._shape: tuple[int, int] | None = None
        self._file: Any = None
        self._features: Any = None  # h5py dataset or in-memory ndarray
        self._pid: int | None = None

    def _open(self) -> Any:
        if self._features is not None and (self._pid == os.getpid() or isinstance(self._features, np.ndarray)):
            self._pid = os.getpid()  # an in-memory array inherited through fork is safe to share
            return self._features
        self._file = self._features = None  # never touch an HDF5 handle inherited through fork
        f = open_hdf5(self.path, ("features", "ids"))
        with hdf5_errors(f, self.path):
            feats, ids = f["features"], f["ids"]
            if feats.ndim != 2:
                raise DataError(f"{self.path}: dataset 'features' has shape {feats.shape}, expected (N, D)")
            if ids.ndim != 1 or ids.shape[0] != feats.shape[0]:
                raise DataError(
                    f"{self.path}: dataset 'ids' has shape {ids.shape} but 'features' has {feats.shape[0]} rows"
                )
            if self._index is None:
                _, self._index = read_hdf5_ids(self.path, ids)
                self._shape = (int(feats.shape[0]), int(feats.shape[1]))
            in_memory = self.in_memory
            if in_memory is None:
                in_memory = feats.size * 4 <= _IN_MEMORY_LIMIT
            if in_memory:
                self._features = np.asarray(feats[()], dtype=np.float32)
                f.close()
            else:
                self._file, self._features = f, feats
        self._pid = os.getpid()
        return self._features

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._features = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = state["_features"] = state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def dim(self) -> int:
        """Embedding size D."""
        self._open()
        assert self._shape is not None
        return self._shape[1]

    def ids(self) -> list[str]:
        """Image ids (str) in row order."""
        self._open()
        assert self._index is not None
        return list(self._index)

    def __len__(self) -> int:
        self._open()
        assert self._index is not None
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        self._open()
        assert self._index is not None
        return str(image_id) in self._index

    def __getitem__(self, image_id: str | int) -> np.ndarray:
        feats = self._open()
        assert self._index is not None
        sid = str(image_id)
        row = self._index.get(sid)
        if row is None:
            raise DataError(f"{self.path}: no image id {sid!r}")
        try:
            out = np.array(feats[row], dtype=np.float32)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read 'features' row {row} for image id {sid!r} ({e})") from None
        check_finite(self.path, sid, "features", out)
        return out
