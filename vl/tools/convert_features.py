"""`python -m vl.tools.convert_features tsv2lmdb IN.tsv OUT.lmdb` (also tsv2h5, h52lmdb, lmdb2h5, json2lmdb,
json2h5): convert region features between formats (see `vl.data.features.convert`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vl.data.features import convert as _convert_module
from vl.data.features.convert import CONVERSIONS, convert
from vl.errors import VLError

convert_doc = _convert_module.__doc__

_HELP = {
    "tsv": "bottom-up-attention / ViLBERT / LXMERT TSV file",
    "lmdb": "ViLBERT region-feature LMDB directory",
    "h5": "vl region-feature HDF5 file",
    "json": "directory of per-image FRCNN .json files, or a .jsonl of them",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vl.tools.convert_features",
        description="Convert region features between the bottom-up-attention TSV, the ViLBERT LMDB, the vl HDF5 "
        "layout and per-image FRCNN JSON. Outputs are written under a temporary name and renamed when complete.",
        epilog="examples:\n"
        "  python -m vl.tools.convert_features tsv2lmdb trainval_obj36.tsv trainval_obj36.lmdb --empty-id 'img{row}'\n"
        "  python -m vl.tools.convert_features lmdb2h5 coco.lmdb coco.h5 --overwrite",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="kind", required=True, metavar="CONVERSION")
    for kind, (src_kind, dst_kind) in CONVERSIONS.items():
        p = sub.add_parser(
            kind,
            help=f"{_HELP[src_kind]} -> {_HELP[dst_kind]}",
            description=convert_doc if src_kind == "tsv" else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("src", type=Path, metavar="IN", help=_HELP[src_kind])
        p.add_argument("dst", type=Path, metavar="OUT", help=_HELP[dst_kind])
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        if src_kind == "tsv":
            p.add_argument(
                "--fields",
                type=lambda s: [f.strip() for f in s.split(",") if f.strip()],
                help="comma-separated column names (default: by column count: 6 bottom-up, 7 +cls_prob, 10 LXMERT)",
            )
            p.add_argument(
                "--empty-id",
                metavar="TEMPLATE",
                help="image id for rows whose id is empty, formatted with {row} (1-based), e.g. 'img{row}'",
            )
    args = parser.parse_args(argv)
    try:
        n = convert(
            args.kind,
            args.src,
            args.dst,
            overwrite=args.overwrite,
            progress=not args.quiet,
            fields=getattr(args, "fields", None),
            empty_id=getattr(args, "empty_id", None),
        )
    except VLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {args.dst} was not written", file=sys.stderr)
        return 130
    print(f"wrote {n} images to {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
