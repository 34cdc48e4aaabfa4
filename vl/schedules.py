"""LR schedules used as `_partial_: true` configs; `total_steps` comes from `trainer.estimated_stepping_batches`."""

from __future__ import annotations

from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup_decay(
    optimizer: Optimizer, *, total_steps: int, warmup_ratio: float = 0.1, final_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup over `warmup_ratio * total_steps`, then linear decay to `final_ratio` of the peak."""
    warmup = max(1, int(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(final_ratio, 1.0 - (1.0 - final_ratio) * progress)

    return LambdaLR(optimizer, factor)


def linear_warmup_constant(optimizer: Optimizer, *, total_steps: int, warmup_ratio: float = 0.1) -> LambdaLR:
    """Linear warmup, then constant."""
    warmup = max(1, int(warmup_ratio * total_steps))
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


def warmup_constant_step_decay(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_ratio: float = 0.1,
    decay_epochs: Sequence[int] = (12, 16),
    gamma: float = 0.1,
) -> LambdaLR:
    """ViLBERT fine-tuning: linear warmup over `warmup_ratio * total_steps` then constant (BertAdam
    `warmup_constant`), times `gamma` from each epoch in `decay_epochs` on (LambdaLR x0.1 at epochs 12 and 16)."""
    warmup = max(1, int(warmup_ratio * total_steps))
    milestones = sorted(int(e) for e in decay_epochs)

    def factor(step: int) -> float:
        epoch = step // max(1, steps_per_epoch)
        return min(1.0, (step + 1) / warmup) * gamma ** sum(epoch >= m for m in milestones)

    return LambdaLR(optimizer, factor)
