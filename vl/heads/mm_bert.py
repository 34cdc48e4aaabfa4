"""MM-BERT's heads (spec `mm_bert.md`): masked visual-region classification with soft cross-entropy (MVRC), image-text
matching as one logit with BCE (retrieval fine-tuning), and Multimodal Lexical Translation (MLT) classification.
MLM is the shared `mlm` head (tied to the word embeddings). Registered when `vl.models.mm_bert` is imported."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vl.errors import ConfigError
from vl.heads.base import EncoderOutput, HeadContext, Objective, ObjectiveResult


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, C), (N, C) -> (N,): -sum_c target_c log_softmax(logits)_c."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1)


class MaskedVisualRegionClassification(Objective):
    """MVRC: Linear(H,H)-GELU-Linear(H,C) on the states of the MVRC-chosen regions (``region_mask_labels`` (B,R); the
    whole-image box is ``visual[:, 0]`` and never chosen), soft cross-entropy against the detector's C-way class scores
    (``region_cls_prob`` (B,R,C)), averaged over the chosen regions whose target sums to 1 within ``sum_tolerance``
    (|sum - 1| < 0.1, strict, as the seed's ``soft_cross_entropy``; others do not count). Accuracy: arg-max agreement
    on those regions."""

    name = "mvrc"
    needs = ("regions",)
    requires = ("region_mask_labels", "region_cls_prob")

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> MaskedVisualRegionClassification:
        if not ctx.data_info.get("num_region_classes"):
            raise ConfigError("data.objectives: 'mvrc' needs region features with class scores ('classes')")
        return cls(hidden_size=ctx.visual_size, num_classes=int(ctx.data_info["num_region_classes"]), **options)

    def __init__(self, *, hidden_size: int, num_classes: int, sum_tolerance: float = 0.1) -> None:
        super().__init__()
        self.sum_tolerance = sum_tolerance
        self.head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, num_classes))

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        target = batch["region_cls_prob"]
        chosen = batch["region_mask_labels"].bool()
        chosen = chosen & ((target.sum(-1) - 1.0).abs() < self.sum_tolerance)
        logits = self.head(out.regions()[chosen])  # (M, C)
        target = target[chosen]
        if not target.shape[0]:  # keep the head in the graph (zero gradients), so DDP ranks stay in step
            return ObjectiveResult(logits.sum() * 0.0 + out.pooled.sum() * 0.0, logits, target.argmax(-1))
        return ObjectiveResult(soft_cross_entropy(logits, target).mean(), logits, target.argmax(-1))


class BinaryImageTextMatching(Objective):
    """MM-BERT's relationship head: Linear(H, 1) on the pooled output, BCE(sigmoid(logit), ``itm_labels``) (1 =
    aligned). `score(pooled)` = sigmoid(logit), the retrieval score.

    Accuracy (`itm_bce_acc`): "aligned" when the raw logit > `logit_threshold`, 0.5 by default as the seed's
    `RelationshipAccuracy` (VL-BERT `common/metrics/retrieval_metrics.py`, its "sigmoid, single output" edit compares
    the logit itself with 0.5, i.e. sigmoid > 0.62); `model.heads.itm_bce.logit_threshold=0`: sigmoid > 0.5. A logged
    metric only: the loss and the retrieval scores do not depend on it."""

    name = "itm_bce"
    needs = ("image",)
    requires = ("itm_labels",)

    def __init__(self, *, hidden_size: int, logit_threshold: float = 0.5) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, 1)
        self.logit_threshold = float(logit_threshold)

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.classifier(pooled).squeeze(-1))

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        logit = self.classifier(out.pooled).squeeze(-1)
        labels = batch["itm_labels"]
        loss = F.binary_cross_entropy_with_logits(logit, labels.to(logit.dtype))
        shifted = logit - self.logit_threshold  # two columns whose arg-max is 1 exactly when logit > the threshold
        return ObjectiveResult(loss, torch.stack([-shifted, shifted], dim=-1), labels.long())


class MultimodalLexicalTranslation(Objective):
    """MLT: Linear(H, num_mlt_words) on the pooled output of ``[CLS] word_en [SEP] caption_en [SEP]`` + image, CE
    against ``mlt_labels`` (the index of word_de in MLT_vocab.txt). Rows with several accepted words (test2018's
    ``word_de`` options: ``mlt_options`` (B, K), -1 padded) count as correct when the arg-max is any of them."""

    name = "mlt"
    needs = ("text",)
    requires = ("mlt_labels",)

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> MultimodalLexicalTranslation:
        if not ctx.data_info.get("num_mlt_words"):
            raise ConfigError("data.objectives: 'mlt' needs the MLT vocabulary (data_info num_mlt_words)")
        return cls(hidden_size=ctx.pooled_size, num_words=int(ctx.data_info["num_mlt_words"]), **options)

    def __init__(self, *, hidden_size: int, num_words: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_words)

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        logits = self.classifier(out.pooled)
        labels = batch["mlt_labels"]
        loss = F.cross_entropy(logits, labels)
        options = batch.get("mlt_options")
        if options is not None:  # any listed option counts: report the prediction as the label when it is one
            pred = logits.argmax(-1)
            hit = (options.long() == pred[:, None]).any(-1)
            labels = torch.where(hit, pred, labels)
        return ObjectiveResult(loss, logits, labels)
