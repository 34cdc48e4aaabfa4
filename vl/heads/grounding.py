"""Region grounding (ViLBERT's `vision_logit`): one logit per region against IoU targets (RefCOCO+)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from vl.heads.base import EncoderOutput, HeadContext, Objective, ObjectiveResult
from vl.metrics import Accuracy


class RegionGrounding(Objective):
    """ViLBERT's `vision_logit`: Linear(Hv, 1) per region, padded regions pushed to -1e4. Loss: BCE-with-logits against
    `refer_targets` (B, R) (IoU with the referred box, < 0.5 set to 0), mean x R. Metric `refer_acc`: the arg-max
    region's IoU (`refer_ious` (B, R)) is > 0.5."""

    name = "refer"
    needs = ("regions",)
    requires = ("refer_targets",)

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> RegionGrounding:
        return cls(hidden_size=ctx.visual_size, **options)

    def __init__(self, *, hidden_size: int, iou_threshold: float = 0.5) -> None:
        super().__init__()
        self.vision_logit = nn.Linear(hidden_size, 1)
        self.iou_threshold = iou_threshold

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        logits = self.vision_logit(out.regions()).squeeze(-1)  # (B, R)
        logits = logits.masked_fill(batch["visual_mask"] == 0, -1e4)
        target = batch["refer_targets"]
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean() * target.shape[1]
        return ObjectiveResult(loss, logits, batch.get("refer_ious", target))

    def make_metrics(self) -> dict[str, Metric]:
        return {"refer_acc": Accuracy()}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        best_iou = result.target.gather(1, result.logits.argmax(-1, keepdim=True)).squeeze(1)
        metrics["refer_acc"].update((best_iou > self.iou_threshold).long(), torch.ones_like(best_iou, dtype=torch.long))

    def predictions(self, result: ObjectiveResult, batch: dict[str, Any]) -> list[dict[str, Any]]:
        if "ref_id" not in batch:
            return []
        regions = result.logits.argmax(-1).tolist()
        return [
            {"key": f"{r}:{s}", "ref_id": int(r), "sent_id": int(s), "region": int(k)}
            for r, s, k in zip(batch["ref_id"].tolist(), batch["sent_id"].tolist(), regions)
        ]
