"""How every `vl` system builds its optimiser and scheduler (`Optimisation`, a LightningModule base
`vl.models.system.VLSystem` builds on): parameter groups by weight decay, pretrained origin and head, `model.optimizer`
over them (`vl.optimizers.build_optimizer`), `model.scheduler` stepped per optimizer step.

The system sets `encoder`, `optimizer_cfg`, `scheduler_cfg`, `pretrained_lr_mult` and `head_lr`; a subclass may follow
its seed's decay rule by overriding `decays`.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
from hydra.utils import instantiate
from torch import nn

from vl.optimizers import build_optimizer

__all__ = ["NO_DECAY", "Optimisation"]

#: parameter-name endings exempt from weight decay (with every 1-d parameter): the AdamW convention
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


class Optimisation(L.LightningModule):
    """`param_groups` and `configure_optimizers` (see the module docstring)."""

    def pretrained_parameter_names(self) -> set[str]:
        """Names of parameters that came from pretrained weights (they get lr x `pretrained_lr_mult`)."""
        names = getattr(self.encoder, "pretrained_parameter_names", None)
        return {f"encoder.{name}" for name in names()} if names else set()

    def decays(self, name: str, param: nn.Parameter) -> bool:
        """Whether parameter `name` gets `model.optimizer.weight_decay`: the AdamW convention, every parameter but
        biases, norms and other 1-d ones (a subclass may follow its seed instead)."""
        return not any(name.endswith(nd) for nd in NO_DECAY) and param.ndim > 1

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: weight decay where `decays` says so; pretrained params at lr x
        pretrained_lr_mult; task heads (`objectives.*`) at `head_lr` when set."""
        pretrained = self.pretrained_parameter_names()
        base_lr = float(self.optimizer_cfg["lr"])
        weight_decay = float(self.optimizer_cfg.get("weight_decay", 0.0))
        groups: dict[tuple[bool, str], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decay = self.decays(name, param)
            kind = "pretrained" if name in pretrained else "head" if name.startswith("objectives.") else "other"
            groups.setdefault((decay, kind), []).append(param)
        lrs = {
            "pretrained": base_lr * self.pretrained_lr_mult,
            "head": float(self.head_lr) if self.head_lr is not None else base_lr,
            "other": base_lr,
        }
        param_groups = [
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lrs[kind],
                "name": f"{kind}{'' if decay else '_no_decay'}",
            }
            for (decay, kind), params in groups.items()
        ]
        return param_groups

    def configure_optimizers(self) -> Any:
        """`model.optimizer` over `param_groups()`. The scheduler gets `total_steps` from
        `trainer.estimated_stepping_batches` (and `steps_per_epoch` when it takes one, and `steps_per_iteration`: the
        datamodule's optimizer steps per iteration of a seed's multi-task loop, e.g. 2 for VCR's separate Q->A and
        QA->R steps; 1 without one)."""
        optimizer = build_optimizer(self.optimizer_cfg, self.param_groups())
        if not self.scheduler_cfg:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        factory = instantiate(self.scheduler_cfg)
        kwargs: dict[str, Any] = {"total_steps": total}
        parameters = inspect.signature(factory).parameters
        if "steps_per_epoch" in parameters:
            kwargs["steps_per_epoch"] = max(1, total // max(1, int(self.trainer.max_epochs or 1)))
        if "steps_per_iteration" in parameters:
            kwargs["steps_per_iteration"] = int(getattr(self.trainer.datamodule, "steps_per_iteration", 1) or 1)
        scheduler = factory(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
