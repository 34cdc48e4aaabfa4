"""Precomputed image-feature readers and writers.

- Region features, ViLBERT LMDB layout (``RegionFeatureReader`` / ``write_region_lmdb``): key ``b"keys"`` -> pickled
  list of image-id bytes; key ``str(image_id).encode()`` -> pickled dict ``{"image_id", "image_h", "image_w",
  "num_boxes", "boxes": b64 float32 (N,4) x1y1x2y2 px, "features": b64 float32 (N,D), ["cls_prob": b64 float32 (N,C)]}``.
- Region features, one HDF5 file (``HDF5RegionReader`` / ``write_region_hdf5``): flat ``features`` / ``boxes`` /
  ``cls_prob`` rows plus per-image ``ids`` / ``offsets`` / ``num_boxes`` / ``image_w`` / ``image_h`` (see the class).
- Region features, MM-BERT / bottom-up-attention per-image Faster R-CNN JSON with base64 arrays, as a directory of
  ``<image_id>.json`` or a JSONL file (``FrcnnJsonRegionReader`` / ``write_region_json``).
- ``open_region_features(path)`` picks the region reader from what ``path`` is; all three return the same dict.
  ``python -m vl.data.convert`` converts TSV / LMDB / HDF5 / JSON (see ``vl.data.convert``).
- CLIP global embeddings, HDF5 (``ClipFeatureReader`` / ``write_clip_hdf5``): dataset ``features`` float (N,D) and
  dataset ``ids`` fixed-length bytes ``S{maxlen}`` (N,) holding ``str(image_id)``.

Readers open their file lazily, once per process (the handle is dropped when pickled and reopened when the pid changes),
so they can be handed to DataLoader workers and DDP processes. Every failure raises ``vl.errors.DataError`` naming the
file (and the image id / field).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import pickle
import re
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.errors import DataError

__all__ = [
    "RegionFeatureReader",
    "HDF5RegionReader",
    "FrcnnJsonRegionReader",
    "RegionReader",
    "open_region_features",
    "ClipFeatureReader",
    "write_region_lmdb",
    "write_region_hdf5",
    "write_region_json",
    "write_clip_hdf5",
    "encode_array",
]

KEYS_KEY = b"keys"
_PICKLE_PROTOCOL = 4


def encode_array(arr: np.ndarray) -> bytes:
    """float32 C-order bytes of ``arr``, base64-encoded (the LMDB record encoding)."""
    return base64.b64encode(np.ascontiguousarray(arr, dtype=np.float32).tobytes())


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing whatever is there (directories included)."""
    if final.is_dir() and not final.is_symlink():
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        _remove(stale)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)


# ------------------------------------------------------------------------------------------------------ region LMDB


def write_region_lmdb(
    path: str | Path,
    records: Iterable[Mapping[str, Any]],
    *,
    map_size: int = 1 << 32,
    commit_every: int = 256,
) -> int:
    """Write region-feature records to an LMDB directory at ``path``; returns the number of records.

    Each record: ``image_id`` (int|str), ``image_h``, ``image_w``, ``boxes`` (N,4) x1y1x2y2 px, ``features`` (N,D),
    optional ``cls_prob`` (N,C); arrays are stored as base64 float32. Written to a temporary sibling then renamed,
    so ``path`` is never left half-written. ``map_size`` grows automatically when full.
    """
    import lmdb

    path = Path(path)
    tmp = _tmp_sibling(path)
    _remove(tmp)
    tmp.mkdir(parents=True)
    env = lmdb.open(str(tmp), map_size=map_size, subdir=True, sync=False, meminit=False, map_async=True)
    keys: list[bytes] = []
    seen: set[bytes] = set()
    pending: list[tuple[bytes, bytes]] = []

    def flush() -> None:
        nonlocal env
        while True:
            try:
                with env.begin(write=True) as txn:
                    for k, v in pending:
                        txn.put(k, v)
                break
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
        pending.clear()

    try:
        for rec in records:
            key = str(rec["image_id"]).encode()
            if key == KEYS_KEY or key in seen:
                raise ValueError(f"duplicate or reserved image id {rec['image_id']!r}")
            seen.add(key)
            boxes = np.asarray(rec["boxes"], dtype=np.float32)
            feats = np.asarray(rec["features"], dtype=np.float32)
            n = boxes.shape[0]
            if boxes.shape != (n, 4) or feats.ndim != 2 or feats.shape[0] != n:
                raise ValueError(
                    f"image {rec['image_id']!r}: boxes {boxes.shape} / features {feats.shape} are not (N,4) / (N,D)"
                )
            value: dict[str, Any] = {
                "image_id": rec["image_id"],
                "image_h": int(rec["image_h"]),
                "image_w": int(rec["image_w"]),
                "num_boxes": int(n),
                "boxes": encode_array(boxes),
                "features": encode_array(feats),
            }
            if rec.get("cls_prob") is not None:
                cls_prob = np.asarray(rec["cls_prob"], dtype=np.float32)
                if cls_prob.ndim != 2 or cls_prob.shape[0] != n:
                    raise ValueError(f"image {rec['image_id']!r}: cls_prob {cls_prob.shape} is not (N,C) with N={n}")
                value["cls_prob"] = encode_array(cls_prob)
            pending.append((key, pickle.dumps(value, protocol=_PICKLE_PROTOCOL)))
            keys.append(key)
            if len(pending) >= commit_every:
                flush()
        pending.append((KEYS_KEY, pickle.dumps(keys, protocol=_PICKLE_PROTOCOL)))
        flush()
        env.sync(True)
    except BaseException:
        env.close()
        _remove(tmp)
        raise
    env.close()
    lock = tmp / "lock.mdb"
    if lock.exists():
        lock.unlink()
    _replace(tmp, path)
    return len(keys)


# LMDB forbids opening one environment twice in a process (py-lmdb raises "already open in this process"), so all
# readers of one data file share a single read-only environment per process, reference-counted. Entries inherited
# through fork belong to the parent: the child closes them (only its own mapping) and opens its own.
_SHARED_ENVS: dict[tuple[int, int], list[Any]] = {}  # (st_dev, st_ino) -> [pid, env, refcount, bytes]
_SHARED_ENVS_LOCK = threading.Lock()


def _reset_lock_after_fork() -> None:
    global _SHARED_ENVS_LOCK
    _SHARED_ENVS_LOCK = threading.Lock()  # the parent's lock may have been held by another thread at fork time


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def _drop_inherited_envs() -> None:
    pid = os.getpid()
    for key, (owner, env, *_) in list(_SHARED_ENVS.items()):
        if owner != pid:
            del _SHARED_ENVS[key]
            try:
                env.close()
            except Exception:  # noqa: BLE001
                pass


def _acquire_env(path: Path, data_file: Path) -> tuple[tuple[int, int], Any]:
    """Open (or share) the read-only environment at ``path`` -> (registry key, env). Raises DataError."""
    import lmdb

    try:
        st = data_file.stat()
    except OSError as e:
        raise DataError(f"{data_file}: not a readable LMDB ({e.strerror})") from None
    key = (st.st_dev, st.st_ino)
    with _SHARED_ENVS_LOCK:
        _drop_inherited_envs()
        entry = _SHARED_ENVS.get(key)
        if entry is None:
            try:
                env = lmdb.open(
                    str(path),
                    subdir=path.is_dir(),
                    readonly=True,
                    lock=False,
                    readahead=False,
                    meminit=False,
                    max_readers=512,
                )
            except lmdb.Error as e:
                raise DataError(f"{data_file}: not a readable LMDB ({type(e).__name__}: {e})") from None
            try:
                needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
            except lmdb.Error as e:
                env.close()
                raise DataError(f"{data_file}: not a readable LMDB ({type(e).__name__}: {e})") from None
            if st.st_size < needed:  # reading past EOF of the mmap would kill the process (SIGBUS)
                env.close()
                raise DataError(f"{data_file}: LMDB is truncated ({st.st_size} bytes, needs {needed})")
            entry = _SHARED_ENVS[key] = [os.getpid(), env, 0, needed]
        elif st.st_size < entry[3]:
            raise DataError(f"{data_file}: LMDB was truncated while open ({st.st_size} bytes, needs {entry[3]})")
        entry[2] += 1
        return key, entry[1]


def _release_env(key: tuple[int, int] | None) -> None:
    with _SHARED_ENVS_LOCK:
        entry = _SHARED_ENVS.get(key) if key is not None else None
        if entry is None or entry[0] != os.getpid():
            return
        entry[2] -= 1
        if entry[2] <= 0:
            del _SHARED_ENVS[key]
            entry[1].close()


class RegionFeatureReader:
    """Reads the ViLBERT region-feature LMDB. ``reader[image_id]`` -> dict:

    ``features`` float32 (N,D), ``boxes`` float32 (N,4) x1y1x2y2 px, ``boxes_norm`` float32 (N,4) in [0,1],
    ``cls_prob`` float32 (N,C) or None, ``image_w``/``image_h``/``num_boxes`` int, ``image_id`` str.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: region feature LMDB not found")
        self._env: Any = None
        self._env_key: tuple[int, int] | None = None
        self._pid: int | None = None
        self._ids: list[str] | None = None

    # -- process-local handle ---------------------------------------------------------------------------------------
    def _data_file(self) -> Path:
        return self.path / "data.mdb" if self.path.is_dir() else self.path

    def _open(self) -> Any:
        if self._env is not None and self._pid == os.getpid():
            return self._env
        self._env = None  # a handle inherited through fork is never used here
        self._env_key, self._env = _acquire_env(self.path, self._data_file())
        self._pid = os.getpid()
        return self._env

    def _get(self, key: bytes) -> bytes | None:
        import lmdb

        env = self._open()
        try:
            with env.begin(buffers=False) as txn:
                return txn.get(key)
        except lmdb.Error as e:
            raise DataError(
                f"{self._data_file()}: LMDB read failed for key {key!r} ({type(e).__name__}: {e})"
            ) from None

    def close(self) -> None:
        """Release this reader's handle (the shared environment closes with its last reader; reopened on access)."""
        if self._env is not None and self._pid == os.getpid():
            _release_env(self._env_key)
        self._env, self._pid, self._env_key = None, None, None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser (e.g. at interpreter shutdown)
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_env"], state["_pid"], state["_env_key"] = None, None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- mapping interface ------------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Image ids (str) in the order of the ``b"keys"`` entry."""
        if self._ids is None:
            raw = self._get(KEYS_KEY)
            if raw is None:
                raise DataError(f"{self.path}: LMDB has no {KEYS_KEY!r} entry (list of image ids)")
            try:
                keys = pickle.loads(raw)
                self._ids = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{self.path}: {KEYS_KEY!r} entry is corrupt ({type(e).__name__}: {e})") from None
        return self._ids

    def __len__(self) -> int:
        return len(self.ids())

    def __contains__(self, image_id: object) -> bool:
        key = str(image_id).encode()
        return key != KEYS_KEY and self._get(key) is not None

    def __getitem__(self, image_id: str | int) -> dict[str, Any]:
        sid = str(image_id)
        key = sid.encode()
        raw = None if key == KEYS_KEY else self._get(key)
        if raw is None:
            raise DataError(f"{self.path}: no image id {sid!r}")
        try:
            rec = pickle.loads(raw)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{self.path}: record for image id {sid!r} is corrupt ({type(e).__name__}: {e})") from None
        return _record_to_item(self.path, sid, rec)

    def _decode(self, value: Any, n: int, cols: int | None, sid: str, field: str) -> np.ndarray:
        """base64 float32 (or a raw array) -> writable float32 (n, cols); cols inferred when None."""
        return _decode_array(self.path, value, n, cols, sid, field)


def _decode_array(path: Path, value: Any, n: int, cols: int | None, sid: str, field: str) -> np.ndarray:
    """base64 float32 (or an array / nested list) -> writable float32 (n, cols); cols inferred when None."""
    if isinstance(value, np.ndarray | list):
        try:
            flat = np.asarray(value, dtype=np.float32).reshape(-1).copy()
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: image id {sid!r} field {field!r} is not a numeric array ({e})") from None
    else:
        try:
            buf = base64.b64decode(value)
        except (binascii.Error, TypeError, ValueError) as e:
            raise DataError(f"{path}: image id {sid!r} field {field!r} is not valid base64 ({e}; truncated?)") from None
        if len(buf) % 4:
            raise DataError(f"{path}: image id {sid!r} field {field!r} has {len(buf)} bytes, not float32s (truncated?)")
        flat = np.frombuffer(bytearray(buf), dtype=np.float32)
    if n == 0:
        if flat.size:
            raise DataError(f"{path}: image id {sid!r} field {field!r} has data but num_boxes=0")
        return flat.reshape(0, cols or 0)
    if flat.size % n or (cols is not None and flat.size != n * cols):
        want = f"{n}x{cols}" if cols is not None else f"a multiple of num_boxes={n}"
        raise DataError(
            f"{path}: image id {sid!r} field {field!r} has {flat.size} floats, expected {want} (truncated?)"
        )
    return flat.reshape(n, flat.size // n)


def _make_item(
    path: Path,
    sid: str,
    features: np.ndarray,
    boxes: np.ndarray,
    cls_prob: np.ndarray | None,
    w: int,
    h: int,
) -> dict[str, Any]:
    """The reader output dict (shared by every format so they agree bit for bit)."""
    if w <= 0 or h <= 0:
        raise DataError(f"{path}: record for image id {sid!r} has image size {w}x{h}")
    scale = np.array([w, h, w, h], dtype=np.float32)
    boxes_norm = np.clip(boxes / scale, 0.0, 1.0).astype(np.float32)
    return {
        "image_id": sid,
        "features": features,
        "boxes": boxes,
        "boxes_norm": boxes_norm,
        "cls_prob": cls_prob,
        "image_w": w,
        "image_h": h,
        "num_boxes": int(boxes.shape[0]),
    }


def _record_to_item(path: Path, sid: str, rec: Any) -> dict[str, Any]:
    """Decode an LMDB / FRCNN-JSON record dict (base64 or array fields) into the reader output dict."""
    if not isinstance(rec, dict):
        raise DataError(f"{path}: record for image id {sid!r} is a {type(rec).__name__}, expected a dict")
    for field in ("image_h", "image_w", "num_boxes", "boxes", "features"):
        if field not in rec:
            raise DataError(f"{path}: record for image id {sid!r} has no {field!r}")
    try:
        n, w, h = int(rec["num_boxes"]), int(rec["image_w"]), int(rec["image_h"])
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: record for image id {sid!r} has a non-integer size field ({e})") from None
    if n < 0:
        raise DataError(f"{path}: record for image id {sid!r} has num_boxes={n}")
    boxes = _decode_array(path, rec["boxes"], n, 4, sid, "boxes")
    features = _decode_array(path, rec["features"], n, None, sid, "features")
    cls_prob = rec.get("cls_prob")
    if cls_prob is not None:
        cls_prob = _decode_array(path, cls_prob, n, None, sid, "cls_prob")
    return _make_item(path, sid, features, boxes, cls_prob, w, h)


# -------------------------------------------------------------------------------------------------------- CLIP HDF5


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
    tmp = _tmp_sibling(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feats)
            f.create_dataset("ids", data=np.array(encoded, dtype=f"S{maxlen}"))
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
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
        import h5py

        self._file = self._features = None  # never touch an HDF5 handle inherited through fork
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise DataError(f"{self.path}: not a readable HDF5 file ({e})") from None
        try:
            for name in ("features", "ids"):
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    raise DataError(f"{self.path}: missing dataset {name!r}")
            feats, ids = f["features"], f["ids"]
            if feats.ndim != 2:
                raise DataError(f"{self.path}: dataset 'features' has shape {feats.shape}, expected (N, D)")
            if ids.ndim != 1 or ids.shape[0] != feats.shape[0]:
                raise DataError(
                    f"{self.path}: dataset 'ids' has shape {ids.shape} but 'features' has {feats.shape[0]} rows"
                )
            if self._index is None:
                try:
                    names = ids.asstr()[()]
                except (TypeError, ValueError, OSError) as e:
                    raise DataError(f"{self.path}: dataset 'ids' is not a string dataset ({e})") from None
                index = {str(s): i for i, s in enumerate(names)}
                if len(index) != len(names):
                    raise DataError(f"{self.path}: dataset 'ids' has repeated ids")
                self._index = index
                self._shape = (int(feats.shape[0]), int(feats.shape[1]))
            in_memory = self.in_memory
            if in_memory is None:
                in_memory = feats.size * 4 <= _IN_MEMORY_LIMIT
            if in_memory:
                self._features = np.asarray(feats[()], dtype=np.float32)
                f.close()
            else:
                self._file, self._features = f, feats
        except DataError:
            f.close()
            raise
        except OSError as e:
            f.close()
            raise DataError(f"{self.path}: cannot read HDF5 data ({e})") from None
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
            return np.array(feats[row], dtype=np.float32)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read 'features' row {row} for image id {sid!r} ({e})") from None


# ------------------------------------------------------------------------------------------------------ region HDF5

HDF5_FORMAT = "vl-region-features"
HDF5_VERSION = 1
_HDF5_PER_IMAGE = ("ids", "offsets", "num_boxes", "image_w", "image_h")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _chunk_rows(cols: int, target_bytes: int) -> int:
    return max(1, min(1 << 16, target_bytes // (4 * max(1, cols))))


def write_region_hdf5(path: str | Path, records: Iterable[Mapping[str, Any]], *, flush_bytes: int = 32 << 20) -> int:
    """Write region-feature records to one HDF5 file (layout in ``HDF5RegionReader``); returns the number of images.

    Records as for ``write_region_lmdb``; ``cls_prob`` must be given for all images with boxes or for none. Streams:
    the flat datasets grow as records arrive (buffered ``flush_bytes`` at a time). Written to a temporary sibling, then
    renamed.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    _remove(tmp)
    ids: list[bytes] = []
    seen: set[bytes] = set()
    offsets: list[int] = []
    counts: list[int] = []
    widths: list[int] = []
    heights: list[int] = []
    buf: dict[str, list[np.ndarray]] = {"features": [], "boxes": [], "cls_prob": []}
    buffered = 0
    total = 0
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = HDF5_FORMAT
            f.attrs["version"] = HDF5_VERSION
            dsets: dict[str, Any] = {}

            def create(dim: int, classes: int | None) -> None:
                for name, cols in (("features", dim), ("boxes", 4), ("cls_prob", classes)):
                    if cols is not None:
                        rows = _chunk_rows(cols, 64 * 1024 if name == "boxes" else 256 * 1024)
                        dsets[name] = f.create_dataset(
                            name, (0, cols), np.float32, maxshape=(None, cols or None), chunks=(rows, max(1, cols))
                        )

            def flush() -> None:
                nonlocal buffered
                for name, parts in buf.items():
                    if not parts:
                        continue
                    block = np.concatenate(parts, axis=0)
                    ds = dsets[name]
                    start = ds.shape[0]
                    ds.resize(start + block.shape[0], axis=0)
                    ds[start:] = block
                    parts.clear()
                buffered = 0

            for rec in records:
                sid = str(rec["image_id"])
                key = sid.encode()
                if not key or key in seen:
                    raise ValueError(f"duplicate or empty image id {rec['image_id']!r}")
                seen.add(key)
                boxes = np.asarray(rec["boxes"], dtype=np.float32)
                feats = np.asarray(rec["features"], dtype=np.float32)
                n = boxes.shape[0] if boxes.ndim == 2 else -1
                if boxes.shape != (n, 4) or feats.ndim != 2 or feats.shape[0] != n:
                    raise ValueError(
                        f"image {sid!r}: boxes {boxes.shape} / features {feats.shape} are not (N,4) / (N,D)"
                    )
                cls = rec.get("cls_prob")
                if cls is not None:
                    cls = np.asarray(cls, dtype=np.float32)
                    if cls.ndim != 2 or cls.shape[0] != n:
                        raise ValueError(f"image {sid!r}: cls_prob {cls.shape} is not (N,C) with N={n}")
                if n:  # images without boxes add no rows (and fix neither D nor whether cls_prob is present)
                    if not dsets:
                        create(feats.shape[1], None if cls is None else cls.shape[1])
                    if feats.shape[1] != dsets["features"].shape[1]:
                        raise ValueError(f"image {sid!r}: features {feats.shape} differ in D from earlier images")
                    if (cls is not None) != ("cls_prob" in dsets):
                        raise ValueError(f"image {sid!r}: cls_prob must be given for every image or for none")
                    if cls is not None:
                        if cls.shape[1] != dsets["cls_prob"].shape[1]:
                            raise ValueError(f"image {sid!r}: cls_prob {cls.shape} differs in C from earlier images")
                        buf["cls_prob"].append(cls)
                    buf["features"].append(feats)
                    buf["boxes"].append(boxes)
                ids.append(key)
                offsets.append(total)
                counts.append(n)
                widths.append(int(rec["image_w"]))
                heights.append(int(rec["image_h"]))
                total += n
                buffered += feats.nbytes
                if buffered >= flush_bytes:
                    flush()
            if not dsets:  # no records, or none with boxes
                create(0, None)
            flush()
            maxlen = max((len(k) for k in ids), default=1)
            f.create_dataset("ids", data=np.array(ids, dtype=f"S{maxlen}"))
            f.create_dataset("offsets", data=np.array(offsets, dtype=np.int64))
            f.create_dataset("num_boxes", data=np.array(counts, dtype=np.int32))
            f.create_dataset("image_w", data=np.array(widths, dtype=np.int32))
            f.create_dataset("image_h", data=np.array(heights, dtype=np.int32))
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return len(ids)


class _LazyIndex:
    """Shared behaviour: an id -> row dict built once (kept when pickled), a handle opened once per process."""

    path: Path
    _index: dict[str, int] | None
    _pid: int | None

    def _ensure(self) -> None:  # opens the per-process handle and builds the index if needed
        raise NotImplementedError

    def _drop_handle(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release this process's file handle (reopened on the next access)."""
        if self._pid == os.getpid():
            self._drop_handle()
        self._pid = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pid"] = None
        for k in self._HANDLE_FIELDS:  # type: ignore[attr-defined]
            state[k] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _row(self, image_id: object) -> tuple[str, int]:
        self._ensure()
        assert self._index is not None
        sid = str(image_id)
        row = self._index.get(sid)
        if row is None:
            raise DataError(f"{self.path}: no image id {sid!r}")
        return sid, row

    def __len__(self) -> int:
        return len(self.ids())

    def __contains__(self, image_id: object) -> bool:
        self._ensure()
        assert self._index is not None
        return str(image_id) in self._index


class HDF5RegionReader(_LazyIndex):
    """Reads region features from one HDF5 file. ``reader[image_id]`` -> the same dict as ``RegionFeatureReader``.

    Layout (S images, R = sum of their boxes; written by ``write_region_hdf5``)::

        attrs   format = "vl-region-features", version = 1       (optional when reading)
        ids         bytes S{maxlen} (S,)  str(image_id), unique
        offsets     int64 (S,)            first row of image s in the flat datasets
        num_boxes   int32 (S,)            N_s; image s owns rows offsets[s] : offsets[s] + N_s
        image_w     int32 (S,)            pixels
        image_h     int32 (S,)
        features    float (R, D)          any float dtype, returned as float32
        boxes       float (R, 4)          x1y1x2y2 in pixels
        cls_prob    float (R, C)          optional (all images or none)

    The per-image datasets are loaded once (id -> row dict, kept when pickled); the file is opened read-only lazily,
    once per process, so the reader can be handed to DataLoader workers and DDP processes.
    """

    _HANDLE_FIELDS = ("_file", "_dsets")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: region feature HDF5 file not found")
        self._index: dict[str, int] | None = None
        self._ids: list[str] | None = None
        self._meta: np.ndarray | None = None  # int64 (S, 4): offset, num_boxes, image_w, image_h
        self._rows = 0
        self._file: Any = None
        self._dsets: tuple[Any, Any, Any] | None = None  # features, boxes, cls_prob | None
        self._pid: int | None = None

    def _drop_handle(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._dsets = None

    def _ensure(self, sid: str | None = None) -> Any:
        if self._file is not None and self._pid == os.getpid():
            return self._file
        import h5py

        self._file = self._dsets = None  # never touch an HDF5 handle inherited through fork
        where = f" (reading image id {sid!r})" if sid is not None else ""
        try:
            f = h5py.File(self.path, "r", locking=False)  # read-only; file locks fail on some cluster filesystems
        except OSError as e:
            raise DataError(f"{self.path}: not a readable HDF5 file{where} ({e})") from None
        try:
            for name in (*_HDF5_PER_IMAGE, "features", "boxes"):
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    raise DataError(f"{self.path}: missing dataset {name!r} (not a vl region-feature HDF5 file?)")
            feats, boxes = f["features"], f["boxes"]
            if feats.ndim != 2 or boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != feats.shape[0]:
                raise DataError(f"{self.path}: 'features' {feats.shape} / 'boxes' {boxes.shape} are not (R,D) / (R,4)")
            if "cls_prob" in f and (f["cls_prob"].ndim != 2 or f["cls_prob"].shape[0] != feats.shape[0]):
                raise DataError(f"{self.path}: 'cls_prob' {f['cls_prob'].shape} is not (R,C) with R={feats.shape[0]}")
            if self._index is None:
                n_images = f["ids"].shape[0] if f["ids"].ndim == 1 else -1
                for name in _HDF5_PER_IMAGE:
                    if f[name].shape != (n_images,):
                        raise DataError(f"{self.path}: dataset {name!r} has shape {f[name].shape}, expected (S,)")
                try:
                    ids = [str(s) for s in f["ids"].asstr()[()]]
                except (TypeError, ValueError, OSError) as e:
                    raise DataError(f"{self.path}: dataset 'ids' is not a string dataset ({e})") from None
                index = {s: i for i, s in enumerate(ids)}
                if len(index) != len(ids):
                    raise DataError(f"{self.path}: dataset 'ids' has repeated ids")
                meta = np.stack([np.asarray(f[k][()], dtype=np.int64) for k in _HDF5_PER_IMAGE[1:]], axis=1)
                self._ids, self._index, self._meta = ids, index, meta.reshape(len(ids), 4)
                self._rows = int(feats.shape[0])
        except DataError:
            f.close()
            raise
        except OSError as e:
            f.close()
            raise DataError(f"{self.path}: cannot read HDF5 data{where} ({e})") from None
        self._file, self._pid = f, os.getpid()
        self._dsets = (feats, boxes, f["cls_prob"] if "cls_prob" in f else None)
        return f

    def ids(self) -> list[str]:
        """Image ids (str) in file order."""
        self._ensure()
        assert self._ids is not None
        return self._ids

    @property
    def dim(self) -> int:
        """Feature size D."""
        return int(self._ensure()["features"].shape[1])

    def __getitem__(self, image_id: str | int) -> dict[str, Any]:
        self._ensure(str(image_id))
        sid, row = self._row(image_id)
        assert self._meta is not None and self._dsets is not None
        feats_ds, boxes_ds, cls_ds = self._dsets
        off, n, w, h = (int(v) for v in self._meta[row])
        if off < 0 or n < 0 or off + n > self._rows:
            raise DataError(
                f"{self.path}: image id {sid!r} owns rows {off}:{off + n} but the flat datasets have {self._rows} rows"
                " (truncated?)"
            )
        try:
            features = np.asarray(feats_ds[off : off + n], dtype=np.float32)
            boxes = np.asarray(boxes_ds[off : off + n], dtype=np.float32)
            cls_prob = None if cls_ds is None else np.asarray(cls_ds[off : off + n], dtype=np.float32)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read rows {off}:{off + n} for image id {sid!r} ({e})") from None
        return _make_item(self.path, sid, features, boxes, cls_prob, w, h)


# ------------------------------------------------------------------------------------------- region FRCNN JSON

_JSON_ID_RE = re.compile(rb'(?<!\\)"image_id"\s*:\s*(?:"((?:[^"\\]|\\.)*)"|(-?\d+))')
_JSON_IN_MEMORY_LIMIT = 256 * 1024 * 1024


class FrcnnJsonRegionReader(_LazyIndex):
    """Reads MM-BERT / bottom-up-attention per-image Faster R-CNN JSON records (``data/generate_tsv_v2.py``)::

        {"image_id", "image_h", "image_w", "num_boxes", "boxes": b64 float32 (N,4) x1y1x2y2 px,
         "features": b64 float32 (N,D), "classes": b64 float32 (N,1601), "attrs": b64 float32 (N,401)}

    ``classes`` (or ``cls_prob``) becomes ``cls_prob``; ``attrs`` is ignored. Arrays may also be plain JSON lists.
    ``path`` is one of:

    - a directory of ``<image_id>.json`` files, one record each (MM-BERT's ``*_frcnn/``). The id is the file name
      stem; an all-digit stem is also found by its integer value (``00001234.json`` <- ``1234``) and ``ids()`` lists
      that value. The files are indexed by listing the directory once.
    - a JSONL file (``.jsonl`` or ``.json``), one record a line: indexed once by byte offset (the ``image_id`` is found
      without decoding the arrays), records are read with ``os.pread`` from a handle opened once per process.
    - a ``.json`` file holding one record or a list of records (loaded into memory; for small files).

    MM-BERT's *annotation* JSONL (``val_frcnn.json``: ``{"image", "caption_en", "caption_de", "frcnn"}``) holds no
    features; it is rejected with a DataError that points at the per-image directory its ``frcnn`` field names.
    """

    _HANDLE_FIELDS = ("_fd",)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: FRCNN JSON features not found")
        self._mode = "dir" if self.path.is_dir() else "file"
        self._index: dict[str, int] | None = None
        self._ids: list[str] | None = None
        self._files: list[str] | None = None  # dir mode: file name per row
        self._spans: np.ndarray | None = None  # JSONL mode: int64 (S, 2) byte offset, length
        self._records: list[dict[str, Any]] | None = None  # whole-file mode
        self._fd: int | None = None
        self._pid: int | None = None

    # -- index ------------------------------------------------------------------------------------------------------
    def _build_dir_index(self) -> None:
        names = sorted(e.name for e in os.scandir(self.path) if e.name.endswith(".json") and e.is_file())
        if not names:
            raise DataError(f"{self.path}: directory has no .json files (expected one <image_id>.json per image)")
        stems = [n[: -len(".json")] for n in names]
        canonical = [str(int(s)) if s.isdigit() else s for s in stems]
        order = sorted(
            range(len(names)),
            key=lambda i: (not stems[i].isdigit(), int(stems[i]) if stems[i].isdigit() else 0, stems[i]),
        )
        self._files = [names[i] for i in order]
        self._ids = [canonical[i] for i in order]
        index: dict[str, int] = {}
        for row, i in enumerate(order):
            if canonical[i] in index:
                raise DataError(f"{self.path}: {names[i]} and {self._files[index[canonical[i]]]} are the same image id")
            index[canonical[i]] = row
        for row, i in enumerate(order):
            index.setdefault(stems[i], row)  # the zero-padded spelling too
        self._index = index

    def _build_file_index(self) -> None:
        with open(self.path, "rb") as f:
            head = f.read(1 << 16).lstrip()
            if not head:
                raise DataError(f"{self.path}: file is empty")
            f.seek(0)
            if head[:1] == b"[":
                self._load_whole(f.read())
                return
            ids: list[str] = []
            spans: list[tuple[int, int]] = []
            offset = 0
            for lineno, line in enumerate(f, 1):
                start, length = offset, len(line)
                offset += length
                if not line.strip():
                    continue
                sid = self._line_id(line, lineno)
                if sid is None:  # first line is not a complete object: a pretty-printed single record
                    f.seek(0)
                    self._load_whole(f.read())
                    return
                ids.append(sid)
                spans.append((start, length))
        self._set_index(ids)
        self._spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)

    def _line_id(self, line: bytes, lineno: int) -> str | None:
        """The record's image id (found without decoding its arrays), or None when line 1 is not a whole object."""
        m = _JSON_ID_RE.search(line) if lineno > 1 else None
        if m is not None:
            return m.group(2).decode() if m.group(2) is not None else str(json.loads(b'"' + m.group(1) + b'"'))
        try:
            obj = json.loads(line)  # line 1 is always parsed, to tell JSONL from a pretty-printed document
        except ValueError:
            if lineno == 1:
                return None
            raise DataError(f"{self.path}: line {lineno} is not a JSON record with an 'image_id'") from None
        self._check_feature_record(obj, f"line {lineno}")
        return str(obj["image_id"])

    def _check_feature_record(self, obj: Any, where: str) -> None:
        if isinstance(obj, dict) and "image_id" in obj:
            return
        if isinstance(obj, dict) and "frcnn" in obj:
            frcnn = str(obj["frcnn"]).replace(".zip@", "")
            raise DataError(
                f"{self.path}: {where} is an MM-BERT annotation record (keys {sorted(obj)}) with no features; open "
                f"the directory of per-image Faster R-CNN JSON files its 'frcnn' field names (here {frcnn!r}) instead"
            )
        raise DataError(f"{self.path}: {where} is not a Faster R-CNN feature record (no 'image_id')")

    def _load_whole(self, data: bytes) -> None:
        if len(data) > _JSON_IN_MEMORY_LIMIT:
            raise DataError(f"{self.path}: a {len(data) >> 20} MiB JSON document; write one record per line (JSONL)")
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise DataError(f"{self.path}: not valid JSON or JSONL ({e}; truncated?)") from None
        records = obj if isinstance(obj, list) else [obj]
        for i, rec in enumerate(records):
            self._check_feature_record(rec, f"record {i}")
        self._records = records
        self._set_index([str(r["image_id"]) for r in records])

    def _set_index(self, ids: list[str]) -> None:
        index = {s: i for i, s in enumerate(ids)}
        if len(index) != len(ids):
            dup = next(s for s in ids if ids.count(s) > 1)
            raise DataError(f"{self.path}: image id {dup!r} appears more than once")
        self._ids, self._index = ids, index

    # -- handle -----------------------------------------------------------------------------------------------------
    def _drop_handle(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None

    def _ensure(self) -> None:
        if self._index is None:
            if self._mode == "dir":
                self._build_dir_index()
            else:
                self._build_file_index()
        if self._spans is not None and (self._fd is None or self._pid != os.getpid()):
            self._fd = None  # never use a descriptor inherited through fork (it is closed by its owner)
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise DataError(f"{self.path}: cannot open ({e.strerror})") from None
        self._pid = os.getpid()

    # -- mapping interface ------------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Image ids (str): file order (JSONL / list), or numeric-then-lexicographic stem order (directory)."""
        self._ensure()
        assert self._ids is not None
        return self._ids

    def __getitem__(self, image_id: str | int) -> dict[str, Any]:
        sid, row = self._row(image_id)
        if self._records is not None:
            return self._to_item(self.path, sid, self._records[row])
        if self._files is not None:
            file = self.path / self._files[row]
            try:
                data = file.read_bytes()
            except OSError as e:
                raise DataError(f"{file}: cannot read the record for image id {sid!r} ({e.strerror})") from None
        else:
            file = self.path
            assert self._spans is not None and self._fd is not None
            off, length = (int(v) for v in self._spans[row])
            data = os.pread(self._fd, length, off)
            if len(data) != length:
                raise DataError(f"{file}: record for image id {sid!r} is cut short (file changed or truncated)")
        try:
            rec = json.loads(data)
        except ValueError as e:
            raise DataError(f"{file}: record for image id {sid!r} is not valid JSON ({e}; truncated?)") from None
        return self._to_item(file, sid, rec)

    @staticmethod
    def _to_item(file: Path, sid: str, rec: Any) -> dict[str, Any]:
        if isinstance(rec, dict) and rec.get("cls_prob") is None and "classes" in rec:
            rec = {**rec, "cls_prob": rec["classes"]}
        return _record_to_item(file, sid, rec)


def write_region_json(
    out_dir: str | Path, records: Iterable[Mapping[str, Any]], *, classes_key: str = "classes"
) -> int:
    """Write one per-image FRCNN JSON file ``out_dir/<image_id>.json`` per record (base64 float32 arrays;
    ``cls_prob`` is stored under ``classes_key``). Written into a temporary sibling directory then renamed."""
    out_dir = Path(out_dir)
    tmp = _tmp_sibling(out_dir)
    _remove(tmp)
    tmp.mkdir(parents=True)
    count = 0
    try:
        for rec in records:
            sid = str(rec["image_id"])
            if not sid or "/" in sid or sid.startswith("."):
                raise ValueError(f"image id {sid!r} cannot be a file name")
            boxes = np.asarray(rec["boxes"], dtype=np.float32)
            feats = np.asarray(rec["features"], dtype=np.float32)
            value: dict[str, Any] = {
                "image_id": rec["image_id"],
                "image_h": int(rec["image_h"]),
                "image_w": int(rec["image_w"]),
                "num_boxes": int(boxes.shape[0]),
                "boxes": encode_array(boxes).decode(),
                "features": encode_array(feats).decode(),
            }
            if rec.get("cls_prob") is not None:
                value[classes_key] = encode_array(rec["cls_prob"]).decode()
            path = tmp / f"{sid}.json"
            if path.exists():
                raise ValueError(f"duplicate image id {sid!r}")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(value, f)
            count += 1
        _replace(tmp, out_dir)
    except BaseException:
        _remove(tmp)
        raise
    return count


# ---------------------------------------------------------------------------------------------------------- factory

RegionReader = RegionFeatureReader | HDF5RegionReader | FrcnnJsonRegionReader


def open_region_features(path: str | Path) -> RegionReader:
    """Open region features in whichever supported format ``path`` is. All readers give the same ``reader[id]`` dict.

    - a directory holding ``data.mdb``, a ``*.lmdb`` directory, or a ``.lmdb``/``.mdb`` file -> ``RegionFeatureReader``
    - ``.h5`` / ``.hdf5`` / ``.hdf`` file (or any file with the HDF5 signature) -> ``HDF5RegionReader``
    - a directory of ``.json`` files, or a ``.json`` / ``.jsonl`` file -> ``FrcnnJsonRegionReader``
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: region features not found")
    suffix = p.suffix.lower()
    if p.is_dir():
        if (p / "data.mdb").is_file() or suffix == ".lmdb":
            return RegionFeatureReader(p)
        if any(e.name.endswith(".json") for e in os.scandir(p)):
            return FrcnnJsonRegionReader(p)
        raise DataError(f"{p}: directory is neither an LMDB (no data.mdb) nor a directory of per-image .json files")
    if suffix in (".lmdb", ".mdb"):
        return RegionFeatureReader(p)
    if suffix in (".h5", ".hdf5", ".hdf"):
        return HDF5RegionReader(p)
    if suffix in (".json", ".jsonl"):
        return FrcnnJsonRegionReader(p)
    if suffix in (".tsv", ".csv"):
        raise DataError(
            f"{p}: a bottom-up-attention TSV is not read directly; convert it first with "
            f"`python -m vl.data.convert tsv2lmdb {p} OUT.lmdb`"
        )
    try:
        with open(p, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    if magic == _HDF5_SIGNATURE:
        return HDF5RegionReader(p)
    raise DataError(
        f"{p}: cannot tell the region-feature format (expected an LMDB directory, .h5/.hdf5, or FRCNN .json/.jsonl)"
    )
