"""Which config won the sweep: `multirun.md`, `multirun.csv` and `multirun.png` in the sweep dir.

Every run writes `metrics.json` into its run dir (`vl.pipeline.train`: final val/test metrics, the monitored metric,
its mode and its best value). At the end of a multirun the Hydra callback `SweepReport` (`conf/hydra/default.yaml`)
reads each job's `metrics.json` and `.hydra/overrides.yaml` and writes the report; `python -m vl.tools.report
<sweep dir>` rebuilds it later. One row per configuration, best first by the monitored metric's best value (its
mode: `min` for a loss); jobs that differ only in `seed=` form one row with mean ± sd (sample sd) over the seeds.
Columns: the overrides that vary across jobs, the number of seeds, then the val/test metrics.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "SweepReport", "collect", "group_rows", "write_report"]

#: what every run writes into its run dir (read by the sweep report)
METRICS_FILE = "metrics.json"
SEED_KEYS = ("seed",)


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(o) for o in (OmegaConf.load(path) or [])]


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One record per job dir under `sweep_dir` that has a `metrics.json`: {job, overrides {key: value}, metrics,
    monitor, mode}. Jobs without it (failed, still running) are logged and left out."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        found = job_dir / METRICS_FILE
        if not found.is_file():
            if (job_dir / ".hydra").is_dir():
                log.warning(
                    "sweep report: job %s has no %s (failed or unfinished); left out", job_dir.name, METRICS_FILE
                )
            continue
        data = json.loads(found.read_text())
        overrides = {}
        for item in _overrides(job_dir):
            key, _, value = item.partition("=")
            overrides[key.lstrip("+~")] = value
        jobs.append({"job": job_dir.name, "overrides": overrides, **data})
    return jobs


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None


def group_rows(jobs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]], str | None, str]:
    """(swept keys, rows best first, ranking metric, mode). A row: {config {key: value}, jobs, seeds, metrics
    {name: (mean, sd or None)}}; jobs equal but for the seed are one row."""
    if not jobs:
        return [], [], None, "max"
    keys = sorted({k for j in jobs for k in j["overrides"]})
    swept = [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]
    config_keys = [k for k in swept if k not in SEED_KEYS]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for job in jobs:
        groups.setdefault(tuple(job["overrides"].get(k) for k in config_keys), []).append(job)
    names = sorted({m for j in jobs for m in j["metrics"] if m.split(":")[-1].startswith(("val/", "test/"))})
    rows = []
    for config, members in groups.items():
        rows.append(
            {
                "config": dict(zip(config_keys, config)),
                "jobs": [m["job"] for m in members],
                "seeds": len(members),
                "metrics": {n: _mean_sd([m["metrics"].get(n, math.nan) for m in members]) for n in names},
            }
        )
    monitor, mode = jobs[0].get("monitor"), jobs[0].get("mode") or "max"
    rank_by = f"{monitor}_best" if monitor and f"{monitor}_best" in names else monitor
    if rank_by in names:
        sign = -1.0 if mode == "max" else 1.0
        rows.sort(key=lambda r: (math.isnan(r["metrics"][rank_by][0]), sign * r["metrics"][rank_by][0]))
    return config_keys, rows, rank_by, mode


def _fmt(value: tuple[float, float | None]) -> str:
    mean, sd = value
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f} ± {sd:.4f}" if sd is not None else f"{mean:.4f}"


def write_report(sweep_dir: str | Path) -> list[Path]:
    """Write multirun.md / .csv / .png into `sweep_dir`; returns the paths written (none without finished jobs)."""
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    keys, rows, rank_by, mode = group_rows(jobs)
    if not rows:
        log.warning("sweep report: no finished job under %s", sweep_dir)
        return []
    names = list(rows[0]["metrics"])
    md = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"{len(jobs)} jobs, {len(rows)} configurations; best first by `{rank_by}` ({mode}); "
        "mean ± sd over seeds where a configuration ran with several.",
        "",
        "| " + " | ".join([*keys, "seeds", *names]) + " |",
        "|" + "---|" * (len(keys) + 1 + len(names)),
    ]
    for row in rows:
        cells = [str(row["config"][k]) for k in keys] + [str(row["seeds"])] + [_fmt(row["metrics"][n]) for n in names]
        md.append("| " + " | ".join(cells) + " |")
    md_path = sweep_dir / "multirun.md"
    md_path.write_text("\n".join(md) + "\n")
    csv_path = sweep_dir / "multirun.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "seeds", "jobs", *(c for n in names for c in (n, f"{n}_sd"))])
        for row in rows:
            values = [c for n in names for c in (row["metrics"][n][0], row["metrics"][n][1])]
            writer.writerow([*(row["config"][k] for k in keys), row["seeds"], " ".join(row["jobs"]), *values])
    paths = [md_path, csv_path]
    png = _plot(sweep_dir / "multirun.png", jobs, keys, rank_by, names)
    if png is not None:
        paths.append(png)
    log.info("sweep report: %s", ", ".join(str(p) for p in paths))
    return paths


def _plot(
    path: Path, jobs: list[dict[str, Any]], keys: list[str], rank_by: str | None, names: list[str]
) -> Path | None:
    """Each headline metric (the ranking metric and its test counterpart) against each swept value, one dot per job."""
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        m
        for m in dict.fromkeys([rank_by, (rank_by or "").replace("val/", "test/").removesuffix("_best")])
        if m in names
    ]
    metrics = metrics or names[:2]
    fig, axes = plt.subplots(len(metrics), len(keys), figsize=(4 * len(keys), 3 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        for j, key in enumerate(keys):
            ax = axes[i][j]
            raw = [job["overrides"].get(key) for job in jobs]
            ys = [job["metrics"].get(metric, math.nan) for job in jobs]
            try:
                xs: list[Any] = [float(x) for x in raw]
                if min(xs) > 0 and max(xs) / min(xs) >= 100:
                    ax.set_xscale("log")
            except (TypeError, ValueError):
                labels = sorted({str(x) for x in raw})
                xs = [labels.index(str(x)) for x in raw]
                ax.set_xticks(range(len(labels)), labels, rotation=30)
            ax.plot(xs, ys, "o", alpha=0.7)
            ax.set_xlabel(key)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class SweepReport(Callback):
    """Hydra callback: write the sweep report when a multirun ends (a failure to write it is logged, never raised:
    the jobs' own results are already on disk)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            write_report(Path(config.hydra.sweep.dir))
        except Exception as err:  # noqa: BLE001 - the report must not turn a finished sweep into a failure
            log.warning("sweep report not written: %s: %s", type(err).__name__, err)
