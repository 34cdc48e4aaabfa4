"""Convert region features between formats: bottom-up-attention TSV, the ViLBERT LMDB, HDF5 and FRCNN JSON.

    python -m vl.tools.convert_features tsv2lmdb IN.tsv OUT.lmdb      # also tsv2h5, h52lmdb, lmdb2h5, json2lmdb, json2h5

Every output is written under a temporary sibling name and renamed only when complete, so an interrupted conversion
never leaves a partial file under the final name; an existing output is refused unless ``--overwrite``.

TSV (one image a row, tab-separated, base64 arrays; the column set is recognised by its count unless ``--fields``):

- 6 columns, bottom-up-attention ``generate_tsv.py``: ``image_id, image_w, image_h, num_boxes, boxes, features``
- 7 columns, ViLBERT: the 6 above + ``cls_prob``
- 10 columns, LXMERT obj36: ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes,
  boxes, features`` (object / attribute ids and confidences are not carried over: the LMDB layout has no field
  for them, and ``cls_prob`` needs the full class distribution)

``boxes`` float32 (N,4) x1y1x2y2 px, ``features`` float32 (N,D), ``cls_prob`` float32 (N,C). A first row whose
first column is ``image_id`` / ``img_id`` is taken as a header.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vl.data.features import (
    FrcnnJsonRegionReader,
    HDF5RegionReader,
    RegionFeatureReader,
    RegionReader,
    _decode_array,
    write_region_hdf5,
    write_region_lmdb,
)
from vl.errors import DataError

__all__ = [
    "TSV_FIELDS",
    "read_bottom_up_tsv",
    "reader_records",
    "convert",
    "CONVERSIONS",
]

#: known TSV column sets, by column count
TSV_FIELDS: dict[int, tuple[str, ...]] = {
    6: ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features"),
    7: ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob"),
    10: (
        "img_id",
        "img_h",
        "img_w",
        "objects_id",
        "objects_conf",
        "attrs_id",
        "attrs_conf",
        "num_boxes",
        "boxes",
        "features",
    ),
}
_ALIASES = {"img_id": "image_id", "img_h": "image_h", "img_w": "image_w"}
_REQUIRED = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


def _id_value(sid: str) -> int | str:
    """A decimal id becomes an int (as the ViLBERT scripts store it); anything else stays a string."""
    return int(sid) if sid.isdigit() and str(int(sid)) == sid else sid


def read_bottom_up_tsv(
    path: str | Path,
    *,
    fields: Sequence[str] | None = None,
    empty_id: str | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield region records ``{image_id, image_w, image_h, boxes (N,4), features (N,D), cls_prob (N,C) | None}``
    from a bottom-up-attention TSV.

    ``fields``: column names (default: chosen by the column count, see ``TSV_FIELDS``). ``empty_id``: id for rows whose
    id column is empty, formatted with ``row`` (1-based), e.g. ``"img{row}"``; without it an empty id is an error.
    ``on_bytes(n)`` is called with the size of each line read (for a progress bar). Raises DataError naming the file,
    row and image id for a short/garbled row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: TSV file not found")
    csv.field_size_limit(sys.maxsize)
    names: tuple[str, ...] | None = tuple(_ALIASES.get(f, f) for f in fields) if fields else None
    if names is not None:
        missing = [f for f in _REQUIRED if f not in names]
        if missing:
            raise DataError(f"{path}: --fields lacks {missing}")

    def lines(f: Iterable[str]) -> Iterator[str]:
        for line in f:
            if on_bytes is not None:
                on_bytes(len(line))
            yield line

    with open(path, encoding="utf-8", newline="") as f:
        for rownum, row in enumerate(csv.reader(lines(f), delimiter="\t"), 1):
            if not row:
                continue
            if rownum == 1 and row[0] in ("image_id", "img_id") and (len(row) < 2 or not row[1].isdigit()):
                names = names or tuple(_ALIASES.get(c, c) for c in row)
                continue
            if names is None:
                if len(row) not in TSV_FIELDS:
                    raise DataError(
                        f"{path}: row {rownum} has {len(row)} columns; known layouts have "
                        f"{sorted(TSV_FIELDS)} (pass --fields to name them)"
                    )
                names = tuple(_ALIASES.get(c, c) for c in TSV_FIELDS[len(row)])
            sid = row[names.index("image_id")] if len(row) > names.index("image_id") else ""
            if len(row) != len(names):
                raise DataError(
                    f"{path}: row {rownum} (image id {sid!r}) has {len(row)} columns, expected {len(names)}"
                    " (truncated?)"
                )
            rec = dict(zip(names, row))
            if not sid:
                if empty_id is None:
                    raise DataError(f"{path}: row {rownum} has an empty image id (pass --empty-id to name it)")
                sid = empty_id.format(row=rownum)
            try:
                n, w, h = int(rec["num_boxes"]), int(rec["image_w"]), int(rec["image_h"])
            except ValueError as e:
                raise DataError(f"{path}: row {rownum} (image id {sid!r}) has a non-integer size ({e})") from None
            cls_prob = rec.get("cls_prob")
            yield {
                "image_id": _id_value(sid),
                "image_w": w,
                "image_h": h,
                "boxes": _decode_array(path, rec["boxes"], n, 4, sid, "boxes"),
                "features": _decode_array(path, rec["features"], n, None, sid, "features"),
                "cls_prob": None if not cls_prob else _decode_array(path, cls_prob, n, None, sid, "cls_prob"),
            }


def reader_records(reader: RegionReader) -> Iterator[dict[str, Any]]:
    """Records (as the writers take them) for every image of ``reader``, in its ``ids()`` order."""
    for sid in reader.ids():
        item = reader[sid]
        yield {
            "image_id": _id_value(sid),
            "image_w": item["image_w"],
            "image_h": item["image_h"],
            "boxes": item["boxes"],
            "features": item["features"],
            "cls_prob": item["cls_prob"],
        }


_SOURCES: dict[str, Callable[[Path], RegionReader]] = {
    "lmdb": RegionFeatureReader,
    "h5": HDF5RegionReader,
    "json": FrcnnJsonRegionReader,
}
_WRITERS: dict[str, Callable[..., int]] = {"lmdb": write_region_lmdb, "h5": write_region_hdf5}
#: subcommand -> (source kind, destination kind)
CONVERSIONS: dict[str, tuple[str, str]] = {
    "tsv2lmdb": ("tsv", "lmdb"),
    "tsv2h5": ("tsv", "h5"),
    "h52lmdb": ("h5", "lmdb"),
    "lmdb2h5": ("lmdb", "h5"),
    "json2lmdb": ("json", "lmdb"),
    "json2h5": ("json", "h5"),
}


def _progress(enabled: bool, in_bytes: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        DownloadColumn() if in_bytes else MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def convert(
    kind: str,
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = False,
    fields: Sequence[str] | None = None,
    empty_id: str | None = None,
    _wrap: Callable[[Iterator[dict[str, Any]]], Iterable[Mapping[str, Any]]] | None = None,
) -> int:
    """Run conversion ``kind`` (a key of ``CONVERSIONS``) from ``src`` to ``dst``; returns the number of images.

    ``dst`` is written under a temporary name and renamed when complete. Raises DataError when ``dst`` exists and not
    ``overwrite``, and for any problem with ``src`` (naming the file and image id)."""
    if kind not in CONVERSIONS:
        raise ValueError(f"unknown conversion {kind!r}; choose from {sorted(CONVERSIONS)}")
    src_kind, dst_kind = CONVERSIONS[kind]
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise DataError(f"{src}: input not found")
    if src.resolve() == dst.resolve():
        raise DataError(f"{dst}: output is the input")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise DataError(f"{dst}: output exists; pass --overwrite to replace it")
    with _progress(progress, in_bytes=src_kind == "tsv") as bar:
        if src_kind == "tsv":
            task = bar.add_task(f"{src.name} -> {dst.name}", total=src.stat().st_size)
            records: Iterator[dict[str, Any]] = read_bottom_up_tsv(
                src, fields=fields, empty_id=empty_id, on_bytes=lambda n: bar.advance(task, n)
            )
        else:
            reader = _SOURCES[src_kind](src)
            task = bar.add_task(f"{src.name} -> {dst.name}", total=len(reader))

            def counted(it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
                for rec in it:
                    yield rec
                    bar.advance(task, 1)

            records = counted(reader_records(reader))
        stream = _wrap(records) if _wrap is not None else records
        try:
            n = _WRITERS[dst_kind](dst, stream)
        except DataError:
            raise
        except ValueError as e:  # the writers' checks (duplicate ids, inconsistent shapes)
            raise DataError(f"{src}: {e}") from None
    return n
