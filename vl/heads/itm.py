"""Image-text matching on the pooled vector (1 = aligned), and the import of ViLBERT-seed alignment heads."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vl.heads.base import EncoderOutput, Objective, ObjectiveResult


class ImageTextMatching(Objective):
    """2-way classifier on the pooled output; `itm_labels` 1 = aligned."""

    name = "itm"
    needs = ("image",)
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
