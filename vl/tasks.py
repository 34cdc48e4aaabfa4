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
    from vl.retrieval import zero_shot_retrieval

    return zero_shot_retrieval(cfg=cfg, run_cfg=run_cfg, output_dir=output_dir)


EVAL_TASKS: dict[str, EvalTask] = {
    "zero_shot_retrieval": _zero_shot_retrieval,
}


def run_eval_task(name: str, **kwargs: Any) -> dict[str, float]:
    if name not in EVAL_TASKS:
        raise ConfigError(f"task: unknown evaluation task '{name}'; choose from {['test', *sorted(EVAL_TASKS)]}")
    return EVAL_TASKS[name](**kwargs)
