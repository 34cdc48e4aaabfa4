"""The results table a run prints and writes (`vl.report.write_results`)."""

from __future__ import annotations

from pathlib import Path

from vl.report import write_results


def test_the_printed_table_shows_every_metric_but_the_training_ones(tmp_path: Path, capsys) -> None:
    """A probe's / evaluation task's keys (`memory_colors/...`) are printed as test and val ones are (the table was
    empty for `task=memory_colors`); training values only go to results.md (their curves are plotted)."""
    metrics = {"memory_colors/accuracy_mean": 0.25, "test/vqa_acc": 0.5, "val/vqa_acc_best": 0.75, "train/loss": 1.5}
    path = write_results(tmp_path, [("evaluate", metrics)], title="t")
    printed = capsys.readouterr().out
    for key in ("memory_colors/accuracy_mean", "test/vqa_acc", "val/vqa_acc_best"):
        assert key in printed
    assert "train/loss" not in printed
    written = path.read_text()
    assert all(f"| evaluate | {key} | {value:.4f} |" in written for key, value in metrics.items())
