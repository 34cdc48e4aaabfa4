"""VQA answer classification (soft-score BCE x answers) on the pooled vector."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from vl.errors import ConfigError
from vl.heads.base import EncoderOutput, HeadContext, Objective, ObjectiveResult
from vl.metrics import VQAAccuracy


class _NormParams(nn.Module):
    """g and v of a `dim=None` weight norm. g is stored with shape (1,), not torch's () (FSDP refuses 0-d
    parameters); a state dict with a 0-d g (torch's parametrization, a ViLBERT checkpoint's `weight_g`) loads."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.original0 = nn.Parameter(weight.norm().detach().clone().reshape(1))  # g: the weight's norm
        self.original1 = nn.Parameter(weight.detach().clone())  # v: its direction

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        g = state_dict.get(prefix + "original0")
        if isinstance(g, torch.Tensor) and g.dim() == 0:
            state_dict[prefix + "original0"] = g.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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

    def bert_init(self, std: float) -> None:
        """What the seed's `init_bert_weights` does to a `weight_norm`ed `nn.Linear`: the bias is zeroed; the normal
        draw lands on the computed `weight` attribute, which the next forward recomputes from g and v, so g and v
        keep `nn.Linear`'s default init."""
        nn.init.zeros_(self.bias)


def simple_classifier(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.5) -> nn.Sequential:
    """ViLBERT's `SimpleClassifier`: weight-normed Linear -> ReLU -> Dropout -> weight-normed Linear."""
    return nn.Sequential(
        WeightNormLinear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), WeightNormLinear(hidden, out_dim)
    )


class VQAClassification(Objective):
    """Answer classifier on the pooled output; BCE-with-logits (mean) x num_answers, or x `loss_scale` when set
    (CLIP-ViL's `--loss_scale`: its published VQA command passes 500).

    `classifier="mlp"`: Linear-GELU-LN-Linear (VisualBERT/LXMERT); `"simple"`: ViLBERT's weight-normed SimpleClassifier
    (2 x hidden, dropout 0.5)."""

    name = "vqa"
    requires = ("vqa_targets",)

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> VQAClassification:
        if "num_answers" not in ctx.data_info:
            raise ConfigError("data.objectives: 'vqa' needs a data module that provides an answer vocabulary")
        return cls(hidden_size=ctx.pooled_size, num_answers=int(ctx.data_info["num_answers"]), **options)

    def __init__(
        self, *, hidden_size: int, num_answers: int, classifier: str = "mlp", loss_scale: float | None = None
    ) -> None:
        super().__init__()
        self.num_answers = num_answers
        if loss_scale is not None and not float(loss_scale) > 0:
            raise ConfigError(f"model.heads.vqa.loss_scale: {loss_scale} is not > 0 (null: x the number of answers)")
        self.loss_scale = float(loss_scale) if loss_scale is not None else float(num_answers)
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
        loss = F.binary_cross_entropy_with_logits(logits, target) * self.loss_scale
        return ObjectiveResult(loss, logits, target)

    def make_metrics(self) -> dict[str, Metric]:
        return {"vqa_acc": VQAAccuracy()}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        metrics["vqa_acc"].update(result.logits, result.target)

    def predictions(self, result: ObjectiveResult, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return self._rows(result.logits, batch)

    def unlabelled_predictions(self, out: EncoderOutput, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The argmax answer of questions without targets (VQA test2015 / test-dev2015: the EvalAI file)."""
        return self._rows(self.classifier(out.pooled), batch)

    @staticmethod
    def _rows(logits: torch.Tensor, batch: dict[str, Any]) -> list[dict[str, Any]]:
        if "question_id" not in batch:
            return []
        pred = logits.argmax(-1).tolist()
        return [
            {"key": int(q), "question_id": int(q), "answer_idx": int(i)}
            for q, i in zip(batch["question_id"].tolist(), pred)
        ]
