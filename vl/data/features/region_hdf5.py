"""Region features in one HDF5 file, the vl layout (``HDF5RegionReader`` / ``write_region_hdf5``): flat
``features`` / ``boxes`` / ``cls_prob`` rows plus per-image ``ids`` / ``offsets`` / ``num_boxes`` / ``image_w`` /
``image_h`` (the layout is drawn in ``HDF5RegionReader``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.features.base import LazyIndex, hdf5_errors, make_item, open_hdf5, read_hdf5_ids, remove_path, tmp_sibling
from vl.errors import DataError

HDF5_FORMAT = "vl-region-features"
HDF5_VERSION = 1
_HDF5_PER_IMAGE = ("ids", "offsets", "num_boxes", "image_w", "image_h")


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
    tmp = tmp_sibling(path)
    remove_path(tmp)
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
        remove_path(tmp)
        raise
    return len(ids)


class HDF5RegionReader(LazyIndex):
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
        self._file = self._dsets = None  # never touch an HDF5 handle inherited through fork
        where = f" (reading image id {sid!r})" if sid is not None else ""
        datasets = (*_HDF5_PER_IMAGE, "features", "boxes")
        hint = " (not a vl region-feature HDF5 file?)"
        # read-only, unlocked: file locks fail on some cluster filesystems
        f = open_hdf5(self.path, datasets, where=where, hint=hint, locking=False)
        with hdf5_errors(f, self.path, where):
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
                ids, index = read_hdf5_ids(self.path, f["ids"])
                meta = np.stack([np.asarray(f[k][()], dtype=np.int64) for k in _HDF5_PER_IMAGE[1:]], axis=1)
                self._ids, self._index, self._meta = ids, index, meta.reshape(len(ids), 4)
                self._rows = int(feats.shape[0])
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
        return make_item(self.path, sid, features, boxes, cls_prob, w, h)
