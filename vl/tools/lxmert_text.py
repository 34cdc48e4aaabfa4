"""`python -m vl.tools.lxmert_text --out train_mlm.jsonl mscoco_train.json ...`: LXMERT pretraining JSON -> MLM text
JSONL (rules: `vl.data.formats.lxmert`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vl.data.formats.lxmert import convert_lxmert_json
from vl.errors import DataError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vl.tools.lxmert_text", description="LXMERT pretraining JSON -> MLM text JSONL"
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="LXMERT JSON files (e.g. mscoco_train.json)")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL (e.g. train_mlm.jsonl)")
    args = parser.parse_args(argv)
    try:
        n = convert_lxmert_json(args.inputs, args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} lines to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
