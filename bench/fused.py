"""Fused AdamW (vl's default where the device has the kernel) against torch's default AdamW: seconds per training step
(forward, backward, optimiser step) of the default VQA model on batches fetched beforehand, and of the optimiser step
alone. The two alternate within each repeat (the order flips); each side is the median of `--steps` steps after
`--warmup`. Prints the paired ratio fused / default with min and median; goal: < 1 at the tiny size (where the step
is dominated by the optimiser: the 2.2 M-parameter model has a 30522 x 64 word-embedding table). Also the seeds'
optimisers the recipes default to (`vl.optimizers.TransformersAdamW`: CLIP-ViL / MM-BERT; `BertAdam`: ViLBERT), on the
same fused kernel, against torch's fused AdamW in the same repeats: what those recipes' faithful defaults cost.

    python bench/fused.py [--steps 30] [--warmup 5] [--repeats 3] [--threads 1]
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
from train_step import batch_loss, build, compose_cfg, optimiser, quiet, step_args  # noqa: E402

#: the optimisers timed: torch's AdamW fused / default, and the seeds' (`vl.optimizers`) on the fused kernel
KINDS = {
    "fused": "torch.optim.AdamW",
    "default": "torch.optim.AdamW",
    "transformers": "vl.optimizers.TransformersAdamW",
    "bert_adam": "vl.optimizers.BertAdam",
}


def timed_run(
    cfg, batches, *, fused: bool, steps: int, warmup: int, bf16: bool = False, target: str = "torch.optim.AdamW"
) -> tuple[float, float]:
    """(median step seconds, median optimiser-step seconds); `bf16`: forward and loss under CPU bf16 autocast (what
    Lightning's `precision=bf16-mixed` does on a CPU accelerator); `target`: the optimiser class (`fused` only for
    torch's)."""
    import contextlib

    import torch
    from omegaconf import open_dict

    with open_dict(cfg):
        seeds = target.startswith("vl.")
        cfg.model.optimizer.fused = None if seeds else fused  # null: no `fused` argument (torch's only)
        cfg.model.optimizer._target_ = target
    _, model = build(cfg)
    opt, _ = optimiser(model, steps)
    assert bool(opt.defaults.get("fused")) == fused, opt.defaults
    assert type(opt).__name__ == target.rsplit(".", 1)[1], opt
    model.train()
    step_times, opt_times = [], []
    for batch in itertools.islice(itertools.cycle(batches), steps + warmup):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mid = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        step_times.append(end - start)
        opt_times.append(end - mid)
    return statistics.median(step_times[warmup:]), statistics.median(opt_times[warmup:])


def main() -> None:
    parser = step_args(__doc__, steps=30, warmup=5)
    args = parser.parse_args()
    import torch

    quiet(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(args.data_dir, tmp, args.set)
        dm, _ = build(cfg)
        batches = list(itertools.islice(dm.train_dataloader(), 8))
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
        for r in range(args.repeats):
            for kind in list(KINDS) if r % 2 == 0 else list(KINDS)[::-1]:
                runs[kind].append(
                    timed_run(
                        cfg,
                        batches,
                        fused=kind == "fused",
                        target=KINDS[kind],
                        steps=args.steps,
                        warmup=args.warmup,
                    )
                )
    step = [f[0] / d[0] for f, d in zip(runs["fused"], runs["default"])]
    optim = [f[1] / d[1] for f, d in zip(runs["fused"], runs["default"])]
    seeds = {kind: [t[1] / f[1] for t, f in zip(runs[kind], runs["fused"])] for kind in ("transformers", "bert_adam")}
    print(f"default VQA model (visual_bert_tiny, batch 32), {torch.get_num_threads()} torch thread(s)")
    for kind in KINDS:
        print(
            f"  {kind:12s}: step {1000 * statistics.median(s for s, _ in runs[kind]):.2f} ms,"
            f" optimiser step {1000 * statistics.median(o for _, o in runs[kind]):.2f} ms"
        )
    print(f"  fused / default per step: min {min(step):.3f} median {statistics.median(step):.3f}")
    print(f"  fused / default optimiser step: min {min(optim):.3f} median {statistics.median(optim):.3f}")
    for kind, ratios in seeds.items():
        print(f"  {kind} / fused optimiser step: min {min(ratios):.3f} median {statistics.median(ratios):.3f}")
    emit("fused / default AdamW, training step (tiny)", step, goal=1.0, why="the optimiser step is most of it")
    emit("fused / default AdamW, optimiser step alone (tiny)", optim, goal=1.0)
    emit(
        "seed AdamW (`TransformersAdamW`) / torch's fused AdamW, optimiser step alone (tiny)",
        seeds["transformers"],
        goal=1.1,
        why="CLIP-ViL / MM-BERT recipes; the same fused kernel with per-step arguments",
    )
    emit(
        "seed `BertAdam` / torch's fused AdamW, optimiser step alone (tiny)",
        seeds["bert_adam"],
        goal=1.5,
        why="ViLBERT recipes: the fused kernel's 7 passes over parameter-sized tensors + 3 for the seed's "
        "per-parameter clipping (norm, scale): ~1.4 where memory-bound",
    )


if __name__ == "__main__":
    main()
