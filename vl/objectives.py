"""Training objectives and task heads, shared by every architecture.

Each objective reads an `EncoderOutput` plus batch keys (see `vl.data.collate`) and returns a loss and what its
metrics need. Heads never know which architecture produced the states.

Label conventions (one, internally): `mlm_labels` use ignore index -100; `itm_labels` 1 = aligned, 0 = not aligned
(ViLBERT's "0 = aligned" is converted where its checkpoints/data are read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from vl.errors import ConfigError
from vl.metrics import Accuracy, VQAAccuracy

IGNORE_INDEX = -100


@dataclass
class EncoderOutput:
    """What every encoder returns: text (B, T, Ht), visual (B, P+R, Hv) or None, pooled (B, Hp).

    `visual_prefix` = P extra leading visual positions that are not regions (ViLBERT's global image token): region
    heads read `visual[:, visual_prefix:]`, aligned with the batch's (B, R) region tensors.
    """

    text: torch.Tensor
    visual: torch.Tensor | None
    pooled: torch.Tensor
    visual_prefix: int = 0

    def regions(self) -> torch.Tensor:
        """(B, R, Hv): the visual states of the regions only."""
        assert self.visual is not None, "this encoder returns no visual states"
        return self.visual[:, self.visual_prefix :]


@dataclass
class ObjectiveResult:
    loss: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor


class Objective(nn.Module):
    """Base: `forward(out, batch) -> ObjectiveResult`; `make_metrics()` -> {name: Metric}; `update_metrics`."""

    name: str = ""
    requires: tuple[str, ...] = ()

    def make_metrics(self) -> dict[str, Metric]:
        return {f"{self.name}_acc": Accuracy()}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        metrics[f"{self.name}_acc"].update(result.logits.argmax(-1), result.target)


class MaskedLanguageModeling(Objective):
    """BERT MLM head (dense-GELU-LN + decoder tied to the word embeddings); CE on masked positions only."""

    name = "mlm"
    requires = ("mlm_labels",)

    def __init__(self, *, hidden_size: int, word_embeddings: nn.Embedding, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.transform = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        )
        self.word_embeddings = word_embeddings  # tied decoder weight (V, H); a shared reference, not a copy
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def logits(self, text_states: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V)."""
        return F.linear(self.transform(text_states), self.word_embeddings.weight, self.bias)

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        labels = batch["mlm_labels"]  # (B, T)
        masked = labels != IGNORE_INDEX
        logits = self.logits(out.text[masked])  # (M, V): only masked positions, never (B, T, V)
        target = labels[masked]
        loss = F.cross_entropy(logits, target) if target.numel() else out.text.sum() * 0.0
        return ObjectiveResult(loss, logits, target)


class ImageTextMatching(Objective):
    """2-way classifier on the pooled output; `itm_labels` 1 = aligned."""

    name = "itm"
    requires = ("itm_labels",)

    def __init__(self, *, hidden_size: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, 2)

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        logits = self.classifier(out.pooled)
        return ObjectiveResult(F.cross_entropy(logits, batch["itm_labels"]), logits, batch["itm_labels"])


def itm_head_from_seed(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Import a ViLBERT-seed alignment head (`bi_seq_relationship`, (2, H) / (2,), index 0 = aligned) as a vl ITM
    classifier (index 1 = aligned): the two rows swap. The only place the seed's convention is converted."""
    return weight.flip(0).clone(), bias.flip(0).clone()


def itm_labels_from_seed(labels: torch.Tensor) -> torch.Tensor:
    """Seed-format alignment labels (0 = aligned, 1 = not) -> vl's (1 = aligned)."""
    return 1 - labels


class VQAClassification(Objective):
    """Answer classifier Linear-GELU-LN-Linear on the pooled output; BCE-with-logits (mean) x num_answers."""

    name = "vqa"
    requires = ("vqa_targets",)

    def __init__(self, *, hidden_size: int, num_answers: int) -> None:
        super().__init__()
        self.num_answers = num_answers
        self.classifier = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.GELU(),
            nn.LayerNorm(2 * hidden_size, eps=1e-12),
            nn.Linear(2 * hidden_size, num_answers),
        )

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        logits = self.classifier(out.pooled)
        target = batch["vqa_targets"]  # (B, A) soft scores
        loss = F.binary_cross_entropy_with_logits(logits, target) * self.num_answers
        return ObjectiveResult(loss, logits, target)

    def make_metrics(self) -> dict[str, Metric]:
        return {"vqa_acc": VQAAccuracy()}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        metrics["vqa_acc"].update(result.logits, result.target)


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
    requires = ("region_mask_labels", "region_cls_prob")

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
    requires = ("region_mask_labels", "region_feat_targets")

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


OBJECTIVES: dict[str, type[Objective]] = {
    "mlm": MaskedLanguageModeling,
    "itm": ImageTextMatching,
    "vqa": VQAClassification,
    "mrc": MaskedRegionClassification,
    "mrfr": MaskedRegionFeatureRegression,
}

#: objectives whose collator must mask regions
REGION_MASKING = ("mrc", "mrfr")


def build_objectives(
    names: list[str],
    *,
    hidden_size: int,
    word_embeddings: nn.Embedding,
    data_info: dict[str, Any],
    text_hidden_size: int | None = None,
    visual_hidden_size: int | None = None,
) -> nn.ModuleDict:
    """Instantiate the named objectives; `data_info` supplies corpus facts (`num_answers`, `num_region_classes`,
    `visual_dim`).

    `hidden_size` is the size of `EncoderOutput.pooled` (ITM, VQA heads); `text_hidden_size` / `visual_hidden_size`
    those of `EncoderOutput.text` (MLM head) / `.visual` (region heads), when they differ (two-stream models).
    """
    heads = nn.ModuleDict()
    for name in names:
        if name not in OBJECTIVES:
            raise ConfigError(f"data.objectives: unknown objective '{name}'; choose from {sorted(OBJECTIVES)}")
        if name == "mlm":
            heads[name] = MaskedLanguageModeling(
                hidden_size=text_hidden_size or hidden_size, word_embeddings=word_embeddings
            )
        elif name == "mrc":
            if not data_info.get("num_region_classes"):
                raise ConfigError("data.objectives: 'mrc' needs region features with class distributions (cls_prob)")
            heads[name] = MaskedRegionClassification(
                hidden_size=visual_hidden_size or hidden_size, num_classes=int(data_info["num_region_classes"])
            )
        elif name == "mrfr":
            heads[name] = MaskedRegionFeatureRegression(
                hidden_size=visual_hidden_size or hidden_size, feature_dim=int(data_info["visual_dim"])
            )
        elif name == "vqa":
            if "num_answers" not in data_info:
                raise ConfigError("data.objectives: 'vqa' needs a data module that provides an answer vocabulary")
            heads[name] = VQAClassification(hidden_size=hidden_size, num_answers=int(data_info["num_answers"]))
        else:
            heads[name] = OBJECTIVES[name](hidden_size=hidden_size)
    return heads
