"""Evaluation-only tasks for `evaluate.py task=<name>` (the config group `conf/task/`).

A task is a function `(*, cfg, run_cfg, output_dir, **options) -> metrics {name: float}`: `cfg` the composed
evaluate config, `run_cfg` the trained run's saved config. Its keyword options, with their types and defaults, are its
schema (`schema/task/<name>`, generated from the signature), so `task.shortlist_k=20` is validated while Hydra
composes. A new task: a function plus `conf/task/<name>.yaml` whose `_target_` names it (`_partial_: true`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig

from vl.config import schema_from_signature
from vl.eval.distance import distance_translation
from vl.eval.probes.memory_colors import PUBLISHED_SD_DDOF
from vl.eval.retrieval import zero_shot_retrieval

#: the arguments every task receives from `evaluate`; the rest are its options
RUN_ARGUMENTS = ("cfg", "run_cfg", "output_dir")


def _probe(task: str, *, cfg: DictConfig, run_cfg: DictConfig, output_dir: Path, **options: Any) -> dict[str, float]:
    """A masked-LM probe (vl/eval/probes) on the checkpoint's MLM head."""
    from vl.eval.probes import run_probes
    from vl.eval.probes.scorers import CheckpointScorer

    device = str(options.pop("device"))
    name = str(run_cfg.get("task_name") or "model")
    scorer = CheckpointScorer(cfg.ckpt_path, run_cfg, name=name, device=device)
    _, metrics = run_probes(
        task, {name: scorer}, out_dir=output_dir, seed=int(cfg.get("seed", 0)), device=device, **options
    )
    return metrics


def memory_colors(
    *,
    cfg: DictConfig,
    run_cfg: DictConfig,
    output_dir: Path,
    data: str | None = None,
    clip_model: str | None = None,
    random_baseline: bool = True,
    device: str = "cpu",
    sd_ddof: int = PUBLISHED_SD_DDOF["memory_colors"],
) -> dict[str, float]:
    """Memory Colors: `data` the probe's JSONL; `clip_model` a local CLIP dir (adds the CLIP-BERT-explicit variant);
    `random_baseline` adds the random scorer; `sd_ddof`: the sd over templates, 1 (the seed's printed table, pandas
    `.std()`) or 0 (its figure's error bars, `np.std`)."""
    return _probe(
        "memory_colors",
        cfg=cfg,
        run_cfg=run_cfg,
        output_dir=output_dir,
        data=data,
        clip_model=clip_model,
        random_baseline=bool(random_baseline),
        device=device,
        sd_ddof=int(sd_ddof),
    )


def visual_property_norms(
    *,
    cfg: DictConfig,
    run_cfg: DictConfig,
    output_dir: Path,
    queries: str | None = None,
    labels: str | None = None,
    clip_model: str | None = None,
    random_baseline: bool = True,
    device: str = "cpu",
    average: str = "query",
    sd_ddof: int = PUBLISHED_SD_DDOF["visual_property_norms"],
) -> dict[str, float]:
    """Visual Property Norms: `queries` a query dir or JSONL, `labels` labels.txt; `clip_model`, `random_baseline`
    as for Memory Colors; `average`: "query" (the seed's mean over all queries) or "concept"; `sd_ddof`: the sd over
    templates, 0 (the seed's figure, seaborn `ci="sd"` = `np.std`, its only published numbers) or 1 (sample sd)."""
    return _probe(
        "visual_property_norms",
        cfg=cfg,
        run_cfg=run_cfg,
        output_dir=output_dir,
        queries=queries,
        labels=labels,
        clip_model=clip_model,
        random_baseline=bool(random_baseline),
        device=device,
        average=str(average),
        sd_ddof=int(sd_ddof),
    )


def concreteness(
    *,
    cfg: DictConfig,
    run_cfg: DictConfig,
    output_dir: Path,
    words: str | None = None,
    categories: str | None = None,
    ratings: str | None = None,
    common: str | None = None,
    csv: str | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """VG-BERT's concreteness probe (`vl/eval/probes/concreteness.py`): `words` / `categories` / `ratings` / `common`
    the seed's SemCat `.npy` files, or `csv` (word, category, concreteness[, common]); none: the embedded corpus's
    words with synthetic ratings (a mechanics check only)."""
    from vl.build import instantiate_node
    from vl.checkpoint import check_architecture, read_checkpoint
    from vl.data.collate import load_tokenizer
    from vl.eval.probes.concreteness import run_concreteness

    state = read_checkpoint(cfg.ckpt_path, "ckpt_path")
    hparams = state.get("hyper_parameters") or {}
    system = instantiate_node(
        run_cfg.model, objectives=list(hparams["objectives"]), data_info=dict(hparams["data_info"]), init_from=None
    )
    check_architecture(state, system, cfg.ckpt_path)
    system.load_state_dict(state["state_dict"])
    return run_concreteness(
        system.encoder.to(device),
        load_tokenizer(str(run_cfg.data.get("tokenizer", "minilm"))),
        output_dir,
        name=str(run_cfg.get("task_name") or "model"),
        words=words,
        categories=categories,
        concreteness=ratings,
        common=common,
        csv_path=csv,
    )


#: `schema/task/<name>` is generated from each function's options
TASKS = {
    "zero_shot_retrieval": zero_shot_retrieval,
    "memory_colors": memory_colors,
    "visual_property_norms": visual_property_norms,
    "concreteness": concreteness,
    "distance_translation": distance_translation,
}


@dataclass
class TestTask:
    """`task=test` (the default): the run's own test (or `split=val`) metrics; no evaluation-only task."""

    _target_: str | None = None


def task_schemas() -> dict[tuple[str, str], type]:
    """{("schema/task", name): schema dataclass}, generated from each task function's options."""
    out: dict[tuple[str, str], type] = {("schema/task", "test"): TestTask}
    for name, fn in TASKS.items():
        out["schema/task", name] = schema_from_signature(
            fn, name, exclude=RUN_ARGUMENTS, extra={"_partial_": (bool, True)}
        )
    return out


def register_task_configs() -> None:
    cs = ConfigStore.instance()
    for (group, name), node in task_schemas().items():
        cs.store(group=group, name=name, node=node)


def task_name(task: DictConfig | None) -> str:
    """ "test", or the name of the task function `task._target_` names."""
    target = (task or {}).get("_target_")
    return str(target).rsplit(".", 1)[-1] if target else "test"


def run_eval_task(task: DictConfig, **run: Any) -> dict[str, float]:
    """Run the task node (`_target_` + options, `_partial_`) with `cfg`, `run_cfg`, `output_dir`."""
    return instantiate(task)(**run)


register_task_configs()
