"""The embedded scene corpus as a RefCOCO+-shaped referring-expression corpus (``vl.data.formats.refcoco``)::

refcoco+/refs(unc).p          REFER refs (written last: its presence means the directory is complete)
refcoco+/instances.json       COCO instances, one annotation per shape
refcoco+/dets.lmdb/data.mdb   "detections": every scene region, shape boxes jittered (IoU with GT in ~[0.7, 1))
refcoco+/gt.lmdb/data.mdb     one region per shape at its exact GT box
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.features import write_region_lmdb
from vl.data.formats.boxes import box_iou
from vl.data.formats.jsonl import write_atomically
from vl.data.formats.refcoco import refcoco_paths
from vl.data.scenes.generator import SHAPES, region_features, where_phrase

__all__ = ["scene_expressions", "write_refcoco_corpus"]

#: largest relative shift of each detection-box edge (fraction of the box side): keeps IoU with the GT above ~0.7
_JITTER = 0.08
_SENTENCES_PER_REF = 3


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
            (f"the shape {where_phrase(p.position)}", lambda q, p=p: q.position == p.position),
            (
                f"the {p.shape} {where_phrase(p.position)}",
                lambda q, p=p: (q.shape, q.position) == (p.shape, p.position),
            ),
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
