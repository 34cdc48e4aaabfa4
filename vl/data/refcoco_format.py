"""RefCOCO+ (REFER) file formats, box IoU, and the embedded referring-expression corpus writer.

Formats:
- ``refs(unc).p``: pickle, list of refs ``{ref_id, ann_id, image_id, split, sentences: [{raw, sent, tokens,
  sent_id}], sent_ids, category_id, ...}``; ``split`` is one of train / val / testA / testB.
- ``instances.json``: COCO instances ``{images: [{id, width, height, ...}], annotations: [{id, image_id, bbox
  [x, y, w, h], category_id, area, ...}], categories: [{id, name}]}``.
- REFER expressions / predictions JSON: ``{"predictions": [{"sent", "ref_id"}]}``.

Boxes are x1y1x2y2 in pixels with the continuous convention (a box covers ``[x1, x2) x [y1, y2)``, area
``(x2 - x1) * (y2 - y1)``); ViLBERT's own ``iou`` adds 1 to widths and heights (pixel-inclusive): ``plus_one=True``
(the RefCOCO+ data module's default, ``data.iou_plus_one``).

``write_refcoco_corpus`` adds a RefCOCO+-shaped task to the embedded scene corpus::

    refcoco+/refs(unc).p          REFER refs (written last: its presence means the directory is complete)
    refcoco+/instances.json       COCO instances, one annotation per shape
    refcoco+/dets.lmdb/data.mdb   "detections": every scene region, shape boxes jittered (IoU with GT in ~[0.7, 1))
    refcoco+/gt.lmdb/data.mdb     one region per shape at its exact GT box
"""

from __future__ import annotations

import json
import numbers
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.coco import read_coco_json
from vl.data.jsonl import read_json, write_atomically
from vl.data.safe_pickle import read_pickle_file
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
    "scene_expressions",
    "write_refcoco_corpus",
    "split_counts",
]

REFCOCO_DIR = "refcoco+"
REFCOCO_SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB")
#: largest relative shift of each detection-box edge (fraction of the box side): keeps IoU with the GT above ~0.7
_JITTER = 0.08
_SENTENCES_PER_REF = 3

# ------------------------------------------------------------------------------------------------------------- boxes


def box_area(boxes: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """Area of x1y1x2y2 boxes (..., 4) -> (...); inverted boxes (x2 < x1 or y2 < y1) have area 0. `plus_one`:
    pixel-inclusive widths/heights (x2 - x1 + 1), ViLBERT's convention."""
    b = np.asarray(boxes, dtype=np.float64)
    one = 1.0 if plus_one else 0.0
    return np.clip(b[..., 2] - b[..., 0] + one, 0, None) * np.clip(b[..., 3] - b[..., 1] + one, 0, None)


def pairwise_iou(a: np.ndarray, b: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """IoU of every box in ``a`` (N,4) with every box in ``b`` (M,4) -> float64 (N,M).

    `plus_one=False`: continuous boxes (area ``(x2 - x1) * (y2 - y1)``). `plus_one=True`: ViLBERT's `iou`
    (vilbert-multi-task `refer_expression_dataset.py`): widths, heights and the intersection's sides get +1
    (pixel-inclusive). Touching boxes give 0 (continuous), identical boxes 1; a zero-area (or inverted, or
    non-finite) box has IoU 0 with everything, itself included, without a NaN or a warning."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    one = 1.0 if plus_one else 0.0
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + one
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + one
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a, area_b = box_area(a, plus_one), box_area(b, plus_one)
    valid = (area_a[:, None] > 0) & (area_b[None, :] > 0)
    union = area_a[:, None] + area_b[None, :] - inter
    out = np.zeros(inter.shape, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        np.divide(inter, union, out=out, where=valid & (union > 0))
    return np.nan_to_num(np.clip(out, 0.0, 1.0), nan=0.0)


def box_iou(boxes: np.ndarray, box: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """IoU of each of ``boxes`` (N,4) with one ``box`` (4,) -> float64 (N,) (`plus_one`: see `pairwise_iou`)."""
    return pairwise_iou(boxes, np.asarray(box, dtype=np.float64).reshape(1, 4), plus_one)[:, 0]


def xywh_to_xyxy(boxes: np.ndarray | Sequence[float]) -> np.ndarray:
    """COCO ``[x, y, w, h]`` boxes (4,) or (N,4) -> float64 ``[x1, y1, x2, y2]`` of the same shape."""
    b = np.array(boxes, dtype=np.float64)
    if b.shape[-1:] != (4,):
        raise ValueError(f"expected boxes of shape (4,) or (N,4), got {b.shape}")
    b[..., 2:] += b[..., :2]
    return b


# ----------------------------------------------------------------------------------------------------------- loaders


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


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """REFER ``refs(unc).p`` -> list of ref dicts (as stored; ids may be any integer type).

    Each ref must hold ``ref_id``, ``ann_id``, ``image_id`` (ints), ``split`` (str) and ``sentences``: a list of
    ``{"sent": str, "sent_id": int, ...}``; ``ref_id`` values must be unique. Raises DataError naming the file, the
    ref index and the field."""
    path = Path(path)
    refs = _read_pickle(path)
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    seen: dict[int, int] = {}
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
            if not isinstance(sent.get("sent"), str):
                raise DataError(f"{path}: ref {i} sentences[{j}] has no string 'sent'")
            if not _is_int(sent.get("sent_id")):
                raise DataError(f"{path}: ref {i} sentences[{j}] has no integer 'sent_id'")
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


def _where(position: str) -> str:
    return "in the middle" if position == "middle" else f"on the {position}"


def scene_expressions(shapes: Sequence[Any]) -> list[list[str]]:
    """For each shape of a scene (``SceneShape``s), the referring expressions true of it and of no other shape.

    Candidates: "the red circle", "the circle", "the red shape", "the large circle", "the large shape", "the shape on
    the left" / "in the middle", "the circle on the left", "the leftmost shape" / "the rightmost shape"."""
    n = len(shapes)
    out: list[list[str]] = []
    for k, p in enumerate(shapes):
        cands: list[tuple[str, Callable[[Any], bool]]] = [
            (f"the {p.colour} {p.shape}", lambda q, p=p: (q.colour, q.shape) == (p.colour, p.shape)),
            (f"the {p.shape}", lambda q, p=p: q.shape == p.shape),
            (f"the {p.colour} shape", lambda q, p=p: q.colour == p.colour),
            (f"the {p.size} {p.shape}", lambda q, p=p: (q.size, q.shape) == (p.size, p.shape)),
            (f"the {p.size} shape", lambda q, p=p: q.size == p.size),
            (f"the shape {_where(p.position)}", lambda q, p=p: q.position == p.position),
            (f"the {p.shape} {_where(p.position)}", lambda q, p=p: (q.shape, q.position) == (p.shape, p.position)),
        ]
        unique = [text for text, match in cands if sum(match(q) for q in shapes) == 1]
        if n >= 2 and k == 0 and shapes[0].centre[0] < shapes[1].centre[0]:
            unique.append("the leftmost shape")
        if n >= 2 and k == n - 1 and shapes[-1].centre[0] > shapes[-2].centre[0]:
            unique.append("the rightmost shape")
        out.append(list(dict.fromkeys(unique)))
    return out


def _test_halves(scenes: Sequence[Any]) -> dict[int, str]:
    """image_id -> "testA" / "testB" for the test scenes: alternating in image-id order."""
    test_ids = sorted(sc.image_id for sc in scenes if sc.split == "test")
    return {image_id: ("testA", "testB")[k % 2] for k, image_id in enumerate(test_ids)}


def _jitter_box(rng: np.random.Generator, box: Sequence[float], w: int, h: int) -> np.ndarray:
    """``box`` with each edge moved by up to ``_JITTER`` of its side (at least 0.5 px on one edge), clipped to the
    image: IoU with ``box`` stays in about [0.7, 1)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    bw, bh = x2 - x1, y2 - y1
    for _ in range(10):
        d = rng.uniform(-_JITTER, _JITTER, 4) * np.array([bw, bh, bw, bh])
        if np.abs(d).max() < 0.5:
            d[int(rng.integers(4))] = 0.5 if rng.random() < 0.5 else -0.5
        out = np.array([x1 + d[0], y1 + d[1], x2 + d[2], y2 + d[3]])
        out = np.clip(out, 0, [w, h, w, h])
        if box_iou(out[None], np.array(box, dtype=np.float64))[0] < 1.0:
            return out
    return np.array([x1 + 0.5, y1, x2, y2])  # pragma: no cover - the loop practically always succeeds


def _scene_regions(scene: Any, settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(detections record, GT record) of ``scene`` for ``write_region_lmdb``."""
    from vl.data.scenes import region_features

    rec = region_features(scene, settings)
    labels = rec.pop("labels")
    rng = np.random.default_rng([settings.seed, 11, scene.image_id])
    w, h = scene.width, scene.height
    dets = dict(rec)
    boxes = rec["boxes"].astype(np.float64).copy()
    feats = rec["features"].copy()
    shape_rows = np.flatnonzero(labels > 0)
    for r in shape_rows:
        boxes[r] = _jitter_box(rng, boxes[r], w, h)
    # a detector's feature at a slightly wrong box differs a little from the one at the exact box
    noise = 0.5 * settings.feature_noise * rng.standard_normal((len(shape_rows), feats.shape[1]))
    feats[shape_rows] += noise.astype(np.float32)
    dets["boxes"], dets["features"] = boxes.astype(np.float32), feats
    order = rng.permutation(shape_rows)
    gt = {
        "image_id": scene.image_id,
        "image_w": w,
        "image_h": h,
        "boxes": rec["boxes"][order],
        "features": rec["features"][order],
        "cls_prob": rec["cls_prob"][order],
    }
    return dets, gt


def write_refcoco_corpus(root: str | Path, scenes: Sequence[Any], settings: Any) -> list[Path]:
    """Write the RefCOCO+-shaped task of ``scenes`` (``vl.data.scenes.Scene``) into ``root/refcoco+`` -> written paths
    (refs pickle, instances JSON, ``dets.lmdb/data.mdb``, ``gt.lmdb/data.mdb``).

    One ref per shape that has a unique expression (``scene_expressions``), with up to 3 of them as sentences
    (chosen by a per-scene rng); ann ids ``image_id * 10 + k`` (k = the shape's left-to-right index); ref / sent ids
    count from 1. Splits: train -> train, val -> val, test scenes alternate testA / testB in image-id order.
    The refs pickle is written last, so its presence means the directory is complete."""
    from vl.data.features import write_region_lmdb
    from vl.data.scenes import SHAPES

    paths = refcoco_paths(root)
    paths["refs"].parent.mkdir(parents=True, exist_ok=True)
    halves = _test_halves(scenes)
    refs: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    det_records: list[dict[str, Any]] = []
    gt_records: list[dict[str, Any]] = []
    ref_id = sent_id = 0
    for sc in scenes:
        split = halves.get(sc.image_id, sc.split)
        images.append({"id": sc.image_id, "width": sc.width, "height": sc.height, "file_name": f"{sc.image_id}.png"})
        rng = np.random.default_rng([settings.seed, 12, sc.image_id])
        for k, (p, exprs) in enumerate(zip(sc.shapes, scene_expressions(sc.shapes))):
            ann_id = sc.image_id * 10 + k
            x1, y1, x2, y2 = (int(v) for v in p.box)
            category_id = SHAPES.index(p.shape) + 1
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": sc.image_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "category_id": category_id,
                    "iscrowd": 0,
                }
            )
            if not exprs:
                continue
            ref_id += 1
            picked = [exprs[int(i)] for i in rng.permutation(len(exprs))[:_SENTENCES_PER_REF]]
            sentences = []
            for text in picked:
                sent_id += 1
                sentences.append({"raw": text.capitalize(), "sent": text, "tokens": text.split(), "sent_id": sent_id})
            refs.append(
                {
                    "ref_id": ref_id,
                    "ann_id": ann_id,
                    "image_id": sc.image_id,
                    "split": split,
                    "sentences": sentences,
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "category_id": category_id,
                    "file_name": f"{sc.image_id}_{ann_id}.png",
                }
            )
        dets, gt = _scene_regions(sc, settings)
        det_records.append(dets)
        gt_records.append(gt)
    instances = {
        "info": {"description": "vl procedural scenes as RefCOCO+ instances"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)],
    }

    def dump_json(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="\n") as f:
            json.dump(instances, f)

    def dump_refs(tmp: Path) -> None:
        with tmp.open("wb") as f:
            pickle.dump(refs, f, protocol=4)

    paths["refs"].unlink(missing_ok=True)  # an old refs file must never vouch for new files
    write_atomically(paths["instances"], dump_json)
    write_region_lmdb(paths["dets"], det_records)
    write_region_lmdb(paths["gt"], gt_records)
    write_atomically(paths["refs"], dump_refs)
    return [paths["refs"], paths["instances"], paths["dets"] / "data.mdb", paths["gt"] / "data.mdb"]


def split_counts(refs: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Number of refs per split name, e.g. ``{"train": 120, "val": 15, "testA": 8, "testB": 7}``."""
    counts: dict[str, int] = {}
    for ref in refs:
        counts[str(ref["split"])] = counts.get(str(ref["split"]), 0) + 1
    return counts
