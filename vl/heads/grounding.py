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
    """ViLBERT's `vision_logit`: Linear(Hv, 1) on dropout(region state) per region (the seed's
    `vision_logit(dropout(sequence_output_v))`, `VILBertForVLTasks` dropout p = 0.1; `dropout`,
    `model.heads.refer.dropout`; identity in eval mode), padded regions pushed to -1e4. Loss: BCE-with-logits against
    `refer_targets` (B, R) (IoU with the referred box, < 0.5 set to 0), mean x the number of candidates. Metric
    `refer_acc`: the arg-max candidate's IoU (`refer_ious`) is > 0.5.

    `whole_image_candidate` (`model.heads.refer.whole_image_candidate`, default true = vilbert-multi-task): with an
    encoder that has a whole-image token (ViLBERT's global token, `EncoderOutput.visual_prefix` = 1) it is a candidate
    too, with target / IoU `refer_image_target` / `refer_image_iou` (the box [0, 0, W, H]), and can be chosen (its
    prediction's `region` is -1). False: regions only. Encoders without such a token always score regions only."""

    name = "refer"
    needs = ("regions",)
    requires = ("refer_targets",)

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> RegionGrounding:
        return cls(hidden_size=ctx.visual_size, **options)

    def __init__(
        self,
        *,
        hidden_size: int,
        iou_threshold: float = 0.5,
        whole_image_candidate: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.vision_logit = nn.Linear(hidden_size, 1)
        self.iou_threshold = iou_threshold
        self.whole_image_candidate = whole_image_candidate

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        logits = self.vision_logit(self.dropout(out.regions())).squeeze(-1)  # (B, R)
        logits = logits.masked_fill(batch["visual_mask"] == 0, -1e4)
        target = batch["refer_targets"]
        ious = batch.get("refer_ious", target)
        if self.whole_image_candidate and out.visual_prefix >= 1 and "refer_image_target" in batch:
            assert out.visual is not None
            image_state = self.dropout(out.visual[:, out.visual_prefix - 1])  # the seed drops out every position
            image_logit = self.vision_logit(image_state).squeeze(-1)  # (B,)
            logits = torch.cat([image_logit.unsqueeze(1), logits], 1)  # (B, 1 + R): index 0 = the whole image
            target = torch.cat([batch["refer_image_target"].unsqueeze(1).to(target.dtype), target], 1)
            image_iou = batch.get("refer_image_iou", batch["refer_image_target"])
            ious = torch.cat([image_iou.unsqueeze(1).to(ious.dtype), ious], 1)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean() * target.shape[1]
        return ObjectiveResult(loss, logits, ious)

    def make_metrics(self) -> dict[str, Metric]:
        return {"refer_acc": Accuracy()}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        best_iou = result.target.gather(1, result.logits.argmax(-1, keepdim=True)).squeeze(1)
        metrics["refer_acc"].update((best_iou > self.iou_threshold).long(), torch.ones_like(best_iou, dtype=torch.long))

    def predictions(self, result: ObjectiveResult, batch: dict[str, Any]) -> list[dict[str, Any]]:
        if "ref_id" not in batch:
            return []
        offset = result.logits.shape[1] - batch["visual_mask"].shape[1]  # 1 when the whole image was a candidate
        regions = (result.logits.argmax(-1) - offset).tolist()  # -1 = the whole image
        return [
            {"key": f"{r}:{s}", "ref_id": int(r), "sent_id": int(s), "region": int(k)}
            for r, s, k in zip(batch["ref_id"].tolist(), batch["sent_id"].tolist(), regions)
        ]
