"""LR schedules used as `_partial_: true` configs; `total_steps` comes from `trainer.estimated_stepping_batches`.

Also the per-group lambdas of CLIP-ViL's one `LambdaLR` over its fused AdamW + SGD (`warmup_linear`,
`vl_warmup_linear`, `step_schedule`; `ClipVilSystem.configure_optimizers`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup_length(total_steps: float, warmup_ratio: float, warmup_steps: int | None, bert_adam: bool) -> float:
    """Steps of warmup: `warmup_steps`, else `warmup_ratio x total_steps` (rounded down to at least 1; kept as is
    under `bert_adam`, 0 included: the seed compares `step / t_total` with the ratio)."""
    if warmup_steps is not None:
        return max(1, int(warmup_steps))
    return warmup_ratio * total_steps if bert_adam else max(1, int(warmup_ratio * total_steps))


def _warmup_factor(step: int, warmup: float, bert_adam: bool) -> float:
    """1 from step `warmup` on. Before: vl's warmup gives step s (0-based) (s + 1) / W, so the first update is at
    lr / W (VL-BERT's `triangle`); pytorch-pretrained-bert's `BertAdam` (ViLBERT's seeds) reads its step counter
    before incrementing it: s / W, the first update at lr 0."""
    if step >= warmup:
        return 1.0
    return (step if bert_adam else step + 1) / warmup


def linear_warmup_decay(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_ratio: float = 0.1,
    final_ratio: float = 0.0,
    warmup_steps: int | None = None,
    bert_adam: bool = False,
    scheduler_first: bool = False,
) -> LambdaLR:
    """Linear warmup over `warmup_ratio * total_steps` (or `warmup_steps`), then linear decay to `final_ratio` of the
    peak at `total_steps`. With `final_ratio=0` this is also VL-BERT's `triangle` schedule (MM-BERT).
    `bert_adam`: pytorch-pretrained-bert `BertAdam`'s `warmup_linear` as ViLBERT's seeds step it (step s gets
    s / W during warmup, the first update at lr 0, W = warmup_ratio x total_steps unrounded; the same decay);
    default false: (s + 1) / W. `scheduler_first`: VL-BERT's trainer (MM-BERT's) calls its ``WarmupLinearSchedule``'s
    ``step()`` before ``optimizer.step()``, so update s (0-based) reads its lambda at s + 1: (s + 1) / W in warmup (as
    the default) and (T - s - 1) / (T - W) after it (the default's decay is one update later: (T - s) / (T - W))."""
    warmup = _warmup_length(total_steps, warmup_ratio, warmup_steps, bert_adam)
    if scheduler_first and bert_adam:
        raise ValueError("linear_warmup_decay: scheduler_first and bert_adam are two different seeds' rules")

    def decay(step: int) -> float:
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(final_ratio, 1.0 - (1.0 - final_ratio) * progress)

    def factor(step: int) -> float:
        if scheduler_first:  # VL-BERT's lambda read one step ahead
            return (step + 1) / warmup if step + 1 < warmup else decay(step + 1)
        if step < warmup:
            return _warmup_factor(step, warmup, bert_adam)
        return decay(step)

    return LambdaLR(optimizer, factor)


def vlbert_triangle(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_ratio: float = 0.1,
    warmup_steps: int | None = None,
) -> LambdaLR:
    """VL-BERT's ``triangle`` (MM-BERT's schedule) as its trainer steps it: `linear_warmup_decay` with
    ``scheduler_first`` (a target of its own, so a recipe that swaps the schedule, e.g. `experiment=compare`, leaves no
    key behind)."""
    return linear_warmup_decay(
        optimizer, total_steps=total_steps, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps, scheduler_first=True
    )


def linear_warmup_constant(
    optimizer: Optimizer, *, total_steps: int, warmup_ratio: float = 0.1, bert_adam: bool = False
) -> LambdaLR:
    """Linear warmup, then constant (`bert_adam`: as `linear_warmup_decay`'s, BertAdam's `warmup_constant`)."""
    warmup = _warmup_length(total_steps, warmup_ratio, None, bert_adam)
    return LambdaLR(optimizer, lambda step: _warmup_factor(step, warmup, bert_adam))


def warmup_constant_step_decay(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_ratio: float = 0.1,
    decay_epochs: Sequence[int] = (12, 16),
    gamma: float = 0.1,
    warmup_steps: int | None = None,
    bert_adam: bool = False,
    steps_per_iteration: int = 1,
) -> LambdaLR:
    """ViLBERT fine-tuning: linear warmup over `warmup_ratio * total_steps` then constant (BertAdam
    `warmup_constant`), times `gamma` from each epoch in `decay_epochs` on (LambdaLR x0.1 at epochs 12 and 16).
    `warmup_steps`: the warmup length in steps instead of the ratio (None: the ratio; as `linear_warmup_decay`, so a
    model file's `warmup_steps: null` composes with this schedule, e.g. under `experiment=compare`). `bert_adam`:
    the seed's warmup counting (s / W, first update at lr 0; see `linear_warmup_decay`). `steps_per_iteration`
    (passed by the system from the datamodule): optimizer steps per iteration of the seed's task loop. vilbert_beta's
    `t_total` counts iterations (`max(task_num_iters) x epochs`) while its BertAdam counts optimizer steps, one per
    task per iteration, so with VCR's Q->A and QA->R as separate steps (2) the warmup lasts `warmup_ratio x
    total_steps / 2` optimizer steps."""
    warmup = _warmup_length(total_steps / max(1, int(steps_per_iteration)), warmup_ratio, warmup_steps, bert_adam)
    milestones = sorted(int(e) for e in decay_epochs)

    def factor(step: int) -> float:
        epoch = step // max(1, steps_per_epoch)
        return _warmup_factor(step, warmup, bert_adam) * gamma ** sum(epoch >= m for m in milestones)

    return LambdaLR(optimizer, factor)


def warmup_decay(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float = 0.05,
    warmup_type: str = "log",
    min_lr_ratio: float = 0.0,
    first_step_lr_ratio: float | None = None,
) -> LambdaLR:
    """DeepSpeed's `WarmupDecayLR` (the CLIP-BERT study's `bert-lxmert-train-scratch` schedule), step for step: each
    group's lr rises from `min_lr_ratio` x its lr to its lr over `warmup_steps` (default `warmup_ratio x
    total_steps`; at least 2) by DeepSpeed's default `warmup_type="log"` (log(i + 1) / log(W)) or `"linear"` (i / W),
    then falls linearly to 0 at `total_steps`. As under DeepSpeed, optimizer step s runs at the schedule's value of
    iteration s - 1 (its scheduler steps after the optimizer).

    `first_step_lr_ratio`: the first optimizer step's lr / the group's lr. DeepSpeed 0.3.16's scheduler does not
    touch the lr until its first `step()`, which the engine calls after the first optimizer step, so that step runs
    at the lr of the DeepSpeed config's `optimizer.params` (the seed's scratch run: 5e-5 against `warmup_max_lr`
    1e-4, i.e. 0.5; `experiment=bert_lxmert_train_scratch` sets it); null: the schedule's own value there (the minimum,
    as DeepSpeed releases that initialise the lr in the scheduler's constructor)."""
    if warmup_type not in ("log", "linear"):
        raise ValueError(f"warmup_decay: warmup_type '{warmup_type}' is not 'log' or 'linear'")
    if first_step_lr_ratio is not None and not 0.0 <= float(first_step_lr_ratio):
        raise ValueError(f"warmup_decay: first_step_lr_ratio {first_step_lr_ratio} is negative")
    warmup = max(2, int(warmup_steps if warmup_steps is not None else warmup_ratio * total_steps))

    def gamma(iteration: int) -> float:
        if iteration < 0:
            return 0.0
        if iteration < warmup:
            return math.log(iteration + 1) / math.log(warmup) if warmup_type == "log" else iteration / warmup
        return max(0.0, (total_steps - iteration) / max(1.0, total_steps - warmup))

    def factor(step: int) -> float:
        if step == 0 and first_step_lr_ratio is not None:
            return float(first_step_lr_ratio)
        return min_lr_ratio + (1.0 - min_lr_ratio) * gamma(step - 1)

    return LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------------ per-group lambdas
def warmup_linear(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """CLIP-ViL's seed's AdamW schedule, transformers' `get_linear_schedule_with_warmup(num_warmup_steps=warmup_ratio
    x t_total)` with W = warmup_ratio x `total_steps` left a float: update s at s / max(1, W) (the first at lr 0, the
    scheduler steps after each update), then linear decay (T - s) / max(1, T - W) to 0 at T = `total_steps`."""
    warmup = warmup_ratio * total_steps

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1.0, warmup)
        return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup))

    return factor


def vl_warmup_linear(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """vl's earlier CLIP-ViL schedule (`adamw_rules: vl`): (s + 1) / W during warmup, W = max(1, int(ratio x T)),
    then (T - s) / max(1, T - W)."""
    warmup = max(1, int(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def step_schedule(steps_per_epoch: int, milestones: Sequence[int], gamma: float = 0.1) -> Callable[[int], float]:
    """x`gamma` from each (0-based) epoch in `milestones` on (CLIP-ViL's backbone SGD, `visual_optimizer.schedule`)."""
    marks = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        epoch = step // max(1, steps_per_epoch)
        return gamma ** sum(epoch >= m for m in marks)

    return factor
