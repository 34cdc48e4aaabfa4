"""Region features as MM-BERT / bottom-up-attention per-image Faster R-CNN JSON with base64 arrays, in a directory
of ``<image_id>.json`` files or one JSONL file (``FrcnnJsonRegionReader`` / ``write_region_json``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.features.base import (
    LazyIndex,
    ReaderWidths,
    WriterWidths,
    encode_array,
    record_to_item,
    remove_path,
    replace_path,
    tmp_sibling,
)
from vl.errors import DataError

_JSON_ID_RE = re.compile(rb'(?<!\\)"image_id"\s*:\s*(?:"((?:[^"\\]|\\.)*)"|(-?\d+))')
_JSON_IN_MEMORY_LIMIT = 256 * 1024 * 1024


class FrcnnJsonRegionReader(ReaderWidths, LazyIndex):
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

    A record whose D or C differs from the first record's is a DataError naming it (`ReaderWidths`).

    MM-BERT's *annotation* JSONL (``val_frcnn.json``: ``{"image", "caption_en", "caption_de", "frcnn"}``) holds no
    features; it is rejected with a DataError that points at the per-image directory its ``frcnn`` field names.
    """

    _HANDLE_FIELDS = ("_fd",)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: FRCNN JSON features not found")
        self._mode = "dir" if self.path.is_dir() else "file"
        self._widths_of = "directory" if self._mode == "dir" else "file"
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
        return self._checked_item(image_id)

    def _read_item(self, image_id: str | int) -> tuple[Path, dict[str, Any]]:
        sid, row = self._row(image_id)
        if self._records is not None:
            return self.path, self._to_item(self.path, sid, self._records[row])
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
        return file, self._to_item(file, sid, rec)

    @staticmethod
    def _to_item(file: Path, sid: str, rec: Any) -> dict[str, Any]:
        if isinstance(rec, dict) and rec.get("cls_prob") is None and "classes" in rec:
            rec = {**rec, "cls_prob": rec["classes"]}
        return record_to_item(file, sid, rec)


def write_region_json(
    out_dir: str | Path, records: Iterable[Mapping[str, Any]], *, classes_key: str = "classes"
) -> int:
    """Write one per-image FRCNN JSON file ``out_dir/<image_id>.json`` per record (base64 float32 arrays;
    ``cls_prob`` is stored under ``classes_key``; D and C the same in every record with boxes, else a ValueError naming
    the image ids). Written into a temporary sibling directory then renamed."""
    out_dir = Path(out_dir)
    tmp = tmp_sibling(out_dir)
    remove_path(tmp)
    tmp.mkdir(parents=True)
    count = 0
    widths = WriterWidths()
    try:
        for rec in records:
            sid = str(rec["image_id"])
            if not sid or "/" in sid or sid.startswith("."):
                raise ValueError(f"image id {sid!r} cannot be a file name")
            boxes = np.asarray(rec["boxes"], dtype=np.float32)
            feats = np.asarray(rec["features"], dtype=np.float32)
            widths.check(sid, "features", feats)
            value: dict[str, Any] = {
                "image_id": rec["image_id"],
                "image_h": int(rec["image_h"]),
                "image_w": int(rec["image_w"]),
                "num_boxes": int(boxes.shape[0]),
                "boxes": encode_array(boxes).decode(),
                "features": encode_array(feats).decode(),
            }
            if rec.get("cls_prob") is not None:
                cls_prob = np.asarray(rec["cls_prob"], dtype=np.float32)
                widths.check(sid, "cls_prob", cls_prob)
                value[classes_key] = encode_array(cls_prob).decode()
            path = tmp / f"{sid}.json"
            if path.exists():
                raise ValueError(f"duplicate image id {sid!r}")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(value, f)
            count += 1
        replace_path(tmp, out_dir)
    except BaseException:
        remove_path(tmp)
        raise
    return count
