"""What a researcher looks at after a run: a results table (`results.md`, also printed) and train/val curves (PNG)."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

log = logging.getLogger(__name__)


def results_markdown(rows: list[tuple[str, dict[str, float]]], title: str) -> str:
    lines = [f"# {title}", "", "| stage | metric | value |", "|---|---|---|"]
    for stage, metrics in rows:
        for key in sorted(metrics):
            lines.append(f"| {stage} | {key} | {metrics[key]:.4f} |")
    return "\n".join(lines) + "\n"


def shown(key: str) -> bool:
    """The printed table's rows: every metric but the training ones (their curves are in the plot; `results.md` keeps
    all), so a probe's or evaluation task's own keys (`memory_colors/...`) are shown as `test/` and `val/` ones."""
    return not key.startswith("train/")


def write_results(output_dir: Path, rows: list[tuple[str, dict[str, float]]], title: str) -> Path:
    """Write `results.md` and print the same table (the rows `shown`)."""
    path = Path(output_dir) / "results.md"
    path.write_text(results_markdown(rows, title))
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in ("stage", "metric", "value"):
            table.add_column(col)
        for stage, metrics in rows:
            for key in sorted(metrics):
                if shown(key):
                    table.add_row(stage, key, f"{metrics[key]:.4f}")
        Console().print(table)
    except ImportError:  # pragma: no cover
        print(path.read_text())
    log.info("results: %s", path)
    return path


def read_metrics_csv(path: Path) -> dict[str, list[tuple[float, float]]]:
    """CSVLogger `metrics.csv` -> {metric: [(step, value), ...]}."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = float(row.get("step") or 0)
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series[key].append((step, float(value)))
    return dict(series)


def plot_curves(output_dir: Path, title: str = "") -> Path | None:
    """Plot losses and accuracies from `<output_dir>/csv/metrics.csv` into `<output_dir>/curves.png`."""
    metrics_csv = Path(output_dir) / "csv" / "metrics.csv"
    if not metrics_csv.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics_csv(metrics_csv)
    losses = {k: v for k, v in series.items() if k.endswith("loss") and not k.startswith("test/")}
    scores = {k: v for k, v in series.items() if k.endswith("acc") and not k.startswith("test/")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, group, label in ((axes[0], losses, "loss"), (axes[1], scores, "accuracy")):
        for key, points in sorted(group.items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if key.startswith("val/") else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(output_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
