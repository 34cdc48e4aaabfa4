"""Does loading hide behind compute? A training step fed from the DataModule's loader against the same step on batches
fetched beforehand (preloaded), for the default VQA model and data (visual_bert_tiny, batch 32).

Variants, run in turn within every repeat (the order rotates), each over `--steps` steps after `--warmup`:
  preloaded  the step on batches held in memory: the floor;
  loader     the step fed from `train_dataloader()` with the data module's settings (`--workers`, default the
             `hardware=cpu` preset's value), the first steps of epoch 0: every image's region features decoded for
             the first time (base64 LMDB records, ~60 % of the loader's time when profiled);
  warm       the same from epoch 1, after one full pass over the loader: the decoded features come from the data
             module's cache (`data.feature_cache_mb`), as in every epoch of a training run after the first;
Per run the median step time (a step another process interrupted does not move it); prints each repeat's ratio
loader / preloaded with min and median. Goal (issue "faster by default"): <= 1.05 at the tiny size on 2 cores.

    python bench/loader.py [--steps 60] [--warmup 10] [--repeats 3] [--threads 1] [--workers N]
"""

from __future__ import annotations

import itertools
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
from train_step import build, compose_cfg, optimiser, quiet, step_args  # noqa: E402


def run(cfg, batches, steps: int, warmup: int, *, warm: bool = False) -> float:
    """Median seconds per step over `batches` (an iterable; None: the data module's loader, from epoch 1 after one
    untimed pass when `warm`) after `warmup` steps."""
    dm, model = build(cfg)
    opt, _ = optimiser(model, steps)
    model.train()
    source = batches
    if source is None:
        source = dm.train_dataloader()
        if warm:
            for _ in source:  # epoch 0, untimed: fills the decoded-feature cache
                pass
            source.sampler.set_epoch(1)
    times, last = [], None
    for batch in itertools.islice(source, steps):
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
        out = model(batch)
        loss = sum(head(out, batch).loss for head in model.objectives.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    times.append(time.perf_counter() - last)
    return statistics.median(times[warmup:])


def main() -> None:
    parser = step_args(__doc__, steps=60, warmup=10)
    parser.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the preset's)")
    args = parser.parse_args()
    import torch
    from omegaconf import open_dict

    quiet(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(args.data_dir, tmp)
        if args.workers is not None:
            with open_dict(cfg):
                cfg.data.num_workers = args.workers
        dm, _ = build(cfg)
        preloaded = list(itertools.islice(dm.train_dataloader(), args.steps))
        seconds: dict[str, list[float]] = {"preloaded": [], "loader": [], "warm": []}
        for r in range(args.repeats):
            order = ("preloaded", "loader", "warm")
            for variant in order[r % 3 :] + order[: r % 3]:
                seconds[variant].append(
                    run(
                        cfg,
                        preloaded if variant == "preloaded" else None,
                        args.steps,
                        args.warmup,
                        warm=variant == "warm",
                    )
                )
    ratios = [a / b for a, b in zip(seconds["loader"], seconds["preloaded"])]
    warm = [a / b for a, b in zip(seconds["warm"], seconds["preloaded"])]
    print(
        f"default VQA model (visual_bert_tiny, batch 32), data.num_workers={cfg.data.num_workers}, "
        f"{torch.get_num_threads()} torch thread(s), {args.steps} steps per run, first {args.warmup} not timed"
    )
    for variant, values in seconds.items():
        print(
            f"  {variant:9s}: median {1000 * statistics.median(values):6.2f} ms/step   runs: "
            + ", ".join(f"{1000 * v:.2f}" for v in values)
        )
    print(
        f"  loader / preloaded: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}   pairs: "
        + ", ".join(f"{x:.3f}" for x in ratios)
    )
    print(
        f"  warm / preloaded:   min {min(warm):.3f}  median {statistics.median(warm):.3f}   pairs: "
        + ", ".join(f"{x:.3f}" for x in warm)
    )
    emit(
        "loader / preloaded batches, epoch 0 (tiny, per step)",
        ratios,
        goal=1.05,
        why="each image's features decoded once (base64) + collate in the training process unless num_workers > 0",
    )
    emit(
        "loader / preloaded batches, epoch >= 1 (tiny, per step)",
        warm,
        goal=1.05,
        why="decoded features cached (data.feature_cache_mb); collate still in the training process",
    )


if __name__ == "__main__":
    main()
