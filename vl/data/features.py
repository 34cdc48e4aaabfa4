"""Precomputed image-feature readers and writers.

- Region features, ViLBERT LMDB layout (``RegionFeatureReader`` / ``write_region_lmdb``): key ``b"keys"`` -> pickled
  list of image-id bytes; key ``str(image_id).encode()`` -> pickled dict ``{"image_id", "image_h", "image_w",
  "num_boxes", "boxes": b64 float32 (N,4) x1y1x2y2 px, "features": b64 float32 (N,D), ["cls_prob": b64 float32 (N,C)]}``.
- CLIP global embeddings, HDF5 (``ClipFeatureReader`` / ``write_clip_hdf5``): dataset ``features`` float (N,D) and
  dataset ``ids`` fixed-length bytes ``S{maxlen}`` (N,) holding ``str(image_id)``.

Readers open their file lazily, once per process (the handle is dropped when pickled and reopened when the pid changes),
so they can be handed to DataLoader workers and DDP processes. Every failure raises ``vl.errors.DataError`` naming the
file (and the image id / field).
"""

from __future__ import annotations

import base64
import binascii
import os
import pickle
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.errors import DataError

__all__ = [
    "RegionFeatureReader",
    "ClipFeatureReader",
    "write_region_lmdb",
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
        if not isinstance(rec, dict):
            raise DataError(f"{self.path}: record for image id {sid!r} is a {type(rec).__name__}, expected a dict")
        for field in ("image_h", "image_w", "num_boxes", "boxes", "features"):
            if field not in rec:
                raise DataError(f"{self.path}: record for image id {sid!r} has no {field!r}")
        n = int(rec["num_boxes"])
        w, h = int(rec["image_w"]), int(rec["image_h"])
        boxes = self._decode(rec["boxes"], n, 4, sid, "boxes")
        features = self._decode(rec["features"], n, None, sid, "features")
        cls_prob = rec.get("cls_prob")
        if cls_prob is not None:
            cls_prob = self._decode(cls_prob, n, None, sid, "cls_prob")
        if w <= 0 or h <= 0:
            raise DataError(f"{self.path}: record for image id {sid!r} has image size {w}x{h}")
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
            "num_boxes": n,
        }

    def _decode(self, value: Any, n: int, cols: int | None, sid: str, field: str) -> np.ndarray:
        """base64 float32 (or a raw array) -> writable float32 (n, cols); cols inferred when None."""
        if isinstance(value, np.ndarray):
            flat = value.astype(np.float32).reshape(-1)
        else:
            try:
                buf = base64.b64decode(value)
            except (binascii.Error, TypeError, ValueError) as e:
                raise DataError(f"{self.path}: image id {sid!r} field {field!r} is not valid base64 ({e})") from None
            if len(buf) % 4:
                raise DataError(f"{self.path}: image id {sid!r} field {field!r} has {len(buf)} bytes, not float32s")
            flat = np.frombuffer(bytearray(buf), dtype=np.float32)
        if n == 0:
            if flat.size:
                raise DataError(f"{self.path}: image id {sid!r} field {field!r} has data but num_boxes=0")
            return flat.reshape(0, cols or 0)
        if flat.size % n or (cols is not None and flat.size != n * cols):
            want = f"{n}x{cols}" if cols is not None else f"a multiple of num_boxes={n}"
            raise DataError(
                f"{self.path}: image id {sid!r} field {field!r} has {flat.size} floats, expected {want} (truncated?)"
            )
        return flat.reshape(n, flat.size // n)


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
