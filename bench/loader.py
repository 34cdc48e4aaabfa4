"""Does loading hide behind compute? A training step fed from the DataModule's loader against the same step on the
same batch fetched beforehand (preloaded), for the default VQA model and data (visual_bert_tiny, batch 32).

Paired per step: one model and optimiser take, in turn, a step on the preloaded copy of batch k and a step on batch k
fetched from `train_dataloader()` (the fetch timed with it); the order within a pair alternates. Both steps of a pair
see the same tensors and run within ~40 ms of each other, so the machine's drift (a tiny step's median moves by
±10 % from one second to the next on a shared 2-core VM) cancels in their ratio. A run's statistic is the median
pair ratio after `--warmup` pairs. Two rows:
  epoch 0    the loader of a data module whose feature cache is empty: every image's region features decoded for
             the first time (base64 LMDB records) as in a run's first epoch;
  epoch >= 1 the same loader in epoch 1, after one full pass: the decoded features come from the data module's cache
             (`data.feature_cache_mb`), as in every epoch of a training run after the first.
The preloaded batches come from a second data module with the same seed (identical batches: checked).
Goal (issue "faster by default"): <= 1.05 at the tiny size on 2 cores.

    python bench/loader.py [--steps 60] [--warmup 10] [--repeats 3] [--threads 1] [--workers N]
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _table import emit, paired_seconds  # noqa: E402
from train_step import bare_step, build, compose_cfg, optimiser, quiet, step_args  # noqa: E402


def epoch_loader(dm, epoch: int):
    """The data module's training loader positioned at `epoch` (epoch >= 1: after untimed full passes, so the decoded
    features are cached)."""
    loader = dm.train_dataloader()
    for e in range(epoch):
        loader.sampler.set_epoch(e)
        for _ in loader:
            pass
    loader.sampler.set_epoch(epoch)
    return loader


def paired_ratios(cfg, epoch: int, steps: int, warmup: int) -> list[float]:
    """Per pair k (after `warmup`): seconds of (fetch batch k from the loader + step) / (step on preloaded batch k)."""
    import torch

    dm_pre, model = build(cfg)
    preloaded = list(itertools.islice(epoch_loader(dm_pre, epoch), steps))
    dm, _ = build(cfg)  # its own, empty feature cache
    loader = iter(epoch_loader(dm, epoch))
    opt, _ = optimiser(model, 2 * steps)
    model.train()
    head = next(loader)
    if not torch.equal(head["input_ids"], preloaded[0]["input_ids"]):
        raise SystemExit("the two data modules' batches differ: the pairs would not compare like with like")
    fetched = itertools.chain([head], loader)  # the first pair (a warm-up pair) finds its batch already fetched
    held = iter(preloaded)

    pairs = paired_seconds(
        lambda: bare_step(model, opt, next(fetched)), lambda: bare_step(model, opt, next(held)), steps
    )
    return [a / b for a, b in pairs[warmup:]]


def main() -> None:
    parser = step_args(__doc__, steps=60, warmup=10)
    parser.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the preset's)")
    args = parser.parse_args()
    import torch
    from omegaconf import open_dict

    quiet(args.threads)
    rows = {0: "epoch 0", 1: "epoch >= 1"}
    medians: dict[int, list[float]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(args.data_dir, tmp)
        if args.workers is not None:
            with open_dict(cfg):
                cfg.data.num_workers = args.workers
        for r in range(args.repeats):
            for epoch in (0, 1) if r % 2 == 0 else (1, 0):
                medians[epoch].append(statistics.median(paired_ratios(cfg, epoch, args.steps, args.warmup)))
    print(
        f"default VQA model (visual_bert_tiny, batch 32), data.num_workers={cfg.data.num_workers}, "
        f"{torch.get_num_threads()} torch thread(s), {args.steps} step pairs per run, first {args.warmup} not timed"
    )
    for epoch, name in rows.items():
        values = medians[epoch]
        print(
            f"  loader / preloaded, {name:10s}: min {min(values):.3f}  median {statistics.median(values):.3f}   "
            "runs (median pair): " + ", ".join(f"{x:.3f}" for x in values)
        )
    emit(
        "loader / preloaded batches, epoch 0 (tiny, per step)",
        medians[0],
        goal=1.05,
        why="each image's features decoded once (base64) + collate in the training process unless num_workers > 0",
    )
    emit(
        "loader / preloaded batches, epoch >= 1 (tiny, per step)",
        medians[1],
        goal=1.05,
        why="decoded features cached (data.feature_cache_mb, read-only, no copy); tokenise + collate in-process",
    )


if __name__ == "__main__":
    main()
