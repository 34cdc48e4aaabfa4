"""Probe reports: a CSV and a markdown table over all models, and a bar plot with error bars = sd over templates.

`results` maps a model name to the dict its probe returned (`run_memory_colors` / `run_visual_property_norms`).
Files (in `out_dir`): `<task>_results.csv`, `<task>_results.md`, `<task>_results.png`.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TASKS = ("memory_colors", "visual_property_norms")


def probe_rows(task: str, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model (memory_colors) or per (model, pf) (visual_property_norms)."""
    rows: list[dict[str, Any]] = []
    for model, res in results.items():
        if task == "memory_colors":
            row: dict[str, Any] = {
                "model": model,
                "accuracy_mean": res["accuracy_mean"],
                "accuracy_sd": res["accuracy_sd"],
                "n_templates": res["n_templates"],
                "n_items": res["n_items"],
            }
            row.update(res["per_template"])  # one column per template, named by its text
            rows.append(row)
        elif task == "visual_property_norms":
            for pf, stats in sorted(res["per_pf"].items()):
                rows.append({"model": model, "pf": pf, **stats})
        else:
            raise ValueError(f"unknown probe task '{task}'; choose from {TASKS}")
    return rows


def probe_metrics(task: str, results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Flat {name: float} for `results.md` of `evaluate.py` (`<model>/<metric>`)."""
    out: dict[str, float] = {}
    for row in probe_rows(task, results):
        prefix = row["model"] + (f"/pf{row['pf']}" if "pf" in row else "")
        for key, value in row.items():
            if key in ("model", "pf") or "[MASK]" in key or key.startswith("n_"):
                continue
            out[f"{prefix}/{key}"] = float(value)
    return out


def _markdown(task: str, rows: list[dict[str, Any]]) -> str:
    if task == "memory_colors":
        head = ["model", "accuracy (mean ± sd over templates)", "templates", "items"]
        body = [
            [r["model"], f"{r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f}", str(r["n_templates"]), str(r["n_items"])]
            for r in sorted(rows, key=lambda r: -r["accuracy_mean"])
        ]
    else:
        head = ["model", "pf ≥", "masked MAP (headline)", "MAP (whole vocabulary)", "templates"]
        body = [
            [
                r["model"],
                str(r["pf"]),
                f"{r['masked_map_mean']:.3f} ± {r['masked_map_sd']:.3f}",
                f"{r['map_mean']:.3f} ± {r['map_sd']:.3f}",
                str(r["n_templates"]),
            ]
            for r in rows
        ]
    lines = [f"# {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    if task == "memory_colors" and rows:
        templates = list(dict.fromkeys(k for r in rows for k in r if "[MASK]" in k))
        lines += ["", "## accuracy per template", "", "| template | " + " | ".join(r["model"] for r in rows) + " |"]
        lines.append("|" + "---|" * (len(rows) + 1))
        for t in templates:
            cells = [f"{r[t]:.3f}" if t in r else "" for r in rows]
            lines.append(f"| `{t}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(task: str, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if task == "memory_colors":
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 2), 4))
        names = [r["model"] for r in rows]
        ax.bar(names, [r["accuracy_mean"] for r in rows], yerr=[r["accuracy_sd"] for r in rows], capsize=4)
        ax.set_ylabel("accuracy (mean over templates)")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30)
    else:
        models = list(dict.fromkeys(r["model"] for r in rows))
        pfs = sorted({r["pf"] for r in rows})
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(pfs) * max(1, len(models)) / 2 + 2), 4))
        width = 0.8 / max(1, len(models))
        x = np.arange(len(pfs))
        for k, model in enumerate(models):
            by_pf = {r["pf"]: r for r in rows if r["model"] == model}
            means = [by_pf[p]["masked_map_mean"] if p in by_pf else np.nan for p in pfs]
            sds = [by_pf[p]["masked_map_sd"] if p in by_pf else 0.0 for p in pfs]
            ax.bar(x + (k - (len(models) - 1) / 2) * width, means, width, yerr=sds, capsize=3, label=model)
        ax.set_xticks(x, [f"pf ≥ {p}" for p in pfs])
        ax.set_ylabel("masked MAP (mean over templates)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    ax.set_title(task + " (error bars: sd over templates)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_probe_report(out_dir: str | Path, task: str, results: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """Write the CSV, markdown table and bar plot for all models; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = probe_rows(task, results)
    paths = {
        "csv": out_dir / f"{task}_results.csv",
        "md": out_dir / f"{task}_results.md",
        "png": out_dir / f"{task}_results.png",
    }
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(_markdown(task, rows))
    _plot(task, rows, paths["png"])
    log.info("%s report: %s", task, ", ".join(str(p) for p in paths.values()))
    return paths
