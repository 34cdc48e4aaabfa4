"""Masked language modelling: the BERT MLM head tied to the encoder's word embeddings."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vl.heads.base import IGNORE_INDEX, EncoderOutput, HeadContext, Objective, ObjectiveResult


class MaskedLanguageModeling(Objective):
    """BERT MLM head (dense-GELU-LN + decoder tied to the word embeddings); CE on masked positions only.

    `on_mismatched_pairs` (`model.heads.mlm.on_mismatched_pairs`): whether captions paired with the wrong image
    (`itm_labels` 0) count in the MLM loss. True (default) = BERT / ViLBERT's reference (`BertForMultiModalPreTraining`
    keeps the masked-LM loss on every pair); False = LXMERT's convention (MLM on aligned pairs only), what
    `model=single_stream` / `visual_bert_tiny` use."""

    name = "mlm"
    needs = ("text",)
    requires = ("mlm_labels",)

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> MaskedLanguageModeling:
        return cls(hidden_size=ctx.text_size, word_embeddings=ctx.word_embeddings, **options)

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
