"""The record `make bench` prints: each bench script `emit`s one line per measured ratio, `bench/run_all.py` gathers
them into one table with their goals (met or not) and, where it is not obvious, the cause of the number. Also the
per-step pairing the step benches share (`paired_seconds`)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

PREFIX = "BENCH\t"


def paired_seconds(a: Callable[[], object], b: Callable[[], object], pairs: int) -> list[tuple[float, float]]:
    """(seconds of `a()`, seconds of `b()`) for each of `pairs` pairs run back to back, the order flipping from pair to
    pair: this machine's speed drifts by ±10 % from one second to the next, which cancels in each pair's ratio."""
    out = []
    for k in range(pairs):
        seconds = {}
        for side, fn in (("a", a), ("b", b)) if k % 2 == 0 else (("b", b), ("a", a)):
            start = time.perf_counter()
            fn()
            seconds[side] = time.perf_counter() - start
        out.append((seconds["a"], seconds["b"]))
    return out


def emit(name: str, values: list[float], *, goal: float | None, higher_is_better: bool = False, why: str = "") -> None:
    """One table row: `values` are the paired ratios (or figures) of the repeats; the row shows their min and median,
    and whether the median meets `goal` (<= goal, or >= goal when `higher_is_better`)."""
    median = statistics.median(values)
    met = None if goal is None else (median >= goal if higher_is_better else median <= goal)
    row = {
        "name": name,
        "min": min(values),
        "median": median,
        "max": max(values),
        "n": len(values),
        "goal": goal,
        "higher_is_better": higher_is_better,
        "met": met,
        "why": why,
    }
    print(PREFIX + json.dumps(row), flush=True)


def table(rows: list[dict]) -> str:
    lines = [
        "| measure | median | min – max (n) | goal | met | cause |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = "—" if r["goal"] is None else (">= " if r["higher_is_better"] else "<= ") + f"{r['goal']:g}"
        met = {None: "—", True: "yes", False: "**no**"}[r["met"]]
        lines.append(
            f"| {r['name']} | {r['median']:.3f} | {r['min']:.3f} – {r['max']:.3f} ({r['n']}) | {goal} | {met} | "
            f"{r['why']} |"
        )
    return "\n".join(lines)
