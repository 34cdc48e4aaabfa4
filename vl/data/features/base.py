"""What every feature format shares: the base64 float32 array encoding, atomic file replacement, decoding a record
into the one reader output dict, the lazily opened per-process handle, and the HDF5 open / error helpers.

Internal to ``vl.data.features``; import the readers and writers from the package.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vl.errors import DataError

# ------------------------------------------------------------------------------------------------ encoding and files


def encode_array(arr: np.ndarray) -> bytes:
    """float32 C-order bytes of ``arr``, base64-encoded (the LMDB record encoding)."""
    return base64.b64encode(np.ascontiguousarray(arr, dtype=np.float32).tobytes())


def tmp_sibling(path: Path) -> Path:
    """The hidden per-process name a writer fills before renaming it to ``path``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_path(path: Path) -> None:
    """Delete the file, link or directory tree at ``path`` (nothing there is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing whatever is there (directories included)."""
    if final.is_dir() and not final.is_symlink():
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        remove_path(stale)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)


# ------------------------------------------------------------------------------------------------ records -> item


def decode_array(path: Path, value: Any, n: int, cols: int | None, sid: str, field: str) -> np.ndarray:
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


def check_finite(path: Path, sid: str, field: str, arr: np.ndarray | None) -> None:
    """DataError naming the file, image id and field when `arr` holds NaN or inf."""
    if arr is not None and arr.size and not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise DataError(f"{path}: image id {sid!r}: {field!r} has {bad} non-finite value(s) (NaN/inf)")


#: how far (pixels) a region box may reach outside its record's image before the record is refused: detectors clip their
#: boxes to the image (bottom-up attention: to [0, w - 1]), so a box further out says the record's image_w / image_h
#: are not the size its boxes were detected at (e.g. features of a resized image), and every normalised box and IoU
#: of that image would be wrong
BOX_SLACK_PX = 1.0


def check_boxes_inside(path: Path, sid: str, boxes: np.ndarray, w: int, h: int) -> None:
    """DataError naming the file, image id and first box when a box reaches more than `BOX_SLACK_PX` outside the
    record's image [0, w] x [0, h], or has x2 < x1 / y2 < y1."""
    if not boxes.size:
        return
    limit = np.array([w, h, w, h], dtype=np.float64) + BOX_SLACK_PX
    b = boxes.astype(np.float64)
    bad = (b < -BOX_SLACK_PX).any(1) | (b > limit).any(1) | (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: image id {sid!r}: field 'boxes' row {i} = {[round(float(v), 2) for v in b[i]]} is not an x1y1x2y2 "
            f"box inside the record's image ({w}x{h}, image_w x image_h; {int(bad.sum())} such box(es)): the boxes "
            "were detected on an image of another size, or the size fields are wrong"
        )


def normalise_boxes(boxes: np.ndarray, w: float, h: float) -> np.ndarray:
    """(N, 4) x1y1x2y2 pixel boxes -> the readers' ``boxes_norm``: / (w, h, w, h), clipped to [0, 1], float32."""
    scale = np.array([w, h, w, h], dtype=np.float32)
    return np.clip(boxes / scale, 0.0, 1.0).astype(np.float32)


def make_item(
    path: Path,
    sid: str,
    features: np.ndarray,
    boxes: np.ndarray,
    cls_prob: np.ndarray | None,
    w: int,
    h: int,
) -> dict[str, Any]:
    """The reader output dict (shared by every format so they agree bit for bit). Non-finite values (NaN/inf, e.g.
    from same-size damage of the file) and boxes outside the record's image (`check_boxes_inside`) are a DataError
    naming the file, image id and field."""
    if w <= 0 or h <= 0:
        raise DataError(f"{path}: record for image id {sid!r} has image size {w}x{h}")
    for field, arr in (("features", features), ("boxes", boxes), ("cls_prob", cls_prob)):
        check_finite(path, sid, field, arr)
    check_boxes_inside(path, sid, boxes, w, h)
    boxes_norm = normalise_boxes(boxes, w, h)
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


def record_to_item(path: Path, sid: str, rec: Any) -> dict[str, Any]:
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
    boxes = decode_array(path, rec["boxes"], n, 4, sid, "boxes")
    features = decode_array(path, rec["features"], n, None, sid, "features")
    cls_prob = rec.get("cls_prob")
    if cls_prob is not None:
        cls_prob = decode_array(path, cls_prob, n, None, sid, "cls_prob")
    return make_item(path, sid, features, boxes, cls_prob, w, h)


# ------------------------------------------------------------------------------------------------ widths agree

#: the per-region fields whose column count must be the same in every record of a file (the padding collate stacks
#: them: a record of another width failed mid-epoch with a numpy broadcast error)
WIDTH_FIELDS = ("features", "cls_prob")


def _columns(arr: Any) -> int | None:
    """The column count of a (N, D) array with rows, else None (a record without boxes fixes no width)."""
    return int(arr.shape[1]) if isinstance(arr, np.ndarray) and arr.ndim == 2 and arr.shape[0] else None


class WriterWidths:
    """A writer's check that every record's `features` / `cls_prob` have the columns of the first record with boxes
    (`check` raises ValueError naming both image ids; the HDF5 writer checks the same against its datasets)."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[str, int]] = {}

    def check(self, sid: str, field: str, arr: np.ndarray | None) -> None:
        cols = _columns(arr)
        if cols is None:
            return
        first_id, want = self.first.setdefault(field, (sid, cols))
        if cols != want:
            raise ValueError(
                f"image {sid!r}: {field} {tuple(arr.shape)} has {cols} columns, the first image ({first_id!r}) "
                f"has {want}; every record of a feature file must have the same width"
            )


class ReaderWidths:
    """A reader's check of each decoded record's `features` / `cls_prob` columns against those of the file's first
    record (`ids()[0]`, read once per reader: a file of 120k images is not scanned at setup); a record of another
    width is a DataError naming the file, the image id and the field. When the first record has no boxes (or cannot
    be read: its own error comes when it is read), the first record with boxes read by this reader is the reference."""

    _first_widths: dict[str, tuple[str, int, bool]] | None = None  # field -> (image id, columns, is the first record)
    _widths_of: str = "file"  # "the file's first record" (or "directory")

    def _read_item(self, image_id: str | int) -> tuple[Path, dict[str, Any]]:
        """(the file the record was read from, the decoded item), unchecked against the first record."""
        raise NotImplementedError

    def _checked_item(self, image_id: str | int) -> dict[str, Any]:
        file, item = self._read_item(image_id)
        sid = item["image_id"]
        if self._first_widths is None:
            try:
                ids = self.ids()  # type: ignore[attr-defined]  # the reader's own
                ref = item if not ids or ids[0] == sid else self._read_item(ids[0])[1]
                is_first = bool(ids)
            except DataError:  # a damaged first record is named when it is read itself; this one is the reference
                ref, is_first = item, False
            first = {f: _columns(ref.get(f)) for f in WIDTH_FIELDS}
            self._first_widths = {f: (str(ref["image_id"]), c, is_first) for f, c in first.items() if c is not None}
        for field in WIDTH_FIELDS:
            cols = _columns(item.get(field))
            if cols is None:
                continue
            first_id, want, is_first = self._first_widths.setdefault(field, (sid, cols, False))
            if cols != want:
                whose = f"the {self._widths_of}'s first record" if is_first else "the first record read"
                raise DataError(
                    f"{file}: image id {sid!r} field {field!r} has {cols} columns, {whose} (image id {first_id!r}) "
                    f"has {want}"
                )
        return item


# ------------------------------------------------------------------------------------------------- lazy handles


class LazyIndex:
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


# ------------------------------------------------------------------------------------------------------------- HDF5


def open_hdf5(path: Path, datasets: Sequence[str], *, where: str = "", hint: str = "", **kwargs: Any) -> Any:
    """Open ``path`` read-only (``kwargs`` go to ``h5py.File``) and check it holds ``datasets``.

    Raises DataError naming the file (``where`` says what was being read, ``hint`` follows a missing-dataset error)."""
    import h5py

    try:
        f = h5py.File(path, "r", **kwargs)
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file{where} ({e})") from None
    with hdf5_errors(f, path, where):
        for name in datasets:
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise DataError(f"{path}: missing dataset {name!r}{hint}")
    return f


@contextmanager
def hdf5_errors(f: Any, path: Path, where: str = "") -> Iterator[None]:
    """Close ``f`` when the block fails; an h5py ``OSError`` becomes a DataError naming ``path``."""
    try:
        yield
    except DataError:
        f.close()
        raise
    except OSError as e:
        f.close()
        raise DataError(f"{path}: cannot read HDF5 data{where} ({e})") from None


def read_hdf5_ids(path: Path, dataset: Any) -> tuple[list[str], dict[str, int]]:
    """The string dataset ``ids`` -> (ids in row order, id -> row). Raises DataError when not strings or repeated."""
    try:
        ids = [str(s) for s in dataset.asstr()[()]]
    except (TypeError, ValueError, OSError) as e:
        raise DataError(f"{path}: dataset 'ids' is not a string dataset ({e})") from None
    index = {s: i for i, s in enumerate(ids)}
    if len(index) != len(ids):
        raise DataError(f"{path}: dataset 'ids' has repeated ids")
    return ids, index
