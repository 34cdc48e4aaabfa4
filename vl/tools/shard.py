"""`python -m vl.tools.shard --out DIR [--splits train,val] data=vqa [data.root=...] ...`: write a corpus that a `vl` data
module reads as LitData chunks (`litdata.optimize`), for `data.streaming=true data.streaming_dir=DIR`.

The trailing arguments are Hydra overrides composed with `conf/train.yaml`, exactly as `train.py` takes them, so the
data module (corpus files, splits, objectives) is the one the training run builds. `--out` is a local
dir (must be new or empty) or an object-store URL (`s3://bucket/prefix`, `gs://...`: LitData uploads the chunks and
the side file)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from vl.errors import VLError

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_data(overrides: Sequence[str]):
    """The `data` node of `conf/train.yaml` with `overrides`, as `train.py` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vl.compose import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=list(overrides))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vl.tools.shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="shard dir (local, new or empty) or object-store URL")
    parser.add_argument("--splits", default="train", help="comma-separated splits to write (default: train)")
    parser.add_argument("--chunk-bytes", default="64MB", help="LitData chunk size (default 64MB)")
    parser.add_argument("--workers", type=int, default=1, help="litdata.optimize workers (1 keeps index order)")
    parser.add_argument("--compression", default=None, help="LitData chunk compression (e.g. zstd)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (e.g. data=vqa)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from vl.build import build_datamodule
    from vl.data.streaming import write_shards

    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    bad = [s for s in splits if s not in ("train", "val", "test")]
    if bad or not splits:
        parser.error(f"--splits {args.splits}: choose from train, val, test")
    try:
        cfg = compose_data(args.overrides)
        if cfg.data.get("streaming"):
            cfg.data.streaming = False  # the shards are written from the local corpus
        dm = build_datamodule(cfg)
        meta = write_shards(
            dm,
            args.out,
            splits=splits,
            chunk_bytes=args.chunk_bytes,
            num_workers=args.workers,
            compression=args.compression,
        )
    except VLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {entry['num_examples']}" for split, entry in meta["splits"].items())
    print(f"wrote {args.out}: {meta['data']} ({counts} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
