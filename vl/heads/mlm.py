"""Masked language modelling: the BERT MLM head tied to the encoder's word embeddings."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vl.heads.base import IGNORE_INDEX, EncoderOutput, HeadContext, Objective, ObjectiveResult


class MaskedLanguageModeling(Objective):
    """BERT MLM head (dense-GELU-LN + decoder tied to the word embeddings); CE on masked positions only."""

    name = "mlm"
    needs = ("text",)
    requires = ("mlm_labels",)

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> MaskedLanguageModeling:
        return cls(hidden_size=ctx.text_size, word_embeddings=ctx.word_embeddings, **options)

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
