"""Rebuild a sweep's report: `python -m vl.tools.report outputs/<task>/multiruns/<time>`.

Writes `multirun.md`, `multirun.csv` and `multirun.png` into the sweep dir (what the `SweepReport` Hydra callback
writes when a multirun ends; `vl/sweep_report.py`), and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vl.sweep_report import write_report


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m vl.tools.report") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Write multirun.md/.csv/.png for a finished sweep.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun dir (holds one dir per job)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir}: not a directory", file=sys.stderr)
        return 2
    paths = write_report(args.sweep_dir)
    if not paths:
        print(f"error: {args.sweep_dir}: no job dir with a metrics.json (no finished run)", file=sys.stderr)
        return 2
    print(paths[0].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
