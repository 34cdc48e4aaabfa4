"""bf16 autocast on this CPU for the tiny default model: seconds per training step (forward and loss under
`torch.autocast("cpu", torch.bfloat16)`, as Lightning's `precision=bf16-mixed` runs on a CPU accelerator) against fp32,
on batches fetched beforehand, fused AdamW on both sides. The two alternate within each repeat (the order flips);
each side is the median of `--steps` steps after `--warmup`. Prints the paired ratio bf16 / fp32 (< 1: bf16 helps).
Whether it helps depends on the CPU's bf16 instructions (AVX512-BF16 / AMX) and on the model size: at the tiny size
the step is dominated by small matmuls and the optimiser, which autocast does not touch, plus its casts.

    python bench/bf16_cpu.py [--steps 30] [--warmup 5] [--repeats 3] [--threads 1]
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

from _table import emit  # noqa: E402
from fused import timed_run  # noqa: E402
from train_step import build, compose_cfg, quiet, step_args  # noqa: E402


def main() -> None:
    parser = step_args(__doc__, steps=30, warmup=5)
    args = parser.parse_args()
    import torch

    quiet(args.threads)
    flags = (
        [f for f in ("avx512_bf16", "amx_bf16") if f in Path("/proc/cpuinfo").read_text()]
        if Path("/proc/cpuinfo").exists()
        else []
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(args.data_dir, tmp, args.set)
        dm, _ = build(cfg)
        batches = list(itertools.islice(dm.train_dataloader(), 8))
        runs: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.repeats):
            for bf16 in (True, False) if r % 2 == 0 else (False, True):
                step, _ = timed_run(cfg, batches, fused=True, steps=args.steps, warmup=args.warmup, bf16=bf16)
                runs[bf16].append(step)
    ratios = [b / f for b, f in zip(runs[True], runs[False])]
    print(
        f"default VQA model (visual_bert_tiny, batch 32), {torch.get_num_threads()} torch thread(s), CPU bf16 "
        f"instructions: {', '.join(flags) or 'none found'}"
    )
    for bf16 in (True, False):
        print(f"  {'bf16 autocast' if bf16 else 'fp32         '}: step {1000 * statistics.median(runs[bf16]):.2f} ms")
    print(f"  bf16 / fp32 per step: min {min(ratios):.3f} median {statistics.median(ratios):.3f}")
    emit(
        "bf16 autocast / fp32 per step on this CPU (tiny)",
        ratios,
        goal=None,
        why=f"CPU bf16 instructions: {', '.join(flags) or 'none'}; < 1 means hardware=bf16-style autocast helps",
    )


if __name__ == "__main__":
    main()
