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

    def predictions(self, result: ObjectiveResult, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows for the task's submission file (test stage); each has a unique `key` (de-duplication across ranks)."""
        return []


class MaskedLanguageModeling(Objective):
    """BERT MLM head (dense-GELU-LN + decoder tied to the word embeddings); CE on masked positions only.

    `on_mismatched_pairs` (`model.heads.mlm.on_mismatched_pairs`): whether captions paired with the wrong image
    (`itm_labels` 0) count in the MLM loss. True (default) = BERT / ViLBERT's reference (`BertForMultiModalPreTraining`
    keeps the masked-LM loss on every pair); False = LXMERT's convention (MLM on aligned pairs only), what
    `model=single_stream` / `visual_bert_tiny` use."""

    name = "mlm"
    requires = ("mlm_labels",)

    def __init__(
        self,
        *,
        hidden_size: int,
        word_embeddings: nn.Embedding,
        layer_norm_eps: float = 1e-12,
        on_mismatched_pairs: bool = True,
    ) -> None:
        super().__init__()
        self.on_mismatched_pairs = on_mismatched_pairs
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
        if not self.on_mismatched_pairs and "itm_labels" in batch:  # MLM on aligned pairs only
            masked = masked & (batch["itm_labels"] == 1).unsqueeze(1)
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


class _NormParams(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.original0 = nn.Parameter(weight.norm().detach().clone())  # g: the weight's norm (a scalar)
        self.original1 = nn.Parameter(weight.detach().clone())  # v: its direction


class WeightNormLinear(nn.Module):
    """`torch.nn.utils.parametrizations.weight_norm(nn.Linear(i, o), dim=None)` as a plain module: weight = g * v / |v|
    (one norm over the whole matrix), the same init and state-dict keys (`parametrizations.weight.original0/1`,
    `bias`), but picklable, so `ddp_spawn` can send it to its processes (parametrized modules refuse to pickle)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features)
        self.parametrizations = nn.ModuleDict({"weight": _NormParams(linear.weight)})
        self.bias = nn.Parameter(linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        p = self.parametrizations["weight"]
        return p.original1 * (p.original0 / p.original1.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def simple_classifier(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.5) -> nn.Sequential:
    """ViLBERT's `SimpleClassifier`: weight-normed Linear -> ReLU -> Dropout -> weight-normed Linear."""
    return nn.Sequential(
        WeightNormLinear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), WeightNormLinear(hidden, out_dim)
    )


class VQAClassification(Objective):
    """Answer classifier on the pooled output; BCE-with-logits (mean) x num_answers.

    `classifier="mlp"`: Linear-GELU-LN-Linear (VisualBERT/LXMERT); `"simple"`: ViLBERT's weight-normed SimpleClassifier
    (2 x hidden, dropout 0.5)."""

    name = "vqa"
    requires = ("vqa_targets",)

    def __init__(self, *, hidden_size: int, num_answers: int, classifier: str = "mlp") -> None:
        super().__init__()
        self.num_answers = num_answers
        if classifier == "simple":
            self.classifier = simple_classifier(hidden_size, 2 * hidden_size, num_answers)
        elif classifier == "mlp":
            self.classifier = nn.Sequential(
                nn.Linear(hidden_size, 2 * hidden_size),
                nn.GELU(),
                nn.LayerNorm(2 * hidden_size, eps=1e-12),
                nn.Linear(2 * hidden_size, num_answers),
            )
        else:
            raise ConfigError(f"model.heads.vqa.classifier: '{classifier}' is not one of 'mlp', 'simple'")

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        logits = self.classifier(out.pooled)
        target = batch["vqa_targets"]  # (B, A) soft scores
        loss = F.binary_cross_entropy_with_logits(logits, target) * self.num_answers
        return ObjectiveResult(loss, logits, target)

    def make_metrics(self) -> dict[str, Metric]:
        return {"vqa_acc": VQAAccuracy()}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        metrics["vqa_acc"].update(result.logits, result.target)

    def predictions(self, result: ObjectiveResult, batch: dict[str, Any]) -> list[dict[str, Any]]:
        if "question_id" not in batch:
            return []
        pred = result.logits.argmax(-1).tolist()
        return [
            {"key": int(q), "question_id": int(q), "answer_idx": int(i)}
            for q, i in zip(batch["question_id"].tolist(), pred)
        ]


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


class MultipleChoice(Objective):
    """ViLBERT's `vil_logit`: Linear(H, 1) on the pooled output of every (text, image) row.

    The collator flattens each example's K blocks of C choices into B*K*C rows (block-major); `mc_labels` (B, K) holds
    the correct choice per block (-1 = unlabelled). Loss: cross-entropy over the C choices of every labelled block.
    Retrieval training uses one block of 4 (true pair, random caption, random image, hard negative)."""

    name = "retrieval"
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
    that block."""

    name = "vcr"

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


class RegionGrounding(Objective):
    """ViLBERT's `vision_logit`: Linear(Hv, 1) per region, padded regions pushed to -1e4. Loss: BCE-with-logits against
    `refer_targets` (B, R) (IoU with the referred box, < 0.5 set to 0), mean x the number of candidates. Metric
    `refer_acc`: the arg-max candidate's IoU (`refer_ious`) is > 0.5.

    `whole_image_candidate` (`model.heads.refer.whole_image_candidate`, default true = vilbert-multi-task): with an
    encoder that has a whole-image token (ViLBERT's global token, `EncoderOutput.visual_prefix` = 1) it is a candidate
    too, with target / IoU `refer_image_target` / `refer_image_iou` (the box [0, 0, W, H]), and can be chosen (its
    prediction's `region` is -1). False: regions only. Encoders without such a token always score regions only."""

    name = "refer"
    requires = ("refer_targets",)

    def __init__(self, *, hidden_size: int, iou_threshold: float = 0.5, whole_image_candidate: bool = True) -> None:
        super().__init__()
        self.vision_logit = nn.Linear(hidden_size, 1)
        self.iou_threshold = iou_threshold
        self.whole_image_candidate = whole_image_candidate

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        logits = self.vision_logit(out.regions()).squeeze(-1)  # (B, R)
        logits = logits.masked_fill(batch["visual_mask"] == 0, -1e4)
        target = batch["refer_targets"]
        ious = batch.get("refer_ious", target)
        if self.whole_image_candidate and out.visual_prefix >= 1 and "refer_image_target" in batch:
            assert out.visual is not None
            image_logit = self.vision_logit(out.visual[:, out.visual_prefix - 1]).squeeze(-1)  # (B,)
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


OBJECTIVES: dict[str, type[Objective]] = {
    "mlm": MaskedLanguageModeling,
    "itm": ImageTextMatching,
    "vqa": VQAClassification,
    "mrc": MaskedRegionClassification,
    "mrfr": MaskedRegionFeatureRegression,
    "retrieval": MultipleChoice,
    "vcr": VCRMultipleChoice,
    "refer": RegionGrounding,
}

#: objectives whose collator must mask regions
REGION_MASKING = ("mrc", "mrfr")
#: objectives that score region states (`EncoderOutput.regions()`) / that are meaningless without any image input
REGION_OBJECTIVES = (*REGION_MASKING, "refer")
IMAGE_OBJECTIVES = ("itm", "retrieval")


def build_objectives(
    names: list[str],
    *,
    hidden_size: int,
    word_embeddings: nn.Embedding,
    data_info: dict[str, Any],
    text_hidden_size: int | None = None,
    visual_hidden_size: int | None = None,
    head_options: dict[str, dict[str, Any]] | None = None,
) -> nn.ModuleDict:
    """Instantiate the named objectives; `data_info` supplies corpus facts (`num_answers`, `num_region_classes`,
    `visual_dim`); `head_options[name]` extra keyword arguments of a head (`model.heads`, e.g. the VQA classifier type).

    `hidden_size` is the size of `EncoderOutput.pooled` (ITM, VQA heads); `text_hidden_size` / `visual_hidden_size`
    those of `EncoderOutput.text` (MLM head) / `.visual` (region heads), when they differ (two-stream models).
    """
    heads = nn.ModuleDict()
    head_options = dict(head_options or {})
    for unknown in sorted(set(head_options) - set(OBJECTIVES)):  # options of heads this data doesn't use are fine
        raise ConfigError(f"model.heads.{unknown}: unknown objective; choose from {sorted(OBJECTIVES)}")
    for name in names:
        options = dict(head_options.get(name) or {})
        if name not in OBJECTIVES:
            raise ConfigError(f"data.objectives: unknown objective '{name}'; choose from {sorted(OBJECTIVES)}")
        if name == "mlm":
            heads[name] = MaskedLanguageModeling(
                hidden_size=text_hidden_size or hidden_size, word_embeddings=word_embeddings, **options
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
            heads[name] = VQAClassification(
                hidden_size=hidden_size, num_answers=int(data_info["num_answers"]), **options
            )
        elif name == "refer":
            heads[name] = RegionGrounding(hidden_size=visual_hidden_size or hidden_size, **options)
        else:
            heads[name] = OBJECTIVES[name](hidden_size=hidden_size, **options)
    return heads
