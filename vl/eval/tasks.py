"""Evaluation-only tasks for `evaluate.py task=<name>`: each takes the composed evaluate config, the trained run's
config and an output dir, and returns metrics {name: float}. Register new ones in `EVAL_TASKS`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vl.errors import ConfigError

EvalTask = Callable[..., dict[str, float]]


def _zero_shot_retrieval(*, cfg: DictConfig, run_cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    from vl.eval.retrieval import zero_shot_retrieval

    return zero_shot_retrieval(cfg=cfg, run_cfg=run_cfg, output_dir=output_dir)


def _probe(task: str, *, cfg: DictConfig, run_cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """A masked-LM probe (vl/probes) on the checkpoint's MLM head. `task_cfg`: memory_colors: `data` (JSONL);
    visual_property_norms: `queries` (dir or JSONL), `labels` (labels.txt); both: optional `clip_model` (a local CLIP
    dir: adds the CLIP-BERT-explicit variant), `random_baseline` (default true), `device` (default cpu)."""
    from omegaconf import OmegaConf

    from vl.eval.probes import run_probes
    from vl.eval.probes.scorers import CheckpointScorer

    task_cfg = OmegaConf.to_container(cfg.get("task_cfg") or {}, resolve=True)
    assert isinstance(task_cfg, dict)
    unknown = set(task_cfg) - {"data", "queries", "labels", "clip_model", "random_baseline", "device"}
    if unknown:
        raise ConfigError(f"task_cfg: unknown key(s) {sorted(unknown)} for task '{task}'")
    device = str(task_cfg.get("device", "cpu"))
    name = str(run_cfg.get("task_name") or "model")
    scorer = CheckpointScorer(cfg.ckpt_path, run_cfg, name=name, device=device)
    _, metrics = run_probes(
        task,
        {name: scorer},
        out_dir=output_dir,
        data=task_cfg.get("data"),
        queries=task_cfg.get("queries"),
        labels=task_cfg.get("labels"),
        clip_model=task_cfg.get("clip_model"),
        random_baseline=bool(task_cfg.get("random_baseline", True)),
        seed=int(cfg.get("seed", 0)),
        device=device,
    )
    return metrics


def _memory_colors(*, cfg: DictConfig, run_cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    return _probe("memory_colors", cfg=cfg, run_cfg=run_cfg, output_dir=output_dir)


def _visual_property_norms(*, cfg: DictConfig, run_cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    return _probe("visual_property_norms", cfg=cfg, run_cfg=run_cfg, output_dir=output_dir)


EVAL_TASKS: dict[str, EvalTask] = {
    "zero_shot_retrieval": _zero_shot_retrieval,
    "memory_colors": _memory_colors,
    "visual_property_norms": _visual_property_norms,
}


def run_eval_task(name: str, **kwargs: Any) -> dict[str, float]:
    if name not in EVAL_TASKS:
        raise ConfigError(f"task: unknown evaluation task '{name}'; choose from {['test', *sorted(EVAL_TASKS)]}")
    return EVAL_TASKS[name](**kwargs)
