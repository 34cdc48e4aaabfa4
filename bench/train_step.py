"""Framework overhead per training step: `vl` (Lightning fit of the default VQA model and data) against a bare PyTorch
loop over the same model, data loader, optimiser and scheduler (`configure_optimizers()` on both sides).

Three variants, run in turn within every repeat (the order rotates from repeat to repeat), each from the same seed:
  bare     the hand-written loop: fetch, forward, backward, optimiser step, scheduler step;
  minimal  `vl` with no logger, progress bar or checkpoint (the framework alone);
  real     `vl` with `train.py`'s own callbacks and loggers (checkpoints, early stopping, lr monitor, progress bar,
           CSV logger), i.e. what a user runs.
Each run is one epoch of `--steps` batches. Only steady-state steps are timed: the time between consecutive batch
starts after `--warmup` steps (setup, teardown, warm-up and the epoch-end validation are excluded). Prints, per variant,
the median step time (each run's median step), and the ratio to `bare` of each repeat's pair with its min and median, by the wall clock and by
this process's CPU time (data loading runs in-process with the default `hardware=cpu`, so CPU time holds the whole
step; on a machine shared with other jobs it is the steadier of the two).

    python bench/train_step.py [--steps 60] [--warmup 10] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _table import emit  # noqa: E402

VARIANTS = ("bare", "minimal", "real")


def compose_cfg(data_dir: str, output_dir: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import vl.build  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(
            "train",
            overrides=[
                "experiment=none",
                "data=vqa",
                "model=visual_bert_tiny",
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={output_dir}",
                "data.batch_size=32",
                "data.batch_size_per_device=32",
            ],
        )


def build(cfg):
    import lightning as L

    from vl.pipeline import build_datamodule, build_model

    L.seed_everything(0, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    return dm, build_model(cfg, dm)


def step_args(description: str, *, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every per-step bench takes (steps, warm-up, repeats, torch threads, corpus cache dir)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup, help="steps of each run not timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "vl-bench-data"))
    return parser


def quiet(threads: int) -> None:
    """`threads` torch threads; Lightning's info lines and warnings off (they are not what is measured)."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def optimiser(model, steps: int, max_epochs: int = 1):
    """(optimizer, scheduler or None) exactly as `model.configure_optimizers()` builds them for a `steps`-step fit."""
    model.trainer = types.SimpleNamespace(estimated_stepping_batches=steps, max_epochs=max_epochs)
    configured = model.configure_optimizers()
    model.trainer = None
    if isinstance(configured, dict):
        return configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    return configured, None


def stamp(epoch: int) -> tuple[float, float, int]:
    """(wall clock, this process's CPU time, epoch) at a batch start."""
    return time.perf_counter(), time.process_time(), epoch


def steady_step_seconds(starts: list[tuple[float, float, int]], warmup: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds per step from `stamp`s: the intervals after `warmup` steps that stay in one epoch
    (no epoch-end work). The median, not the mean: a step that another process on the machine interrupted does not
    move it, so paired ratios repeat on a shared machine."""
    kept = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(starts[warmup:], starts[warmup + 1 :]) if a[2] == b[2]]
    if not kept:
        raise SystemExit(f"no steady-state steps timed: raise --steps above --warmup + 1 (got {len(starts)} steps)")
    return statistics.median(w for w, _ in kept), statistics.median(c for _, c in kept)


def bare_loop(cfg, steps: int, warmup: int) -> tuple[float, float]:
    """The loop a researcher would otherwise write, with vl's own optimiser param groups and scheduler."""
    dm, model = build(cfg)
    opt, sched = optimiser(model, steps, cfg.trainer.max_epochs)
    model.train()
    loader = dm.train_dataloader()
    if steps > len(loader):
        raise SystemExit(f"--steps {steps} exceeds one epoch of the embedded VQA corpus ({len(loader)} batches)")
    starts: list[tuple[float, float, int]] = []
    epoch = 0
    it = iter(loader)
    while len(starts) < steps:
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            it = iter(loader)
            continue
        starts.append(stamp(epoch))
        out = model(batch)
        loss = sum(head(out, batch).loss for head in model.objectives.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    starts.append(stamp(epoch))  # the end of the last step
    return steady_step_seconds(starts, warmup)


def lightning_fit(cfg, steps: int, warmup: int, *, real: bool, output_dir: str) -> tuple[float, float]:
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from vl.pipeline import _instantiate_dict

    class Stamps(L.Callback):
        def __init__(self) -> None:
            self.starts: list[tuple[float, float, int]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(stamp(trainer.current_epoch))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step >= steps:  # the end of the last step
                self.starts.append(stamp(trainer.current_epoch))

    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
    dm, model = build(cfg)
    stamps = Stamps()
    # one epoch of `steps` batches, then a short validation (after the timed window): ending mid-epoch by max_steps
    # would run EarlyStopping's epoch-end check without a validation metric, which raises
    one_epoch = {"max_epochs": 1, "limit_train_batches": steps, "limit_val_batches": 2}
    if real:  # what vl.pipeline.run_stage builds for train.py
        callbacks, loggers = _instantiate_dict(cfg.get("callbacks")), _instantiate_dict(cfg.get("logger"))
        trainer = instantiate(cfg.trainer, callbacks=[*callbacks, stamps], logger=loggers or False, **one_epoch)
    else:
        trainer = instantiate(
            cfg.trainer,
            callbacks=[stamps],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **one_epoch,
        )
    trainer.fit(model, datamodule=dm)
    return steady_step_seconds(stamps.starts, warmup)


def main() -> None:
    args = step_args(__doc__, steps=60, warmup=10).parse_args()
    import torch

    quiet(args.threads)
    seconds: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # rotate: no variant always runs first
            for variant in order:
                cfg = compose_cfg(args.data_dir, f"{tmp}/{r}-{variant}")
                if variant == "bare":
                    s = bare_loop(cfg, args.steps, args.warmup)
                else:
                    s = lightning_fit(
                        cfg, args.steps, args.warmup, real=variant == "real", output_dir=f"{tmp}/{r}-{variant}"
                    )
                seconds[variant].append(s)
    print(
        f"default VQA model (visual_bert_tiny, batch 32), {args.steps} steps per run, first {args.warmup} not timed, "
        f"{args.repeats} interleaved repeats, {torch.get_num_threads()} torch thread(s)"
    )
    for clock, c in (("wall clock", 0), ("CPU time of this process (steadier on a shared machine)", 1)):
        print(f" {clock}:")
        for variant in VARIANTS:
            ms = [1000 * s[c] for s in seconds[variant]]
            print(
                f"  {variant:8s}: median {statistics.median(ms):7.2f} ms/step   runs: {', '.join(f'{x:.2f}' for x in ms)}"
            )
        for variant in ("minimal", "real"):
            ratios = [v[c] / b[c] for v, b in zip(seconds[variant], seconds["bare"])]
            if c == 0:
                emit(
                    f"Lightning ({variant}) / bare loop per step (tiny)",
                    ratios,
                    goal=1.05,
                    why="Lightning's loop + vl's per-step reseed and divergence guard"
                    + (" + train.py's callbacks and loggers" if variant == "real" else ""),
                )
            print(
                f"  {variant} / bare per step: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}   "
                f"pairs: {', '.join(f'{x:.3f}' for x in ratios)}"
            )


if __name__ == "__main__":
    main()
