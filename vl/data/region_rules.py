"""ViLBERT's feature-reader rules, shared by its task corpora (VQA, retrieval, VCR, RefCOCO+): the feature of the
global image token (`data.global_token`) and the joining of detections with ground-truth-box regions."""

from __future__ import annotations

from typing import Any

import numpy as np

from vl.data.features.cache import ReaderView
from vl.errors import ConfigError, DataError

__all__ = ["GLOBAL_TOKEN", "GlobalFeatureRegions", "check_global_token", "concat_regions", "global_feature"]

#: `data.global_token` (VQA, retrieval, VCR): the feature of ViLBERT's global image token. "all": the mean of all the
#: image's regions in the feature file, before the `max_regions` cut (vilbert_beta's feature reader, the default);
#: "kept": the mean of the regions kept (vl's earlier behaviour: the model computes it). Only ViLBERT reads it (batch
#: `visual_global`).
GLOBAL_TOKEN = ("all", "kept")


def global_feature(item: dict[str, Any]) -> np.ndarray:
    """(D,) float32: the mean of all of a reader item's region features, as vilbert_beta's feature reader computes
    its global image feature (`np.sum(features, axis=0) / num_boxes`, before any region is cut)."""
    feats = np.asarray(item["features"], dtype=np.float32)
    return np.sum(feats, axis=0) / feats.shape[0]


class GlobalFeatureRegions(ReaderView):
    """`reader[image_id]` with `global_feature` (`global_feature`) added; `path`, `ids()`, `in`, `len` pass through."""

    def __getitem__(self, image_id: str | int) -> dict[str, Any]:
        item = dict(self.reader[image_id])
        if not len(item["features"]):  # the seed's reader divides by num_boxes = 0: a NaN global token
            raise DataError(
                f"{self.reader.path}: image id {image_id} has no regions (num_boxes 0): ViLBERT's global image token "
                "is their mean; drop the image or re-extract its features"
            )
        item["global_feature"] = global_feature(item)
        return item


def check_global_token(value: str) -> str:
    if value not in GLOBAL_TOKEN:
        raise ConfigError(f"data.global_token: '{value}' is not one of {GLOBAL_TOKEN}")
    return value


def _truncate(item: dict[str, Any], n: int) -> dict[str, Any]:
    out = dict(item)
    for key in ("features", "boxes", "boxes_norm", "cls_prob"):
        if out.get(key) is not None:
            out[key] = out[key][:n]
    out["num_boxes"] = int(out["features"].shape[0])
    return out


def concat_regions(
    dets: dict[str, Any], gt: dict[str, Any] | None, max_regions: int, *, gt_first: bool = True
) -> dict[str, Any]:
    """Reader dicts -> one reader dict: detections then GT regions, at most ``max_regions`` rows. ``gt_first``:
    detections are truncated first (the GT regions are kept so a training example always has a positive; ViLBERT's
    VCR); false: the combined list is cut from its end (ViLBERT's RefCOCO+). ``cls_prob`` is kept only when both
    have it."""
    if gt is None:
        return _truncate(dets, max_regions)
    if not gt_first:
        total = int(dets["features"].shape[0]) + int(gt["features"].shape[0])
        return _truncate(concat_regions(dets, gt, total), max_regions)
    n_gt = min(int(gt["features"].shape[0]), max_regions)
    n_det = min(int(dets["features"].shape[0]), max_regions - n_gt)
    out = dict(dets)
    for key in ("features", "boxes", "boxes_norm"):
        out[key] = np.concatenate([dets[key][:n_det], gt[key][:n_gt]]).astype(np.float32, copy=False)
    if dets.get("cls_prob") is not None and gt.get("cls_prob") is not None:
        out["cls_prob"] = np.concatenate([dets["cls_prob"][:n_det], gt["cls_prob"][:n_gt]])
    else:
        out["cls_prob"] = None
    out["num_boxes"] = n_det + n_gt
    return out
