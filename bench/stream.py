"""Streaming shards vs the LMDB corpus: training examples/s of `data.streaming=true` (LitData chunks written by
`vl.tools.shard`, read with `StreamingDataLoader`) over examples/s of the local corpus (region-feature LMDB + annotation
JSON through the `EpochShuffleSampler` DataLoader), on the same embedded corpus, in one run.

Two measures, each one shuffled epoch of the train split:
  loader  the training DataLoader as a fit sees it (read, finish, vl's collator: tokenisation, padding, masking);
  read    the examples alone (no collator): the storage path itself.
The LMDB side runs twice: with `data.feature_cache_mb=0` (every read decodes its base64 record, as for a corpus larger
than the decoded-feature cache: what streaming is for; the goal row), and with the default cache (this small corpus
fits, so after the warm-up epoch LMDB reads decode nothing and hand out read-only cached arrays: a reference row).
Within every repeat the sides run in turn (the order rotates from repeat to repeat); printed per measure: the median
examples/s of each side, and the ratio streamed / LMDB of each repeat with its min and median (> 1: streaming is
faster). Local disk, page cache warm after the first epoch: this is the cost of LitData's format and loader, not of a
network read.

    python bench/stream.py [--data vqa|captions|clip_vil_vqa] [--images 600] [--repeats 5] [--workers 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _table import emit  # noqa: E402


def compose(data: str, data_dir: str, images: int, workers: int, *extra: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import vl.pipeline  # noqa: F401  (schemas)

    GlobalHydra.instance().clear()
    overrides = [
        f"data={data}",
        f"paths.data_dir={data_dir}",
        f"data.corpus.num_images={images}",
        f"data.num_workers={workers}",
        *extra,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hydra_compose("train", overrides=overrides)


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("vqa", "captions", "clip_vil_vqa"), default="vqa")
    parser.add_argument("--images", type=int, default=600, help="embedded corpus size (data.corpus.num_images)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vl.build import build_datamodule
    from vl.data.streaming import write_shards

    work = Path(tempfile.mkdtemp(prefix="vl-bench-stream-"))
    data_dir = args.data_dir or str(work / "data")
    lmdb = build_datamodule(compose(args.data, data_dir, args.images, args.workers, "data.feature_cache_mb=0"))
    cached = build_datamodule(compose(args.data, data_dir, args.images, args.workers))
    shards = work / "shards"
    with contextlib.redirect_stdout(io.StringIO()):  # LitData's progress lines
        write_shards(lmdb, str(shards))
    streamed = build_datamodule(
        compose(args.data, data_dir, args.images, args.workers, "data.streaming=true", f"data.streaming_dir={shards}")
    )
    for dm in (lmdb, cached, streamed):
        dm.setup("fit")
    loaders = {
        "lmdb": lmdb.train_dataloader(),
        "cached": cached.train_dataloader(),
        "streamed": streamed.train_dataloader(),
    }
    dataset = lmdb.datasets["train"]

    def lmdb_read(side: str) -> int:
        data, sampler = (lmdb if side == "lmdb" else cached).datasets["train"], loaders[side].sampler
        sampler.set_epoch(sampler.epoch + 1)
        return sum(1 for key in sampler if data[key] is not None)

    def streamed_read() -> int:
        data = loaders["streamed"].dataset
        data.set_epoch(data.current_epoch + 1)
        return sum(1 for _ in data)

    def epoch(loader) -> int:
        return sum(int(batch["input_ids"].shape[0]) for batch in loader)

    sides = ("lmdb", "cached", "streamed")
    runs = {
        "loader": {side: (lambda side=side: epoch(loaders[side])) for side in sides},
        "read": {"lmdb": lambda: lmdb_read("lmdb"), "cached": lambda: lmdb_read("cached"), "streamed": streamed_read},
    }
    n_examples = len(dataset)
    for fns in runs.values():  # warm: page cache, tokenizer, workers
        for fn in fns.values():
            fn()
    rates: dict[str, dict[str, list[float]]] = {m: {side: [] for side in sides} for m in runs}
    for repeat in range(args.repeats):
        for measure, fns in runs.items():
            order = sides[repeat % 3 :] + sides[: repeat % 3]
            for side in order:
                seconds, n = timed(fns[side])
                assert n == n_examples, (measure, side, n, n_examples)
                rates[measure][side].append(n / seconds)
    print(
        f"data={args.data} images={args.images} train examples={n_examples} "
        f"batch={lmdb.batch_size_per_device} workers={args.workers} repeats={args.repeats}"
    )
    for measure, got in rates.items():
        for base, name in (("lmdb", "LMDB, no feature cache"), ("cached", "LMDB, decoded-feature cache")):
            ratios = [s / b for s, b in zip(got["streamed"], got[base])]
            print(
                f"  {measure:6s}: {name:27s} {statistics.median(got[base]):8.0f} ex/s   streamed "
                f"{statistics.median(got['streamed']):8.0f} ex/s   streamed / LMDB: min {min(ratios):.3f}  "
                f"median {statistics.median(ratios):.3f}   pairs: {', '.join(f'{x:.3f}' for x in ratios)}"
            )
            if base == "lmdb":
                emit(
                    f"streamed / LMDB examples per s, {measure} ({args.data})",
                    ratios,
                    goal=1.0,
                    higher_is_better=True,
                    why="LMDB records hold base64 arrays (decoded per read); shards hold raw arrays",
                )
            else:
                emit(
                    f"streamed / LMDB with the decoded-feature cache, {measure} ({args.data})",
                    ratios,
                    goal=None,
                    higher_is_better=True,
                    why="this corpus fits the cache: cached LMDB reads decode nothing (larger corpora do not fit)",
                )


if __name__ == "__main__":
    main()
