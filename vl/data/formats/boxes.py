"""Box geometry shared by the region readers and tasks: x1y1x2y2 pixel boxes with the continuous convention (a box
covers ``[x1, x2) x [y1, y2)``, area ``(x2 - x1) * (y2 - y1)``); ViLBERT's own ``iou`` adds 1 to widths and heights
(pixel-inclusive): ``plus_one=True`` (the RefCOCO+ data module's default, ``data.iou_plus_one``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["box_area", "pairwise_iou", "box_iou", "xywh_to_xyxy"]


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
