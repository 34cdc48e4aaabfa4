"""Region features in the ViLBERT LMDB layout (``RegionFeatureReader`` / ``write_region_lmdb``).

Key ``b"keys"`` -> pickled list of image-id bytes; key ``str(image_id).encode()`` -> pickled dict ``{"image_id",
"image_h", "image_w", "num_boxes", "boxes": b64 float32 (N,4) x1y1x2y2 px, "features": b64 float32 (N,D),
["cls_prob": b64 float32 (N,C)]}``.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.features.base import (
    ReaderWidths,
    WriterWidths,
    decode_array,
    encode_array,
    record_to_item,
    remove_path,
    replace_path,
    tmp_sibling,
)
from vl.data.formats.safe_pickle import safe_loads
from vl.errors import DataError

KEYS_KEY = b"keys"
_PICKLE_PROTOCOL = 4


def write_region_lmdb(
    path: str | Path,
    records: Iterable[Mapping[str, Any]],
    *,
    map_size: int = 1 << 32,
    commit_every: int = 256,
) -> int:
    """Write region-feature records to an LMDB directory at ``path``; returns the number of records.

    Each record: ``image_id`` (int|str), ``image_h``, ``image_w``, ``boxes`` (N,4) x1y1x2y2 px, ``features`` (N,D),
    optional ``cls_prob`` (N,C); arrays are stored as base64 float32. D and C must be the same in every record with
    boxes (ValueError naming the image ids; the readers batch them). Written to a temporary sibling then renamed,
    so ``path`` is never left half-written. ``map_size`` grows automatically when full.
    """
    import lmdb

    path = Path(path)
    tmp = tmp_sibling(path)
    remove_path(tmp)
    tmp.mkdir(parents=True)
    env = lmdb.open(str(tmp), map_size=map_size, subdir=True, sync=False, meminit=False, map_async=True)
    keys: list[bytes] = []
    seen: set[bytes] = set()
    widths = WriterWidths()
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
            widths.check(str(rec["image_id"]), "features", feats)
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
                widths.check(str(rec["image_id"]), "cls_prob", cls_prob)
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
        remove_path(tmp)
        raise
    env.close()
    lock = tmp / "lock.mdb"
    if lock.exists():
        lock.unlink()
    replace_path(tmp, path)
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
        _drain_pending_releases()
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


#: releases from finalisers that found the registry lock taken: a garbage collection inside `_acquire_env` (e.g. in
#: `lmdb.open`) runs a dropped reader's `__del__` on the thread that holds the lock, which waited on it for ever
_PENDING_RELEASES: list[tuple[int, int]] = []


def _drain_pending_releases() -> None:
    """With the lock held: the releases finalisers deferred."""
    while _PENDING_RELEASES:
        _release_locked(_PENDING_RELEASES.pop())


def _release_locked(key: tuple[int, int] | None) -> None:
    entry = _SHARED_ENVS.get(key) if key is not None else None
    if entry is None or entry[0] != os.getpid():
        return
    entry[2] -= 1
    if entry[2] <= 0:
        del _SHARED_ENVS[key]
        entry[1].close()


def _release_env(key: tuple[int, int] | None, *, finaliser: bool = False) -> None:
    """One reader fewer on `key`; from a finaliser the lock is not waited for: the release is deferred to the next
    acquire / release when it is taken."""
    if not _SHARED_ENVS_LOCK.acquire(blocking=not finaliser):
        if key is not None:
            _PENDING_RELEASES.append(key)
        return
    try:
        _drain_pending_releases()
        _release_locked(key)
    finally:
        _SHARED_ENVS_LOCK.release()


class RegionFeatureReader(ReaderWidths):
    """Reads the ViLBERT region-feature LMDB. ``reader[image_id]`` -> dict:

    ``features`` float32 (N,D), ``boxes`` float32 (N,4) x1y1x2y2 px, ``boxes_norm`` float32 (N,4) in [0,1],
    ``cls_prob`` float32 (N,C) or None, ``image_w``/``image_h``/``num_boxes`` int, ``image_id`` str. A record whose D
    or C differs from the file's first record is a DataError (`ReaderWidths`).
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

    def close(self, *, _finaliser: bool = False) -> None:
        """Release this reader's handle (the shared environment closes with its last reader; reopened on access)."""
        if self._env is not None and self._pid == os.getpid():
            _release_env(self._env_key, finaliser=_finaliser)
        self._env, self._pid, self._env_key = None, None, None

    def __del__(self) -> None:
        try:
            self.close(_finaliser=True)
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
                keys = safe_loads(raw, f"{self.path} key {KEYS_KEY!r}")
                self._ids = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{self.path}: {KEYS_KEY!r} entry is corrupt ({type(e).__name__}: {e})") from None
        return self._ids

    def __len__(self) -> int:
        return len(self.ids())

    def __contains__(self, image_id: object) -> bool:
        key = str(image_id).encode()
        return key != KEYS_KEY and self._get(key) is not None

    def __getitem__(self, image_id: str | int) -> dict[str, Any]:
        return self._checked_item(image_id)

    def _read_item(self, image_id: str | int) -> tuple[Path, dict[str, Any]]:
        sid = str(image_id)
        key = sid.encode()
        raw = None if key == KEYS_KEY else self._get(key)
        if raw is None:
            raise DataError(f"{self.path}: no image id {sid!r}")
        try:
            rec = safe_loads(raw, f"{self.path} image id {sid!r}")
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{self.path}: record for image id {sid!r} is corrupt ({type(e).__name__}: {e})") from None
        return self.path, record_to_item(self.path, sid, rec)

    def _decode(self, value: Any, n: int, cols: int | None, sid: str, field: str) -> np.ndarray:
        """base64 float32 (or a raw array) -> writable float32 (n, cols); cols inferred when None."""
        return decode_array(self.path, value, n, cols, sid, field)
