"""Does loading hide behind compute? A training step fed from the DataModule's loader against the same step on batches
fetched beforehand (preloaded), for the default VQA model and data (visual_bert_tiny, batch 32).

Variants, run in turn within every repeat (the order rotates), each over `--steps` steps after `--warmup`:
  preloaded  the step on batches held in memory: the floor;
  loader     the step fed from `train_dataloader()` with the data module's settings (`--workers`, default the
             `hardware=cpu` preset's value);
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


def run(cfg, batches, steps: int, warmup: int) -> float:
    """Median seconds per step over `batches` (an iterable) after `warmup` steps."""
    dm, model = build(cfg)
    opt, _ = optimiser(model, steps)
    model.train()
    source = batches if batches is not None else dm.train_dataloader()
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
        seconds: dict[str, list[float]] = {"preloaded": [], "loader": []}
        for r in range(args.repeats):
            for variant in ("preloaded", "loader") if r % 2 == 0 else ("loader", "preloaded"):
                seconds[variant].append(
                    run(cfg, preloaded if variant == "preloaded" else None, args.steps, args.warmup)
                )
    ratios = [a / b for a, b in zip(seconds["loader"], seconds["preloaded"])]
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
    emit(
        "loader / preloaded batches (tiny, per step)",
        ratios,
        goal=1.05,
        why="decode + collate in the training process unless data.num_workers > 0",
    )


if __name__ == "__main__":
    main()
