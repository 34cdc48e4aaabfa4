"""The run's loggers: W&B's run name, tags, job type and continuation of a resumed run (`stage_loggers`), the config
logged flat (`flat_config`), the test stage's metrics sent to the fit's loggers (`log_test_metrics`), `csv/metrics.csv`
rows kept across a resume in place (`read_csv` / `write_csv`) and W&B closed with the run's exit code
(`finish_wandb`)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, open_dict

from vl.data.formats.jsonl import write_atomically

log = logging.getLogger(__name__)

__all__ = [
    "CSVLogger",
    "command_overrides",
    "earlier_wandb_run",
    "finish_wandb",
    "flat_config",
    "log_test_metrics",
    "read_csv",
    "resumes_in_place",
    "run_name",
    "run_tags",
    "stage_loggers",
    "wandb_run_id",
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
                if lg.get("id") is None and lg.get("version") is None and save_dir and resumes_in_place(cfg):
                    earlier = earlier_wandb_run(Path(save_dir))
                    if earlier is not None:
                        lg.id = earlier
                        log.info("resumed in place: continuing W&B run %s", earlier)
    return node


def resumes_in_place(cfg: DictConfig) -> bool:
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
    return wandb_run_id(runs[-1]) if runs else None


def wandb_run_id(run_dir: Path) -> str:
    """The id of the W&B run whose files are in `run_dir`: from its record file `run-<id>.wandb` (the dir's name can
    carry a suffix, `...-<id>-1`, when two runs of one id start within a second), else the dir name's last part."""
    records = sorted(run_dir.glob("run-*.wandb"))
    if records:
        return records[0].name[len("run-") : -len(".wandb")]
    return run_dir.name.rsplit("-", 1)[-1]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    """`rows` under `header` to `path`, through a temp file beside it and `os.replace`: a kill leaves the old file or
    the new one."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


def _step(row: dict[str, Any]) -> float | None:
    try:
        return float(row.get("step"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, which for a fit resumed in its own run dir keeps the earlier `metrics.csv` instead of
    deleting it when it starts: at its first save the earlier rows are cut where the resumed fit's first row's step
    begins (the rows the killed fit logged after its last checkpoint, which the resumed fit logs again) and the new
    rows follow, in one atomic rewrite; later saves append as Lightning's do. Until then the earlier file is as it was,
    so a resumed fit killed again loses none of it."""

    def __init__(self, log_dir: str, *, resumed: bool) -> None:
        self._resumed = resumed
        self._cut_pending = False
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._resumed:
            super()._check_log_dir_exists()
            return
        header, _ = read_csv(Path(self.metrics_file_path))
        self.metrics_keys = list(header)
        self._cut_pending = bool(header)

    def save(self) -> None:
        if not (self._cut_pending and self.metrics):
            super().save()
            return
        path = Path(self.metrics_file_path)
        header, rows = read_csv(path)
        start = _step(self.metrics[0])
        steps = [_step(r) for r in rows]
        cut = next((i for i, x in enumerate(steps) if None not in (start, x) and x >= start), len(rows))
        self.metrics_keys = sorted(set(header).union(*self.metrics))
        write_csv(path, self.metrics_keys, [*rows[:cut], *self.metrics])
        self.metrics, self._cut_pending = [], False


class CSVLogger(L.pytorch.loggers.CSVLogger):
    """Lightning's CSVLogger (`csv/metrics.csv`), which keeps the earlier rows when its fit resumes in its own run dir
    (`resumed`, set by `vl.pipeline` for `resume=`, a requeued job or `ckpt_path=` under the run dir; see
    `_ContinuingWriter`). Lightning's writer deleted the file when the resumed fit started, and vl wrote the earlier
    rows back only when the stage ended, so a resumed fit killed again lost them; and the rows the killed fit logged
    after its last checkpoint stood twice."""

    resumed = False

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ContinuingWriter(log_dir=self.log_dir, resumed=self.resumed)
        return self._experiment


def log_test_metrics(loggers: list[Any], metrics: dict[str, float], step: int) -> None:
    """Send the test stage's metrics to the fit's loggers. A CSVLogger gets the row appended to its file here: its
    writer may live in other processes (spawned DDP: creating one in this process would delete the file), or be one
    that this process made for the hyper-parameters only and that knows none of the columns the fit wrote (its own
    save would then rewrite the file with too few columns)."""
    for lg in loggers:
        if isinstance(lg, L.pytorch.loggers.CSVLogger):
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
