"""Does the image loader keep up with training? Decoded images/s of `data=clip_vil_vqa`'s training DataLoader (decode,
resize, normalise, pad and collate in `--workers` worker processes) against the images/s of CLIP-ViL training steps
(forward, the heads' losses, backward, both optimisers; no Lightning) on the same batches, in one run; prints the ratio loader / model (>= 1: the
model never waits for data).

The two are timed in turn (loader alone, then model alone on batches fetched beforehand), `--repeats` times, and the
median of each is reported. Sizes: `--size tiny` (experiment=clip_vil_vqa_tiny: model=clip_vil_tiny, images 64 x 96) or `--size published`
(model=clip_vil, RN50 + BERT-base, images 384 x 640; on a CPU this takes minutes and says little: run it on a GPU).

    python bench/image_loader.py [--size tiny] [--workers 1] [--batches 12] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
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


def compose(size: str, data_dir: str, workers: int, batch: int):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import vl.pipeline  # noqa: F401  (schemas)

    GlobalHydra.instance().clear()
    overrides = [
        f"experiment={'clip_vil_vqa_tiny' if size == 'tiny' else 'clip_vil_vqa'}",
        f"paths.data_dir={data_dir}",
        f"data.num_workers={workers}",
        f"data.batch_size={batch}",
        f"data.batch_size_per_device={batch}",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hydra_compose("train", overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "published"), default="tiny")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vl.build import build_datamodule, build_model

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="vl-bench-")
    cfg = compose(args.size, data_dir, args.workers, args.batch_size)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    model = build_model(cfg, dm)
    from types import SimpleNamespace

    model._trainer = SimpleNamespace(estimated_stepping_batches=1000, max_epochs=1)
    fused = model.configure_optimizers()["optimizer"]
    model.train()

    loader = dm.train_dataloader()
    it = iter(loader)
    batches = [next(it) for _ in range(min(args.batches, len(loader) - 1))]  # also starts the workers
    load_rates, model_rates = [], []
    for _ in range(args.repeats):
        it = iter(loader)
        next(it)  # warm
        t0, n = time.perf_counter(), 0
        for _ in range(len(batches)):
            n += next(it)["pixel_values"].shape[0]
        load_rates.append(n / (time.perf_counter() - t0))
        t0, n = time.perf_counter(), 0
        for batch in batches:
            fused.zero_grad()
            out = model(batch)
            sum(head(out, batch).loss for head in model.objectives.values()).backward()
            fused.step()
            n += batch["pixel_values"].shape[0]
        model_rates.append(n / (time.perf_counter() - t0))
    load, train = statistics.median(load_rates), statistics.median(model_rates)
    print(
        f"size={args.size} workers={args.workers} batch={args.batch_size} image={tuple(batches[0]['pixel_values'].shape[2:])}"
    )
    print(f"loader: {load:.3g} images/s (median of {args.repeats}); model training step: {train:.3g} images/s")
    emit(
        f"image loader / model images per s ({args.size}, {args.workers} worker(s))",
        [a / b for a, b in zip(load_rates, model_rates)],
        goal=1.0,
        higher_is_better=True,
        why="decode/resize/normalise in DataLoader workers",
    )
    print(f"ratio loader / model = {load / train:.2f} ({'keeps up' if load >= train else 'the model waits for data'})")


if __name__ == "__main__":
    main()
