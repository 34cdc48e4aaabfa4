"""LR schedules used as `_partial_: true` configs; `total_steps` comes from `trainer.estimated_stepping_batches`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup_decay(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_ratio: float = 0.1,
    final_ratio: float = 0.0,
    warmup_steps: int | None = None,
) -> LambdaLR:
    """Linear warmup over `warmup_ratio * total_steps` (or `warmup_steps`), then linear decay to `final_ratio` of the
    peak at `total_steps`. With `final_ratio=0` this is also VL-BERT's `triangle` schedule (MM-BERT)."""
    warmup = max(1, int(warmup_steps if warmup_steps is not None else warmup_ratio * total_steps))

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
    warmup_steps: int | None = None,
) -> LambdaLR:
    """ViLBERT fine-tuning: linear warmup over `warmup_ratio * total_steps` then constant (BertAdam
    `warmup_constant`), times `gamma` from each epoch in `decay_epochs` on (LambdaLR x0.1 at epochs 12 and 16).
    `warmup_steps`: the warmup length in steps instead of the ratio (None: the ratio; as `linear_warmup_decay`, so a
    model file's `warmup_steps: null` composes with this schedule, e.g. under `experiment=compare`)."""
    warmup = max(1, int(warmup_steps if warmup_steps is not None else warmup_ratio * total_steps))
    milestones = sorted(int(e) for e in decay_epochs)

    def factor(step: int) -> float:
        epoch = step // max(1, steps_per_epoch)
        return min(1.0, (step + 1) / warmup) * gamma ** sum(epoch >= m for m in milestones)

    return LambdaLR(optimizer, factor)


def warmup_decay(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float = 0.05,
    warmup_type: str = "log",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """DeepSpeed's `WarmupDecayLR` (the CLIP-BERT study's `bert-lxmert-train-scratch` schedule), step for step: each
    group's lr rises from `min_lr_ratio` x its lr to its lr over `warmup_steps` (default `warmup_ratio x
    total_steps`; at least 2) by DeepSpeed's default `warmup_type="log"` (log(i + 1) / log(W)) or `"linear"` (i / W),
    then falls linearly to 0 at `total_steps`. As under DeepSpeed, optimizer step s runs at the schedule's value of
    iteration s - 1 (its scheduler steps after the optimizer): the first step at the minimum."""
    if warmup_type not in ("log", "linear"):
        raise ValueError(f"warmup_decay: warmup_type '{warmup_type}' is not 'log' or 'linear'")
    warmup = max(2, int(warmup_steps if warmup_steps is not None else warmup_ratio * total_steps))

    def gamma(iteration: int) -> float:
        if iteration < 0:
            return 0.0
        if iteration < warmup:
            return math.log(iteration + 1) / math.log(warmup) if warmup_type == "log" else iteration / warmup
        return max(0.0, (total_steps - iteration) / max(1.0, total_steps - warmup))

    return LambdaLR(optimizer, lambda step: min_lr_ratio + (1.0 - min_lr_ratio) * gamma(step - 1))
