"""Start-up costs: `train.py --help` / `--cfg job` against `import lightning`, and the embedded corpus written per task.

1. Processes, interleaved (help, cfg, lightning) x REPEATS after one warm-up round (which also fills the schema
   cache): the median and min of the paired ratios help / lightning and cfg / lightning, plus the median wall times.
   Goal (issue "faster by default"): `--help` < 1.5 s, i.e. well under `import lightning`.
2. The embedded corpus at the default size (1500 scenes), in a fresh cache dir: the core (what every run writes) and
   each task corpus (`vl.data.scenes.PARTS`, written when a run first asks for it), so a VQA run pays only the core.

`python bench/startup.py [--repeats 5] [--images 1500]`
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _table import emit  # noqa: E402


def _wall(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def startup(repeats: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VL_CACHE_DIR": tempfile.mkdtemp(prefix="vl-bench-")}
    commands = {
        "help": [sys.executable, "train.py", "--help"],
        "cfg": [sys.executable, "train.py", "--cfg", "job"],
        "lightning": [sys.executable, "-c", "import lightning"],
    }
    for cmd in commands.values():  # warm-up: page cache, and the schema cache of this VL_CACHE_DIR
        _wall(cmd, env)
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            times[name].append(_wall(cmd, env))
    for name in ("help", "cfg"):
        ratios = [a / b for a, b in zip(times[name], times["lightning"])]
        median = statistics.median(times[name])
        print(
            f"train.py {'--help' if name == 'help' else '--cfg job'}: median {median:.2f} s "
            f"(goal < 1.5 s: {'met' if median < 1.5 else 'NOT met'}); / import lightning "
            f"({statistics.median(times['lightning']):.2f} s): median {statistics.median(ratios):.2f}, "
            f"min {min(ratios):.2f}"
        )
        label = "--help" if name == "help" else "--cfg job"
        emit(f"train.py {label}, seconds", times[name], goal=1.5, why="hydra + vl.config only; schemas cached as JSON")
        emit(f"train.py {label} / import lightning", ratios, goal=None)


def corpus(images: int) -> None:
    from vl.data.scenes import PARTS, SceneSettings, ensure_corpus

    settings = SceneSettings(num_images=images)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        ensure_corpus(cache, settings)
        core = time.perf_counter() - t0
        print(f"embedded corpus, {images} scenes: core (every run) {core:.1f} s")
        total = core
        for part in PARTS:
            t0 = time.perf_counter()
            ensure_corpus(cache, settings, [part])
            dt = time.perf_counter() - t0
            total += dt
            print(f"  + task corpus '{part}' (first run that reads it) {dt:.1f} s")
        print(f"  a VQA run writes {core / total:.2f} of the everything-at-once corpus ({total:.1f} s)")
        emit(
            f"corpus written by a VQA run / every task's ({images} scenes)",
            [core / total],
            goal=None,
            why="task corpora are written on first use",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=1500)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    startup(args.repeats)
    corpus(args.images)


if __name__ == "__main__":
    main()
