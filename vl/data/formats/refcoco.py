"""RefCOCO+ (REFER) file formats (box geometry: ``vl.data.formats.boxes``).

Formats:
- ``refs(unc).p``: pickle, list of refs ``{ref_id, ann_id, image_id, split, sentences: [{raw, sent, tokens,
  sent_id}], sent_ids, category_id, ...}``; ``split`` is one of train / val / testA / testB (RefCOCO / RefCOCO+
  unc), also testC / testAB / testBC / testAC in other REFER releases; ``refs_of_split`` selects a split by REFER's
  ``getRefIds`` rule.
- ``instances.json``: COCO instances ``{images: [{id, width, height, ...}], annotations: [{id, image_id, bbox
  [x, y, w, h], category_id, area, ...}], categories: [{id, name}]}``.
- REFER expressions / predictions JSON: ``{"predictions": [{"sent", "ref_id"}]}``.

Boxes are x1y1x2y2 in pixels with the continuous convention (a box covers ``[x1, x2) x [y1, y2)``, area
``(x2 - x1) * (y2 - y1)``); ViLBERT's own ``iou`` adds 1 to widths and heights (pixel-inclusive): ``plus_one=True``
(the RefCOCO+ data module's default, ``data.iou_plus_one``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.formats.boxes import box_area, box_iou, pairwise_iou, xywh_to_xyxy
from vl.data.formats.coco import read_coco_json
from vl.data.formats.jsonl import read_json
from vl.data.formats.safe_pickle import read_pickle_file
from vl.errors import DataError

__all__ = [
    "REFCOCO_DIR",
    "REFCOCO_SPLITS",
    "Instances",
    "box_area",
    "pairwise_iou",
    "box_iou",
    "xywh_to_xyxy",
    "load_refs",
    "load_instances",
    "load_expressions_json",
    "refcoco_paths",
    "split_counts",
    "REFER_SPLIT_NAMES",
    "refs_of_split",
]

REFCOCO_DIR = "refcoco+"
REFCOCO_SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB")
# the split names REFER's `getRefIds(split=...)` accepts (any other: "No such split", exit)
REFER_SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _read_pickle(path: Path) -> Any:
    # plain data only (a pickle that would run code is refused); Python 2 pickles with non-ASCII bytes read as latin1
    return read_pickle_file(path, latin1_fallback=True)


_REF_FIELDS: dict[str, Callable[[Any], bool]] = {
    "ref_id": _is_int,
    "ann_id": _is_int,
    "image_id": _is_int,
    "split": lambda x: isinstance(x, str),
    "sentences": lambda x: isinstance(x, list),
}


def load_refs(path: str | Path, text_field: str = "raw") -> list[dict[str, Any]]:
    """REFER ``refs(unc).p`` -> list of ref dicts (as stored; ids may be any integer type).

    Each ref must hold ``ref_id``, ``ann_id``, ``image_id`` (ints), ``split`` (str) and ``sentences``: a list of
    ``{"raw": str, "sent": str, "sent_id": int, ...}`` (``text_field``, the one read as the expression, must be a
    string); ``ref_id`` and ``sent_id`` values must be unique. Raises DataError naming the file, the ref index and the
    field."""
    path = Path(path)
    refs = _read_pickle(path)
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    seen: dict[int, int] = {}
    sent_at: dict[int, int] = {}  # sent_id -> the ref that holds it
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise DataError(f"{path}: ref {i} is a {type(ref).__name__}, expected a dict")
        for name, ok in _REF_FIELDS.items():
            if name not in ref:
                raise DataError(f"{path}: ref {i} has no {name!r}")
            if not ok(ref[name]):
                raise DataError(f"{path}: ref {i} field {name!r} has type {type(ref[name]).__name__}")
        for j, sent in enumerate(ref["sentences"]):
            if not isinstance(sent, dict):
                raise DataError(f"{path}: ref {i} sentences[{j}] is a {type(sent).__name__}, expected a dict")
            if not isinstance(sent.get(text_field), str):
                raise DataError(f"{path}: ref {i} sentences[{j}] has no string {text_field!r}")
            if not _is_int(sent.get("sent_id")):
                raise DataError(f"{path}: ref {i} sentences[{j}] has no integer 'sent_id'")
            sid = int(sent["sent_id"])
            if sid in sent_at:  # an expression is keyed by its sent_id: a repeat would replace the earlier one
                raise DataError(f"{path}: ref {i} sentences[{j}] repeats sent_id {sid} (first in ref {sent_at[sid]})")
            sent_at[sid] = i
        rid = int(ref["ref_id"])
        if rid in seen:
            raise DataError(f"{path}: ref {i} repeats ref_id {rid} (first at ref {seen[rid]})")
        seen[rid] = i
    return refs


@dataclass(frozen=True)
class Instances:
    """COCO instances: ``boxes`` ann_id -> float64 (4,) x1y1x2y2 px; ``ann_image`` ann_id -> image_id; ``sizes``
    image_id -> (width, height); ``categories`` category id -> name."""

    path: Path
    boxes: dict[int, np.ndarray]
    ann_image: dict[int, int]
    sizes: dict[int, tuple[int, int]]
    categories: dict[int, str]


def load_instances(path: str | Path) -> Instances:
    """COCO instances JSON -> ``Instances``. Every annotation needs ``id``, ``image_id`` (a listed image) and ``bbox``
    (4 numbers, w, h >= 0); every image ``id``, ``width``, ``height``. Raises DataError naming file, entry and field."""
    path = Path(path)
    data = read_coco_json(path)
    sizes: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise DataError(f"{path}: images[{i}] is not an object")
        for name in ("id", "width", "height"):
            if not _is_int(img.get(name)):
                raise DataError(f"{path}: images[{i}] has no integer {name!r}")
        if img["id"] in sizes:
            raise DataError(f"{path}: images[{i}] repeats image id {img['id']}")
        sizes[int(img["id"])] = (int(img["width"]), int(img["height"]))
    boxes: dict[int, np.ndarray] = {}
    ann_image: dict[int, int] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{i}] is not an object")
        for name in ("id", "image_id"):
            if not _is_int(ann.get(name)):
                raise DataError(f"{path}: annotations[{i}] has no integer {name!r}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DataError(f"{path}: annotations[{i}] field 'bbox' is not [x, y, w, h] numbers (got {bbox!r})")
        if bbox[2] < 0 or bbox[3] < 0 or not np.all(np.isfinite(bbox)):
            raise DataError(f"{path}: annotations[{i}] field 'bbox' has a negative or non-finite size: {bbox}")
        aid, img_id = int(ann["id"]), int(ann["image_id"])
        if img_id not in sizes:
            raise DataError(f"{path}: annotations[{i}] refers to unknown image id {img_id}")
        if aid in boxes:
            raise DataError(f"{path}: annotations[{i}] repeats annotation id {aid}")
        boxes[aid] = xywh_to_xyxy(bbox)
        ann_image[aid] = img_id
    categories: dict[int, str] = {}
    for i, cat in enumerate(data.get("categories") or []):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DataError(f"{path}: categories[{i}] has no integer 'id'")
        categories[int(cat["id"])] = str(cat.get("name", ""))
    return Instances(path, boxes, ann_image, sizes, categories)


def load_expressions_json(path: str | Path) -> list[tuple[int, str]]:
    """REFER expressions / predictions JSON ``{"predictions": [{"sent": str, "ref_id": int}]}`` -> ``[(ref_id,
    sent)]`` in file order."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("predictions"), list):
        raise DataError(f"{path}: missing top-level list 'predictions'")
    out: list[tuple[int, str]] = []
    for i, p in enumerate(data["predictions"]):
        if not isinstance(p, dict):
            raise DataError(f"{path}: predictions[{i}] is not an object")
        if not _is_int(p.get("ref_id")):
            raise DataError(f"{path}: predictions[{i}] has no integer 'ref_id'")
        if not isinstance(p.get("sent"), str):
            raise DataError(f"{path}: predictions[{i}] has no string 'sent'")
        out.append((int(p["ref_id"]), p["sent"]))
    return out


# ----------------------------------------------------------------------------------------------- embedded corpus


def refcoco_paths(root: str | Path) -> dict[str, Path]:
    """Corpus paths: ``refs`` (pickle), ``instances`` (JSON), ``dets`` / ``gt`` (LMDB directories), ``version``
    (text: the writer version)."""
    base = Path(root) / REFCOCO_DIR
    return {
        "refs": base / "refs(unc).p",
        "instances": base / "instances.json",
        "dets": base / "dets.lmdb",
        "gt": base / "gt.lmdb",
    }


def refs_of_split(refs: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The refs of split `name`, in file order, by REFER's ``getRefIds(split=name)`` (``refer.py``, which ViLBERT's
    reader calls): ``testA`` / ``testB`` / ``testC``: every ref whose split contains the letter (``testAB`` counts for
    testA and testB); ``testAB`` / ``testBC`` / ``testAC``, ``train``, ``val``: equal split; ``test``: every ref whose
    split contains ``test``. Another name: ``ValueError`` (REFER exits)."""
    if name in ("testA", "testB", "testC"):
        return [r for r in refs if name[-1] in str(r["split"])]
    if name == "test":
        return [r for r in refs if "test" in str(r["split"])]
    if name in REFER_SPLIT_NAMES:
        return [r for r in refs if r["split"] == name]
    raise ValueError(f"no such REFER split {name!r}; one of {', '.join(REFER_SPLIT_NAMES)}")


def split_counts(refs: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Number of refs per split name, e.g. ``{"train": 120, "val": 15, "testA": 8, "testB": 7}``."""
    counts: dict[str, int] = {}
    for ref in refs:
        counts[str(ref["split"])] = counts.get(str(ref["split"]), 0) + 1
    return counts
