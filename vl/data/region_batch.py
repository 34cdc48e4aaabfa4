"""A batch's regions: padding reader items into fixed tensors (`pad_regions`) and ViLBERT's region masking
(`mask_regions`); used by the collators (`vl.data.collate`, MM-BERT's `vl.data.multi30k_collate`), the scoring
galleries and the visual sources."""

from __future__ import annotations

import numpy as np
import torch

from vl.data.draws import uniforms
from vl.errors import DataError

__all__ = ["mask_regions", "masked_global", "pad_regions"]


def pad_regions(visuals: list[dict[str, np.ndarray]], max_regions: int, fixed: bool = False) -> dict[str, torch.Tensor]:
    """Stack reader outputs (`features` (N,D), `boxes_norm` (N,4), optional `cls_prob` (N,C) and `global_feature`
    (D,)) into padded visual_feats (B,R,D), visual_boxes (B,R,4), visual_mask (B,R), region_cls_prob (B,R,C) and
    visual_global (B,D) (only when every example has it)."""
    n = max_regions if fixed else min(max(v["features"].shape[0] for v in visuals), max_regions)
    regions = [v for v in visuals if v["features"].shape[0]]  # an image without regions is an all-padding row
    dim = (regions or visuals)[0]["features"].shape[1]
    have_cls = sum(v.get("cls_prob") is not None for v in regions)
    if 0 < have_cls < len(regions):  # MRC / MVRC would silently skip the batch: the head needs every row's
        raise DataError(
            f"region features: {len(regions) - have_cls} of {len(regions)} images of a batch have no class "
            "distribution (cls_prob) while the others have one; a feature file's records must all carry it or none"
        )
    with_cls = have_cls == len(regions) if regions else all(v.get("cls_prob") is not None for v in visuals)
    # filled as numpy arrays (a row copy is ~10x cheaper than a torch slice assignment), handed to torch once
    feats = np.zeros((len(visuals), n, dim), dtype=np.float32)
    boxes = np.zeros((len(visuals), n, 4), dtype=np.float32)
    mask = np.zeros((len(visuals), n), dtype=np.int64)
    classes = next((v["cls_prob"].shape[1] for v in (regions or visuals) if v.get("cls_prob") is not None), 0)
    cls = np.zeros((len(visuals), n, classes), dtype=np.float32) if with_cls else None
    for i, v in enumerate(visuals):
        k = min(v["features"].shape[0], n)
        if not k:  # an image without regions (a per-record reader gives (0, 0) features): an all-padding row
            continue
        feats[i, :k] = v["features"][:k]
        boxes[i, :k] = v["boxes_norm"][:k]
        mask[i, :k] = 1
        if cls is not None:
            cls[i, :k] = v["cls_prob"][:k]
    out = {
        "visual_feats": torch.from_numpy(feats),
        "visual_boxes": torch.from_numpy(boxes),
        "visual_mask": torch.from_numpy(mask),
    }
    if cls is not None:
        out["region_cls_prob"] = torch.from_numpy(cls)
    if all(v.get("global_feature") is not None for v in visuals):
        out["visual_global"] = torch.from_numpy(np.stack([v["global_feature"] for v in visuals]).astype(np.float32))
    return out


def masked_global(feats: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
    """(B,D): the mean of each row's real regions as given (after region masking: zeroed rows count as zeros), as
    vilbert_beta's pretraining loader computes the global image token after its `random_region` masking
    (`np.sum(image_feat, axis=1) / np.sum(image_mask, axis=1)`, `ConceptCapLoaderTrain`). A row without regions: 0."""
    weights = visual_mask.unsqueeze(-1).to(feats.dtype)
    return (feats * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def mask_regions(
    feats: torch.Tensor,
    visual_mask: torch.Tensor,
    *,
    probability: float = 0.15,
    zero_fraction: float = 0.9,
    keys: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ViLBERT region masking: choose `probability` of the real regions; zero the features of `zero_fraction` of
    those, keep the rest. Returns (masked feats (B,R,D), chosen (B,R) bool). `keys` (B,): each row's draws from its
    own key and region slot (`vl.data.draws`: the same in any batch)."""
    width = visual_mask.shape[1]
    chosen = torch.from_numpy(uniforms(keys, width, 8) < probability) & visual_mask.bool()
    zero = chosen & torch.from_numpy(uniforms(keys, width, 9) < zero_fraction)
    return feats.masked_fill(zero.unsqueeze(-1), 0.0), chosen
