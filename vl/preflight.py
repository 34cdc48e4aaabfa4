"""What a run checks before it spends compute: a bad setting fails in one line naming it, before the pretrain stage or
any data is built (`vl.pipeline.train` / `evaluate` call these first).

- `check_stage_arguments`: every `model` / `data` key of each stage is an argument of its `_target_`;
- `check_devices`: a GPU accelerator on a machine without a visible GPU;
- `check_hand_off`: `pretrain.hand_off=last` / `test_checkpoint=last` with no callback that writes last.ckpt;
- `preflight_main_stage`: with a pretrain stage, the main stage's data module (its checks, its files) and its global
  batch against the planned world size (`accumulation`, which every stage's Trainer also uses);
- `check_fresh_output`: a fresh run's dir already holding an earlier run's checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vl.build import build_datamodule, check_arguments
from vl.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "accumulation",
    "check_devices",
    "check_fresh_output",
    "check_hand_off",
    "check_stage_arguments",
    "planned_world_size",
    "preflight_main_stage",
]


def check_fresh_output(output_dir: Path) -> None:
    """A fresh (not resumed) stage's dir must not hold an earlier run's checkpoints: they would be overwritten."""
    ckpts = output_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        raise ConfigError(
            f"paths.output_dir: {output_dir} already holds checkpoints of an earlier run; refusing to overwrite them"
        )


def accumulation(cfg: DictConfig, dm: Any, world_size: int) -> int:
    """Gradient accumulation = `data.batch_size` / (`batch_size_per_device` x world size); not a whole number: one
    line naming the three. The global batch is the recipe's: when the devices' share would exceed it (a one-device
    config, e.g. per device 32 of 32, run with `hardware=ddp_cpu`), each device takes `batch_size / world size`
    (said in one line); a global batch the devices cannot share equally fails as above."""
    per_step = dm.batch_size_per_device * world_size
    if world_size > 1 and per_step > dm.batch_size and dm.batch_size % world_size == 0:
        log.info(
            "data.batch_size_per_device=%d x %d devices exceeds data.batch_size=%d: %d per device",
            dm.batch_size_per_device,
            world_size,
            dm.batch_size,
            dm.batch_size // world_size,
        )
        dm.batch_size_per_device = dm.batch_size // world_size
        per_step = dm.batch_size
    if dm.batch_size % per_step:
        raise ConfigError(
            f"data.batch_size={dm.batch_size} is not divisible by batch_size_per_device x world size = "
            f"{dm.batch_size_per_device} x {world_size}"
        )
    return dm.batch_size // per_step


def planned_world_size(trainer: DictConfig) -> int | None:
    """The number of processes `trainer.devices` x `trainer.num_nodes` will start, where the config says it without
    a Trainer (an integer device count, or -1 on CUDA: every visible GPU); else None."""
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    if not isinstance(nodes, int) or isinstance(devices, bool) or not isinstance(devices, int):
        return None
    if devices == -1 and str(trainer.get("accelerator")) in ("gpu", "cuda"):
        devices = torch.cuda.device_count()
    return devices * nodes if devices > 0 else None


def check_devices(cfg: DictConfig) -> None:
    """`trainer.accelerator=gpu` (hardware=gpu / ddp / multi_node) on a machine without a visible GPU: one line
    naming the key and the CPU alternatives, before anything is built (Lightning's "No supported gpu backend found!"
    came wrapped in Hydra's instantiation error)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        raise ConfigError(
            f"trainer.accelerator={accelerator}: no GPU is visible here (torch.cuda.is_available() is False); "
            "use hardware=cpu, or hardware=ddp_cpu for several CPU processes"
        )


def preflight_main_stage(cfg: DictConfig) -> None:
    """Before a pretrain stage spends its compute: the main stage's data module is built (its constructor's checks,
    e.g. the batch sizes, and its files) and its global batch is checked against the planned world size, so a bad
    main-stage setting fails in one line now, not after pretraining."""
    dm = build_datamodule(cfg)
    world = planned_world_size(cfg.trainer)
    if world is not None:
        accumulation(cfg, dm, world)


def check_hand_off(cfg: DictConfig) -> None:
    """`pretrain.hand_off=last` / `test_checkpoint=last` (with `test`) need a callback that writes last.ckpt
    (`callbacks.last_checkpoint`, in the default callbacks): a one-line ConfigError before any stage runs."""
    pre = cfg.get("pretrain")
    choices = {"test_checkpoint": cfg.get("test_checkpoint", "best") if cfg.get("test", True) else "best"}
    if pre:
        choices["pretrain.hand_off"] = pre.get("hand_off", "best")
    nodes = (cfg.get("callbacks") or {}).values()
    writes_last = any(isinstance(n, DictConfig) and (n.get("filename") == "last" or n.get("save_last")) for n in nodes)
    for key, value in choices.items():
        if value == "last" and not writes_last:
            raise ConfigError(
                f"{key}=last: no callback writes last.ckpt (callbacks.last_checkpoint); add it or set {key}=best"
            )


def check_stage_arguments(cfg: DictConfig) -> None:
    """Every `model` / `model.encoder` / `data` key of each stage is an argument of its `_target_` (a typo in a plugin
    architecture's config fails here, before the pretrain stage or any data is built)."""
    check_arguments(cfg.get("model"), "model")
    check_arguments(cfg.get("data"), "data")
    pre = cfg.get("pretrain")
    if pre:
        check_arguments(pre.get("data"), "pretrain.data")
        if pre.get("model"):
            check_arguments(OmegaConf.merge(cfg.model, pre.model), "pretrain.model")
