"""`make bench` (bench/run_all.py) gathers every bench script's rows into one table of ratios and goals."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_rows_are_emitted_parsed_and_judged_against_their_goals(capsys) -> None:
    table = _load("_table")
    table.emit("a / b", [1.10, 0.98, 1.02], goal=1.05, why="x")
    table.emit("speed-up", [12.0, 9.0, 16.0], goal=10, higher_is_better=True)
    table.emit("info only", [0.5], goal=None)
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith(table.PREFIX) for line in lines)
    rows = [json.loads(line[len(table.PREFIX) :]) for line in lines]
    assert [r["median"] for r in rows] == [1.02, 12.0, 0.5] and [r["min"] for r in rows] == [0.98, 9.0, 0.5]
    assert [r["met"] for r in rows] == [True, True, None]
    text = table.table(rows)
    assert "| a / b | 1.020 | 0.980 – 1.100 (3) | <= 1.05 | yes | x |" in text
    assert "| speed-up | 12.000 | 9.000 – 16.000 (3) | >= 10 | yes |  |" in text
    assert "| info only | 0.500 | 0.500 – 0.500 (1) | — | — |  |" in text
    table.emit("too slow", [1.2], goal=1.05)
    (row,) = [json.loads(line[len(table.PREFIX) :]) for line in capsys.readouterr().out.splitlines()]
    assert "**no**" in table.table([row])


def test_make_bench_runs_every_bench_script() -> None:
    """A new bench script must be listed in run_all.SCRIPTS (with its quick arguments), or it never reaches the
    table; the GPU-only MFU script runs from bench/gpu.sh instead."""
    run_all = _load("run_all")
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")} - {"run_all.py", "mfu.py"}
    assert set(run_all.SCRIPTS) == scripts
    assert set(run_all.QUICK) <= set(run_all.SCRIPTS)
