"""Masked-region objectives on region states: class KL (ViLBERT) and feature regression."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from vl.errors import ConfigError
from vl.heads.base import EncoderOutput, HeadContext, Objective, ObjectiveResult


def _region_head(hidden_size: int, out_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size),
        nn.GELU(),
        nn.LayerNorm(hidden_size, eps=1e-12),
        nn.Linear(hidden_size, out_size),
    )


class MaskedRegionClassification(Objective):
    """ViLBERT masked-region loss: KL(detector class distribution || predicted distribution), averaged over the masked
    regions only (`region_mask_labels` (B,R) bool; targets `region_cls_prob` (B,R,C)). Accuracy = arg-max agreement."""

    name = "mrc"
    needs = ("regions",)
    requires = ("region_mask_labels", "region_cls_prob")

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> MaskedRegionClassification:
        if not ctx.data_info.get("num_region_classes"):
            raise ConfigError("data.objectives: 'mrc' needs region features with class distributions (cls_prob)")
        return cls(hidden_size=ctx.visual_size, num_classes=int(ctx.data_info["num_region_classes"]), **options)

    def __init__(self, *, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.head = _region_head(hidden_size, num_classes)

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        masked = batch["region_mask_labels"].bool()
        logits = self.head(out.regions()[masked])  # (M, C)
        target = batch["region_cls_prob"][masked]  # (M, C)
        if not target.shape[0]:
            return ObjectiveResult(out.pooled.sum() * 0.0, logits, target.argmax(-1))
        loss = F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="sum") / target.shape[0]
        return ObjectiveResult(loss, logits, target.argmax(-1))


class MaskedRegionFeatureRegression(Objective):
    """Optional alternative (`--predict_feature` in ViLBERT): MSE to the original region feature (B,R,D) on masked
    regions. No metric beyond its loss."""

    name = "mrfr"
    needs = ("regions",)
    requires = ("region_mask_labels", "region_feat_targets")

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> MaskedRegionFeatureRegression:
        return cls(hidden_size=ctx.visual_size, feature_dim=int(ctx.data_info["visual_dim"]), **options)

    def __init__(self, *, hidden_size: int, feature_dim: int) -> None:
        super().__init__()
        self.head = _region_head(hidden_size, feature_dim)

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        masked = batch["region_mask_labels"].bool()
        pred = self.head(out.regions()[masked])
        target = batch["region_feat_targets"][masked]
        loss = F.mse_loss(pred, target) if target.shape[0] else out.pooled.sum() * 0.0
        return ObjectiveResult(loss, pred, target)

    def make_metrics(self) -> dict[str, Metric]:
        return {}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        pass
