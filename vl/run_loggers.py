"""The run's loggers: W&B's run name, tags, job type and continuation of a resumed run (`stage_loggers`), the config
logged flat (`flat_config`), the test stage's metrics sent to the fit's loggers (`log_test_metrics`), `csv/metrics.csv`
rows kept across a resume in place (`read_csv` / `write_csv`) and W&B closed with the run's exit code
(`finish_wandb`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

__all__ = [
    "command_overrides",
    "earlier_wandb_run",
    "finish_wandb",
    "flat_config",
    "log_test_metrics",
    "read_csv",
    "run_name",
    "run_tags",
    "stage_loggers",
    "write_csv",
]


def command_overrides() -> list[str]:
    """The command line's overrides (Hydra's `overrides.task`; a multirun job's own ones); [] outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # outside Hydra
        return []


def flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"optimizer": {"lr": 1e-3}}} -> {"model.optimizer.lr": 1e-3} (lists as strings)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat_config(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(tree) if isinstance(tree, (list, tuple)) else tree}


def run_name(cfg: DictConfig) -> str:
    """`<task_name>` + the command line's overrides (a multirun job's own ones), e.g. `vqa lr=1e-4 seed=2`."""
    overrides = [o for o in command_overrides() if not o.split("=", 1)[0].endswith("_dir")]
    return " ".join([str(cfg.task_name), *overrides])


#: W&B's limit on a tag's length
_TAG_CHARS = 64


def run_tags(cfg: DictConfig, tags: list[str]) -> list[str]:
    """The configured tags + one per command-line override (`model=vilbert`, `model.optimizer.lr=1e-4`; paths and
    dirs left out), so the dashboard can filter and group a sweep by what was swept. De-duplicated, each cut to
    W&B's 64 characters."""
    overrides = [o.lstrip("+~") for o in command_overrides() if not o.split("=", 1)[0].endswith(("_dir", "_path"))]
    out: list[str] = []
    for tag in [*map(str, tags), *overrides]:
        tag = tag[:_TAG_CHARS]
        if tag and tag not in out:
            out.append(tag)
    return out


def stage_loggers(cfg: DictConfig, stage: str) -> DictConfig | None:
    """`cfg.logger` with W&B's run name (from the overrides, unless set) and `job_type` = the stage (`pretrain`,
    `finetune` after a pretrain stage, else the configured one). A stage that resumes in its own run dir (`resume=`,
    a requeued job, `ckpt_path=` of a checkpoint under `paths.output_dir`) continues the W&B run the earlier process
    of that dir started (its id, unless `id` is set; Lightning's WandbLogger resumes with "allow"), so the dashboard
    shows one run with one set of curves, not one run per restart."""
    node = cfg.get("logger")
    if not node:
        return node
    node = node.copy()
    with open_dict(node):
        for lg in node.values():
            if isinstance(lg, DictConfig) and str(lg.get("_target_", "")).endswith("WandbLogger"):
                if lg.get("name") is None:
                    lg.name = run_name(cfg)
                lg.tags = run_tags(cfg, list(lg.get("tags") or []))
                if stage in ("pretrain", "finetune"):
                    lg.job_type = stage
                save_dir = lg.get("save_dir") or lg.get("dir")
                if lg.get("id") is None and lg.get("version") is None and save_dir and _resumes_in_place(cfg):
                    earlier = earlier_wandb_run(Path(save_dir))
                    if earlier is not None:
                        lg.id = earlier
                        log.info("resumed in place: continuing W&B run %s", earlier)
    return node


def _resumes_in_place(cfg: DictConfig) -> bool:
    """Whether this stage continues from a checkpoint inside its own run dir."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return False
    return Path(str(ckpt)).expanduser().resolve().is_relative_to(Path(cfg.paths.output_dir).expanduser().resolve())


def earlier_wandb_run(save_dir: Path) -> str | None:
    """The id of the W&B run last started with `save_dir` (`<save_dir>/wandb/latest-run` -> `run-<time>-<id>`, or
    `offline-run-<time>-<id>`; else the newest such dir), None when there is none."""
    root = save_dir / "wandb"
    latest = root / "latest-run"
    if latest.exists():
        runs = [latest.resolve()]
    else:  # by the start time in the name (`offline-` sorts apart otherwise)
        runs = sorted(root.glob("*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    runs = [p for p in runs if p.is_dir()]
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)


def log_test_metrics(loggers: list[Any], metrics: dict[str, float], step: int) -> None:
    """Send the test stage's metrics to the fit's loggers. A CSVLogger gets the row appended to its file here: its
    writer may live in other processes (spawned DDP: creating one in this process would delete the file), or be one
    that this process made for the hyper-parameters only and that knows none of the columns the fit wrote (its own
    save would then rewrite the file with too few columns)."""
    for lg in loggers:
        if isinstance(lg, CSVLogger):
            if getattr(lg, "_experiment", None) is not None:
                lg.save()  # rows this process still buffers reach the file first
            path = Path(lg.log_dir) / "metrics.csv"
            header, rows = read_csv(path)
            row = {"step": step, **metrics}
            write_csv(path, [*header, *(k for k in row if k not in header)], [*rows, row])
            continue
        lg.log_metrics(metrics, step=step)
        lg.save()


def finish_wandb(exit_code: int = 0) -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except ImportError:  # pragma: no cover
        pass
