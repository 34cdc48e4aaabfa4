"""Where a training step's framework time goes: each per-step hook of `train.py`'s Trainer (the callbacks, the
module's own hooks: reseed, divergence guard) and the training step's logging and metric update, timed inside the
real fit of the default VQA model (`bench/train_step.py`'s "real" variant), in microseconds per step; and the
divergence guard checking large embedding tables by their looked-up rows (`vl.models.reliable.LookupRows`) against
reading their whole gradient, paired by fit (the two fits alternate, `--repeats` of each).

A hook's figure is its wall time inside the fit, after `--warmup` steps: small torch ops and Python frames cost far
more there than in a tight loop (the forward and backward passes leave the caches cold), which is what a step pays.

    python bench/step_parts.py [--epochs 2] [--warmup 10] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import emit  # noqa: E402
from train_step import ROOT, build, compose_cfg, quiet, step_args  # noqa: E402

sys.path.insert(0, str(ROOT))

STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
GUARD = ("on_before_backward", "on_before_optimizer_step")


def timed_fit(cfg: Any, *, epochs: int, warmup: int, rows: bool, output_dir: str) -> tuple[dict[str, float], float]:
    """({part: microseconds per step}, fit seconds per step) of one real fit; `rows=False` makes the guard read every
    gradient in full."""
    import lightning as L
    from omegaconf import open_dict

    import vl.models.reliable as reliable
    from vl.pipeline import _instantiate_dict, build_trainer

    totals: collections.Counter[str] = collections.Counter()
    state = {"trainer": None}

    def wrap(name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            trainer = state["trainer"]
            if trainer is None or trainer.global_step < warmup or not trainer.training:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start

        return timed

    saved = reliable.LOOKUP_ROWS_MIN
    reliable.LOOKUP_ROWS_MIN = saved if rows else 1 << 62
    try:
        with open_dict(cfg):
            cfg.paths.output_dir = output_dir
            cfg.trainer.update({"max_epochs": epochs, "limit_val_batches": 1, "num_sanity_val_steps": 0})
        dm, model = build(cfg)
        callbacks, loggers = _instantiate_dict(cfg.get("callbacks")), _instantiate_dict(cfg.get("logger"))
        trainer = build_trainer(cfg, callbacks, loggers)
        state["trainer"] = trainer
        for callback in trainer.callbacks:
            for hook in STEP_HOOKS:
                if getattr(type(callback), hook) is not getattr(L.Callback, hook):
                    setattr(callback, hook, wrap(f"{type(callback).__name__}.{hook}", getattr(callback, hook)))
        for hook in STEP_HOOKS:
            part = "guard" if hook in GUARD else ("reseed" if hook == "on_train_batch_start" else None)
            if part and getattr(type(model), hook) is not getattr(L.LightningModule, hook):
                setattr(model, hook, wrap(f"module {part} ({hook})", getattr(model, hook)))
        model._log_loss = wrap("training step: loss logging", model._log_loss)
        for head in model.objectives.values():
            head.update_metrics = wrap("training step: metric update", head.update_metrics)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        seconds = time.perf_counter() - start
        steps = max(trainer.global_step - warmup, 1)
        return {k: v / steps * 1e6 for k, v in totals.items()}, seconds / trainer.global_step
    finally:
        reliable.LOOKUP_ROWS_MIN = saved


def main() -> None:
    parser = step_args(__doc__, steps=0, warmup=10)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the embedded VQA corpus per fit")
    args = parser.parse_args()
    quiet(args.threads)
    parts: dict[str, list[float]] = collections.defaultdict(list)
    totals: list[float] = []
    step_ms: list[float] = []
    guard: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for rows in (True, False) if r % 2 == 0 else (False, True):
                cfg = compose_cfg(args.data_dir, f"{tmp}/{r}-{rows}")
                micros, seconds = timed_fit(
                    cfg, epochs=args.epochs, warmup=args.warmup, rows=rows, output_dir=f"{tmp}/{r}-{rows}"
                )
                guard[rows].append(sum(v for k, v in micros.items() if k.startswith("module guard")))
                if rows:
                    step_ms.append(seconds * 1e3)
                    totals.append(sum(micros.values()))
                    for k, v in micros.items():
                        parts[k].append(v)
    print(
        f"default VQA model (visual_bert_tiny, batch 32), train.py's Trainer, {args.repeats} fits of "
        f"{statistics.median(step_ms):.1f} ms per step (fit wall time / steps), µs per step:"
    )
    for name, values in sorted(parts.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"  {statistics.median(values):8.1f}  {name}")
    print(f"  {statistics.median(totals):8.1f}  all of the above")
    print(
        f"divergence guard, µs per step: rows {', '.join(f'{x:.0f}' for x in guard[True])}; "
        f"whole gradients {', '.join(f'{x:.0f}' for x in guard[False])}"
    )
    emit(
        "divergence guard per step, large tables by looked-up rows / read in full (tiny, CPU)",
        [a / b for a, b in zip(guard[True], guard[False])],
        goal=1.0,
        why="the word embeddings are ~90 % of the tiny model's gradient values; the graph walk costs ~0.15 ms",
    )


if __name__ == "__main__":
    main()
