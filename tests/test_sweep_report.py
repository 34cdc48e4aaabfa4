"""Sweep reports: rows best first in the monitored metric's direction, seeds grouped as mean ± sd."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from vl.sweep_report import write_report
from vl.tools.report import main as report_main


def _job(sweep: Path, num: int, overrides: list[str], metrics: dict[str, float], mode: str = "max") -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    monitor = "val/vqa_acc" if mode == "max" else "val/loss"
    (job / "metrics.json").write_text(json.dumps({"metrics": metrics, "monitor": monitor, "mode": mode}))


def test_rows_best_first_and_seeds_grouped(tmp_path: Path) -> None:
    sweep = tmp_path / "2026-12-03_10-00-00"
    # lr 1e-3: seeds 1, 2 -> best 0.70, 0.80 (mean 0.75); lr 1e-4: seeds 1, 2 -> 0.60, 0.64
    values = {("1e-3", "1"): 0.70, ("1e-3", "2"): 0.80, ("1e-4", "1"): 0.60, ("1e-4", "2"): 0.64}
    for n, ((lr, seed), v) in enumerate(sorted(values.items(), key=lambda kv: kv[0][0] == "1e-3")):
        metrics = {"val/vqa_acc": v - 0.1, "val/vqa_acc_best": v, "test/vqa_acc": v - 0.05, "train/loss": 1.0}
        _job(sweep, n, ["experiment=none", f"model.optimizer.lr={lr}", f"seed={seed}"], metrics)
    (sweep / "4" / ".hydra").mkdir(parents=True)  # a failed job: no metrics.json, left out
    assert report_main([str(sweep)]) == 0
    rows = list(csv.DictReader((sweep / "multirun.csv").open()))
    assert [r["model.optimizer.lr"] for r in rows] == ["1e-3", "1e-4"]  # best first (max)
    assert "seed" not in rows[0] and rows[0]["seeds"] == "2"
    assert float(rows[0]["val/vqa_acc_best"]) == pytest.approx(0.75)
    assert float(rows[0]["val/vqa_acc_best_sd"]) == pytest.approx(statistics.stdev([0.70, 0.80]))
    assert float(rows[1]["test/vqa_acc"]) == pytest.approx(0.57)
    assert "train/loss" not in rows[0]  # val/test metrics only
    md = (sweep / "multirun.md").read_text()
    assert "0.7500 ± 0.0707" in md and "4 jobs, 2 configurations" in md and "experiment" not in md.split("|", 1)[1]
    assert (sweep / "multirun.png").stat().st_size > 1000


def test_a_loss_monitor_ranks_lowest_first(tmp_path: Path) -> None:
    for n, (lr, loss) in enumerate([("1e-3", 2.0), ("3e-4", 0.5), ("1e-4", 1.0)]):
        _job(tmp_path, n, [f"model.optimizer.lr={lr}"], {"val/loss": loss + 0.1, "val/loss_best": loss}, mode="min")
    write_report(tmp_path)
    rows = list(csv.DictReader((tmp_path / "multirun.csv").open()))
    assert [r["model.optimizer.lr"] for r in rows] == ["3e-4", "1e-4", "1e-3"]
    assert [r["val/loss_sd"] for r in rows] == ["", "", ""]  # one seed each: no sd


def test_report_cli_on_a_dir_without_runs_is_one_line(tmp_path: Path, capsys) -> None:
    assert report_main([str(tmp_path)]) == 2
    assert "no job dir with a metrics.json" in capsys.readouterr().err
