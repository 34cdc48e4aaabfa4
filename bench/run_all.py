"""`make bench`: run every benchmark in bench/ (each prints its own details), then one table of every measured ratio
with its goal and whether it is met (`bench/_table.py`). A script that fails is a row saying so; the others still run.

    python bench/run_all.py [--only NAME[,NAME]] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _table import PREFIX, table  # noqa: E402

#: scripts `make bench` runs, with the arguments of the recorded run (`--quick`: fewer repeats, a smoke run)
SCRIPTS = {
    "train_step.py": [],
    "step_parts.py": [],
    "loader.py": [],
    "startup.py": [],
    "retrieval_memory.py": [],
    "image_loader.py": [],
    "vs_hf.py": [],
    "fused.py": [],
    "bf16_cpu.py": [],
    "stream.py": [],
    "malformed_inputs.py": [],
}
QUICK = {
    "train_step.py": ["--repeats", "1", "--steps", "20", "--warmup", "5"],
    "step_parts.py": ["--repeats", "1", "--epochs", "1", "--warmup", "5"],
    "loader.py": ["--repeats", "1", "--steps", "20", "--warmup", "5"],
    "startup.py": ["--repeats", "1", "--images", "200"],
    "retrieval_memory.py": ["--sizes", "500x100", "--cross-images", "50", "--cross-captions", "4", "--repeats", "1"],
    "image_loader.py": ["--repeats", "1", "--batches", "4"],
    "vs_hf.py": ["--repeats", "1", "--steps", "3", "--tiny-steps", "3"],
    "fused.py": ["--repeats", "1", "--steps", "5"],
    "bf16_cpu.py": ["--repeats", "1", "--steps", "5"],
    "stream.py": ["--repeats", "1", "--images", "100"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated script names (without .py)")
    parser.add_argument("--quick", action="store_true", help="one short repeat each: checks the scripts run")
    args = parser.parse_args()
    only = {f"{n}.py" for n in args.only.split(",") if n}
    rows: list[dict] = []
    for script, extra in SCRIPTS.items():
        if only and script not in only:
            continue
        if args.quick:
            extra = QUICK.get(script, extra)
        print(f"== {script} {' '.join(extra)}", flush=True)
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / script), *extra], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PREFIX):
                rows.append(json.loads(line[len(PREFIX) :]))
            else:
                print(line, end="", flush=True)
        if proc.wait() != 0:
            rows.append(
                {
                    "name": f"{script} FAILED (exit {proc.returncode})",
                    "min": float("nan"),
                    "median": float("nan"),
                    "max": float("nan"),
                    "n": 0,
                    "goal": None,
                    "higher_is_better": False,
                    "met": False,
                    "why": "",
                }
            )
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
