"""Multiple choice (ViLBERT's `vil_logit`): retrieval training as 4-way choice, VCR Q->A / QA->R blocks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from vl.heads.base import EncoderOutput, Objective, ObjectiveResult
from vl.metrics import Accuracy


class MultipleChoice(Objective):
    """ViLBERT's `vil_logit`: Linear(H, 1) on the pooled output of every (text, image) row.

    The collator flattens each example's K blocks of C choices into B*K*C rows (block-major); `mc_labels` (B, K) holds
    the correct choice per block (-1 = unlabelled). Loss: cross-entropy over the C choices of every labelled block.
    Retrieval training uses one block of 4 (true pair, random caption, random image, hard negative)."""

    name = "retrieval"
    needs = ("image",)
    requires = ("mc_labels",)

    def __init__(self, *, hidden_size: int) -> None:
        super().__init__()
        self.vil_logit = nn.Linear(hidden_size, 1)

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N,) matching score of each row (higher = better match)."""
        return self.vil_logit(pooled).squeeze(-1)

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        labels = batch["mc_labels"]  # (B, K)
        logits = self.score(out.pooled).view(labels.shape[0], labels.shape[1], -1)  # (B, K, C)
        keep = labels >= 0
        loss = F.cross_entropy(logits[keep], labels[keep]) if keep.any() else logits.sum() * 0.0
        return ObjectiveResult(loss, logits, labels)

    def make_metrics(self) -> dict[str, Metric]:
        return {f"{self.name}_acc": Accuracy(ignore_index=-1)}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        metrics[f"{self.name}_acc"].update(result.logits.argmax(-1).flatten(), result.target.flatten())


class VCRMultipleChoice(MultipleChoice):
    """VCR Q->A and QA->R as two 4-way blocks per example: `mc_labels` (B, 2) = (answer, rationale given the gold
    answer). Metrics: `vcr_qa_acc`, `vcr_qar_acc` and the joint `vcr_q2ar_acc` (both right).

    The test split uses 5 blocks (Q->A, then QA->R conditioned on each of the 4 answers) for the leaderboard file;
    only the block of the gold answer carries a rationale label there (all -1 when unlabelled), and the metrics read
    that block.

    Training with `data.vcr_steps=separate` gives one block per example: `mc_labels` (B, 1) and `vcr_block` (B,) (0 =
    Q->A, 1 = QA->R). The loss is that block's 4-way CE; the result is laid out as (B, 2) with the absent block's label
    -1 (its logits 0), so the metrics count each block where it was trained and the joint Q->AR nowhere."""

    name = "vcr"
    needs = ()

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        result = super().forward(out, batch)
        block = batch.get("vcr_block")
        if block is None:
            return result
        rows = torch.arange(result.target.shape[0], device=result.target.device)
        logits = result.logits.new_zeros(result.logits.shape[0], 2, result.logits.shape[2])
        labels = result.target.new_full((result.target.shape[0], 2), -1)
        logits[rows, block] = result.logits[:, 0]
        labels[rows, block] = result.target[:, 0]
        return ObjectiveResult(result.loss, logits, labels)

    def make_metrics(self) -> dict[str, Metric]:
        return {name: Accuracy(ignore_index=-1) for name in ("vcr_qa_acc", "vcr_qar_acc", "vcr_q2ar_acc")}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        labels, pred = result.target, result.logits.argmax(-1)  # (B, K)
        if labels.shape[1] > 2:  # 5-block layout: keep Q->A and the QA->R block conditioned on the gold answer
            block = (1 + labels[:, :1].clamp(min=0)).long()  # (B, 1); unlabelled rows are all -1 anyway
            labels = torch.cat([labels[:, :1], labels.gather(1, block)], 1)
            pred = torch.cat([pred[:, :1], pred.gather(1, block)], 1)
        metrics["vcr_qa_acc"].update(pred[:, 0], labels[:, 0])
        metrics["vcr_qar_acc"].update(pred[:, 1], labels[:, 1])
        both_labelled = (labels >= 0).all(1)
        joint = (pred == labels).all(1).long()
        metrics["vcr_q2ar_acc"].update(joint, torch.where(both_labelled, 1, -1))

    def predictions(self, result: ObjectiveResult, batch: dict[str, Any]) -> list[dict[str, Any]]:
        probs = result.logits.softmax(-1)  # (B, K, 4)
        rows = []
        for i, annot_id in enumerate(batch.get("annot_id", [])):
            rows.append(
                {
                    "key": str(annot_id),
                    "annot_id": str(annot_id),
                    "answer_probs": probs[i, 0].tolist(),
                    "rationale_probs": probs[i, 1:].tolist() if probs.shape[1] > 2 else probs[i, 1].tolist(),
                }
            )
        return rows
