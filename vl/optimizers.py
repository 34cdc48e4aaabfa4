"""Optimisers of the reimplemented recipes that torch does not ship, used as `_partial_: true` configs
(`model.optimizer._target_`); the system passes its parameter groups (each with its own `lr` and `weight_decay`).

`BertAdam` is the optimiser of ViLBERT's `train_concap.py` (pytorch-pretrained-bert 0.6.2's `BertAdam`) and
`train_tasks.py` (`vilbert/optimization.py`, the same update). Its warmup / decay schedule is not part of it here: vl's
LR scheduler (`vl.schedules`) sets each group's `lr`, which `step` reads, as the seed's `lr x schedule(step)`.

`TransformersAdamW` is the AdamW of CLIP-ViL's scripts (transformers 3.3.1's `AdamW`, removed from transformers since)
and of MM-BERT's VL-BERT trainers (`common/nlp/bert/optimization.py`'s `AdamW`, the same update).

`FusedOptimizer` steps several optimisers as one (CLIP-ViL's AdamW + SGD pair, the seed's `FusedOptimizer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from torch.optim import Optimizer

from vl.errors import ConfigError

__all__ = ["BertAdam", "FusedOptimizer", "TransformersAdamW", "build_optimizer"]


class _SeedAdam(Optimizer):
    """The Adam variants of the seeds, stepped per bucket of parameters with one (device, dtype, step t) (`_update`):
    torch's fused AdamW kernel where it exists (`FUSED_DEVICES`, floating parameters), with per-step lr, weight decay
    and eps that turn its update into the variant's (up to float rounding); elsewhere the variant's own update in
    `torch._foreach_*` ops. Sparse gradients are refused; `step` in the state is an int."""

    NAME = "Adam"

    def __init__(
        self, params: Iterable[Any], *, lr: float, betas: Sequence[float], eps: float, **defaults: Any
    ) -> None:
        b1, b2 = (float(b) for b in betas)
        if lr < 0.0:
            raise ValueError(f"{self.NAME}: invalid learning rate {lr} (must be >= 0)")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"{self.NAME}: invalid betas {tuple(betas)} (each in [0, 1))")
        if eps < 0.0:
            raise ValueError(f"{self.NAME}: invalid eps {eps} (must be >= 0)")
        if defaults.get("weight_decay", 0.0) < 0.0:
            raise ValueError(f"{self.NAME}: invalid weight_decay {defaults['weight_decay']} (must be >= 0)")
        super().__init__(params, {"lr": lr, "betas": (b1, b2), "eps": eps, **defaults})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype, int], list[list[torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self.NAME} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = t = int(state["step"]) + 1
                lists = buckets.setdefault((p.device, p.dtype, t), [[], [], [], []])
                for i, tensor in enumerate((p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                    lists[i].append(tensor)
            for (_, _, t), (params, grads, exp_avgs, exp_avg_sqs) in buckets.items():
                self._update(params, grads, exp_avgs, exp_avg_sqs, t, group)
        return loss

    def _update(self, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, t: int, group: dict) -> None:
        raise NotImplementedError


def _fused_adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    t: int,
    *,
    betas: tuple[float, float],
    lr: float,
    decay: float,
    eps: float,
) -> bool:
    """torch's fused AdamW update of tensors at step `t`, with `lr`, `eps` and the decay factor lr * wd = `decay`
    (`weight_decay` = decay / lr): p <- p (1 - decay) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    False (nothing done) where the kernel does not exist or the arguments cannot say it (lr 0 with decay)."""
    device = params[0].device
    if device.type not in FUSED_DEVICES or not params[0].is_floating_point() or (lr == 0.0 and decay != 0.0):
        return False
    steps = [torch.full((), float(t), dtype=torch.float32, device=device)] * len(params)
    torch._fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        weight_decay=decay / lr if lr != 0.0 else 0.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
    return True


def _moments(grads: list, exp_avgs: list, exp_avg_sqs: list, betas: tuple[float, float]) -> list[torch.Tensor]:
    """m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2 (in place); returns sqrt(v) (new tensors)."""
    beta1, beta2 = betas
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    return torch._foreach_sqrt(exp_avg_sqs)


class BertAdam(_SeedAdam):
    """Adam as BERT / ViLBERT trained with it. Per parameter p with gradient g, at every step:

        g <- g * min(1, max_grad_norm / (||g||_2 + 1e-6))      (clipped per parameter, in place on p.grad)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (sqrt(v) + eps) + weight_decay * p)

    Unlike `torch.optim.AdamW`: no bias correction of m and v; eps 1e-6 (AdamW: 1e-8); the gradient norm is clipped
    to `max_grad_norm` for each parameter tensor on its own (`clip_grad_norm_(p, ...)` upstream), not over the model;
    the decoupled weight decay is added to the update before the lr multiplies it (as AdamW's `p *= 1 - lr wd`).
    `max_grad_norm` <= 0: no clipping. Sparse gradients are refused.

    Run by torch's fused AdamW kernel (`_SeedAdam`) with lr' = lr (1 - b1^t) / sqrt(1 - b2^t) (undoing its bias
    correction), eps' = eps / sqrt(1 - b2^t), decay lr wd; the per-parameter norms in one `torch._foreach_norm`.
    """

    NAME = "BertAdam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)

    def _update(self, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, t: int, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay, max_norm = group["lr"], group["eps"], group["weight_decay"], group["max_grad_norm"]
        if max_norm > 0:  # torch's clip_grad_norm_ on each tensor on its own, without a host sync
            norms = torch.stack(torch._foreach_norm(grads, 2.0))
            coefs = (max_norm / (norms + 1e-6)).clamp(max=1.0).to(grads[0].dtype)
            torch._foreach_mul_(grads, list(coefs.unbind()))
        bias1, root2 = 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)
        fused = dict(betas=group["betas"], lr=lr * bias1 / root2, decay=lr * weight_decay, eps=eps / root2)
        if _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, t, **fused):
            return
        denom = _moments(grads, exp_avgs, exp_avg_sqs, group["betas"])
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(exp_avgs, denom)
        if weight_decay > 0.0:
            torch._foreach_add_(update, params, alpha=weight_decay)
        torch._foreach_add_(params, update, alpha=-lr)


class TransformersAdamW(_SeedAdam):
    """AdamW as transformers (<= 4) and VL-BERT implement it. Per parameter p with gradient g, at its step t:

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)      (correct_bias; else lr * m / (...))
        p <- p - lr * weight_decay * p                                          (after the update)

    Unlike `torch.optim.AdamW` (p <- p (1 - lr wd) first, then lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)):
    eps is added to the uncorrected sqrt(v), i.e. torch's eps times 1 / sqrt(1 - b2^t) (x31.6 at the first step, x1
    after ~5 / (1 - b2) steps), and the decay multiplies the updated weights (p (1 - lr wd) - (1 - lr wd) u instead of
    p (1 - lr wd) - u).

    Run by torch's fused AdamW kernel (`_SeedAdam`) with lr' = lr (1 - lr wd) k, decay lr wd, eps' = eps /
    sqrt(1 - b2^t), k = 1 (correct_bias) or (1 - b1^t) / sqrt(1 - b2^t)."""

    NAME = "TransformersAdamW"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)

    def _update(self, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, t: int, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        bias1, root2 = 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)
        kept = 1.0 - lr * weight_decay  # the seed's decay after the update scales the update too
        lr_fused = lr * kept * (1.0 if group["correct_bias"] else bias1 / root2)
        fused = dict(betas=group["betas"], lr=lr_fused, decay=lr * weight_decay, eps=eps / root2)
        if _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, t, **fused):
            return
        denom = _moments(grads, exp_avgs, exp_avg_sqs, group["betas"])
        torch._foreach_add_(denom, eps)
        size = lr * root2 / bias1 if group["correct_bias"] else lr
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-size)
        if weight_decay > 0.0:
            torch._foreach_add_(params, params, alpha=-lr * weight_decay)


#: devices whose parameters torch's fused Adam/AdamW kernels take
FUSED_DEVICES = ("cpu", "cuda")
#: optimisers whose fused kernel runs on every device in `FUSED_DEVICES` (others keep torch's default unless asked)
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def build_optimizer(cfg: dict[str, Any], param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Instantiate a `_partial_` optimizer config on `param_groups`. `fused` unset or null: pass `fused=True` to
    torch's Adam / AdamW when every parameter is a floating tensor on a device with the fused kernel (measured: the
    default run in 0.82x the time); false: torch's default (for-loop on CPU); true: passed as is."""
    cfg = dict(cfg)
    fused = cfg.pop("fused", None)
    factory = instantiate(cfg)
    if fused is None:
        target = getattr(factory, "func", factory)
        params = [p for group in param_groups for p in group["params"]]
        fused = (
            isinstance(target, type)
            and issubclass(target, FUSED_OPTIMIZERS)
            and bool(params)
            and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
        ) or None
    return factory(param_groups, **({"fused": fused} if fused is not None else {}))


class FusedOptimizer(Optimizer):
    """Several optimisers stepped as one (the seed's `FusedOptimizer`): `param_groups` is the concatenation of theirs
    (the same dicts: schedulers and gradient clipping see every group), `step` runs the closure once then steps each,
    `state_dict` = {name: each one's state_dict}."""

    def __init__(self, optimizers: dict[str, Optimizer]) -> None:  # noqa: D107 - Optimizer.__init__ is not called
        self.optimizers = dict(optimizers)
        self.defaults: dict[str, Any] = {}
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}

    @property
    def state(self) -> dict:  # type: ignore[override]
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        missing = sorted(set(self.optimizers) - set(state_dict))
        if missing:
            raise ConfigError(
                f"optimizer state: the checkpoint has no state for {missing} (not a CLIP-ViL checkpoint?)"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        return f"FusedOptimizer({', '.join(f'{k}: {type(v).__name__}' for k, v in self.optimizers.items())})"
