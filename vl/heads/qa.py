"""LXMERT / CLIP-ViL pretraining QA: cross-entropy over the pretraining answer list (all_ans.json, 9500) on the
pooled vector, only for matched pairs that have a label (spec: clip_vil.md, stage 2)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from vl.errors import ConfigError
from vl.heads.base import EncoderOutput, HeadContext, Objective, ObjectiveResult
from vl.metrics import Accuracy


def answer_mlp(hidden_size: int, num_answers: int) -> nn.Sequential:
    """`logit_fc`: Linear(H, 2H) - GELU - LayerNorm(eps 1e-12) - Linear(2H, A)."""
    return nn.Sequential(
        nn.Linear(hidden_size, 2 * hidden_size),
        nn.GELU(),
        nn.LayerNorm(2 * hidden_size, eps=1e-12),
        nn.Linear(2 * hidden_size, num_answers),
    )


class PretrainQA(Objective):
    """`qa_labels` (B,): the sampled answer id, -1 = none (unlabelled or mismatched; with `itm_labels` in the batch,
    mismatched pairs are also masked here). Loss: mean CE over the labelled rows (0 when a batch has none)."""

    name = "qa"
    needs = ("image",)
    requires = ("qa_labels",)

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> PretrainQA:
        if "num_qa_answers" not in ctx.data_info:
            raise ConfigError("data.objectives: 'qa' needs a data module with a pretraining answer list (all_ans.json)")
        return cls(hidden_size=ctx.pooled_size, num_answers=int(ctx.data_info["num_qa_answers"]), **options)

    def __init__(self, *, hidden_size: int, num_answers: int) -> None:
        super().__init__()
        self.num_answers = num_answers
        self.classifier = answer_mlp(hidden_size, num_answers)

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        labels = batch["qa_labels"]
        valid = labels >= 0
        if "itm_labels" in batch:
            valid = valid & (batch["itm_labels"] == 1)
        logits = self.classifier(out.pooled)
        target = torch.where(valid, labels, torch.full_like(labels, -100))
        loss = F.cross_entropy(logits[valid], labels[valid]) if bool(valid.any()) else logits.sum() * 0.0
        return ObjectiveResult(loss, logits, target)

    def make_metrics(self) -> dict[str, Metric]:
        return {"qa_acc": Accuracy()}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        metrics["qa_acc"].update(result.logits.argmax(-1), result.target)
