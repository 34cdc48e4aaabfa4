"""Framework overhead per training step: `vl` (Lightning fit of the default VQA model and data) against a bare PyTorch
loop over the same model, data loader, optimiser and scheduler (`configure_optimizers()` on both sides).

The Lightning variants, each a fit of one epoch of `--steps` batches (`manual` and `unguarded` only on request):
  lightning  a plain LightningModule around the same model (training_step = the summed loss, the same optimiser and
           scheduler), no logger, progress bar or checkpoint: Lightning's own loop, the floor of any variant;
  manual   (only with --variants) the same module in Lightning's manual optimisation: its training_step does
           zero_grad, `manual_backward`, the optimiser and scheduler steps itself, so Lightning's closure, optimizer
           and zero_grad hooks are out of the loop: what is left is the loop proper (fetch, hook dispatch, progress);
  minimal  `vl` with no logger, progress bar or checkpoint (the framework alone);
  unguarded (only with --variants) `minimal` with the divergence guard's two hooks (`on_before_backward`,
           `on_before_optimizer_step`) off for the fit: what the guard costs inside the paired step (a measurement
           only: no `train.py` run can turn the guard off);
  real     `vl` with `train.py`'s own Trainer (`vl.pipeline.build_trainer`): the configured callbacks and loggers
           (checkpoints, early stopping, lr monitor, throughput, progress bar, CSV logger) and the ones every vl fit
           gets, i.e. what a user runs.
Paired per step: inside each fit a callback runs one step of the bare loop (forward, backward, optimiser step,
scheduler step, then the fetch of its next batch: see `BareTwin`) on a twin model built from the same seed, with its own data module, optimiser and scheduler, just
before Lightning's step k; so bare step k and Lightning step k run within ~30 ms of each other and the machine's
drift (a tiny step's median moves by ±10 % from one second to the next on a shared 2-core VM, measured) cancels in
their ratio. Lightning's step k is the time from the end of bare step k to the start of bare step k + 1: its own
fetch, hooks, forward, backward, divergence guard, optimiser and scheduler steps, callbacks and loggers. A run's
statistic is the median pair ratio after `--warmup` pairs (setup, teardown, warm-up and the epoch-end validation are
excluded); prints each repeat's statistic with min and median.

    python bench/train_step.py [--steps 60] [--warmup 10] [--repeats 3] [--threads 1] [--variants lightning,manual,unguarded]
                               [--set KEY=VALUE ...]
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
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _table import emit  # noqa: E402

VARIANTS = ("lightning", "minimal", "real")  # the default; `manual` and `unguarded` on request


def compose_cfg(data_dir: str, output_dir: str, overrides: Sequence[str] = ()):
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
                *overrides,  # e.g. a larger model: model.encoder.text_encoder.hidden_size=256
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
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override of the benched config (repeatable), e.g. a larger model: "
        "--set model.encoder.text_encoder.hidden_size=256 --set model.encoder.text_encoder.intermediate_size=1024",
    )
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


def batch_loss(model, batch):
    """The summed loss of every objective head on `batch` (what `VLSystem.training_step` returns)."""
    out = model(batch)
    return sum(head(out, batch).loss for head in model.objectives.values())


def bare_step(model, opt, batch, sched=None) -> None:
    """One step of the hand-written loop: forward, loss, backward, optimiser (and scheduler) step."""
    loss = batch_loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()


class BareTwin:
    """The loop a researcher would otherwise write, one step per call, with vl's own optimiser param groups and
    scheduler, on its own model, data module and loader.

    A call is one iteration of `for batch in loader: step(batch)` shifted by one fetch: the step on the batch fetched
    by the previous call, then the fetch of the next batch. So the bare fetch follows the bare optimiser step, as in
    that loop and as Lightning's own fetch (its prefetching fetcher) follows Lightning's optimiser step. Fetching first
    put the bare fetch right after Lightning's fetch, on warm caches: it measured ~0.5 ms (~13 %) faster than the same
    fetch after an optimiser step, which biased every ratio up by 2 - 3 points (2026-12-06)."""

    def __init__(self, cfg, steps: int) -> None:
        dm, self.model = build(cfg)
        self.opt, self.sched = optimiser(self.model, steps, cfg.trainer.max_epochs)
        self.model.train()
        loader = dm.train_dataloader()
        if steps > len(loader):
            raise SystemExit(f"--steps {steps} exceeds one epoch of the embedded VQA corpus ({len(loader)} batches)")
        self.batches = iter(loader)
        self.batch = next(self.batches)  # the first fetch is setup, as Lightning's first (prefetch) fetch

    def step(self) -> None:
        bare_step(self.model, self.opt, self.batch, self.sched)
        self.batch = next(self.batches, None)  # None after the epoch's last batch (no step follows it)


def plain_module(model, steps: int, max_epochs: int, *, manual: bool = False):
    """`model` in a LightningModule with nothing of vl's system hooks: the summed loss, the same optimiser and
    scheduler (`configure_optimizers()` of the model, built once here). `manual`: Lightning's manual optimisation,
    the step written as the bare loop's (`bare_step`) inside `training_step`."""
    import lightning as L

    opt, sched = optimiser(model, steps, max_epochs)

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            if not manual:
                return batch_loss(self.model, batch)
            loss = batch_loss(self.model, batch)
            optimizer = self.optimizers()
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
            if sched is not None:
                self.lr_schedulers().step()
            return None

        def validation_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            if sched is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Plain()


def paired_fit(cfg, steps: int, warmup: int, *, variant: str, output_dir: str) -> list[float]:
    """Lightning step k / bare step k for the pairs after `warmup` (see the module docstring)."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from vl.config import trainer_config
    from vl.pipeline import _instantiate_dict, build_trainer

    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
    twin = BareTwin(cfg, steps)
    marks: list[tuple[float, float]] = []  # (bare step start, bare step end) before each Lightning step

    class Pairs(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            start = time.perf_counter()
            twin.step()
            marks.append((start, time.perf_counter()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step >= steps:  # the end of the last Lightning step
                now = time.perf_counter()
                marks.append((now, now))

    dm, model = build(cfg)
    # one epoch of `steps` batches, then a short validation (after the timed window): ending mid-epoch by max_steps
    # would run EarlyStopping's epoch-end check without a validation metric, which raises
    one_epoch = {"max_epochs": 1, "limit_train_batches": steps, "limit_val_batches": 2}
    if variant == "real":  # the Trainer train.py fits with (vl.pipeline.build_trainer: + vl's callbacks and IO)
        callbacks, loggers = _instantiate_dict(cfg.get("callbacks")), _instantiate_dict(cfg.get("logger"))
        with open_dict(cfg):
            cfg.trainer.update(one_epoch)
        trainer = build_trainer(cfg, [Pairs(), *callbacks], loggers)
    else:
        trainer = instantiate(
            trainer_config(cfg.trainer),
            callbacks=[Pairs()],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **one_epoch,
        )
    if variant in ("lightning", "manual"):
        model = plain_module(model, steps, 1, manual=variant == "manual")
    if variant == "unguarded":  # instance attributes: Lightning looks its hooks up on the module by name
        model.on_before_backward = lambda loss: None
        model.on_before_optimizer_step = lambda optimizer: None
    trainer.fit(model, datamodule=dm)
    ratios = []
    for k in range(warmup, len(marks) - 1):
        bare = marks[k][1] - marks[k][0]
        lightning = marks[k + 1][0] - marks[k][1]
        ratios.append(lightning / bare)
    if not ratios:
        raise SystemExit(f"no steady-state pairs timed: raise --steps above --warmup + 1 (got {len(marks)} marks)")
    return ratios


WHY = {
    "lightning": "Lightning's loop alone (a plain LightningModule): the floor of the two below",
    "manual": "the same in Lightning's manual optimisation (no closure, optimizer or zero_grad hooks)",
    "minimal": "Lightning's loop + vl's per-step reseed, divergence guard, logging and metrics",
    "unguarded": "the minimal variant without the divergence guard (its cost: minimal - unguarded)",
    "real": "the minimal variant + train.py's callbacks and loggers",
}


def main() -> None:
    parser = step_args(__doc__, steps=60, warmup=10)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(WHY)}")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(WHY))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(WHY)})")
    import torch

    quiet(args.threads)
    medians: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                cfg = compose_cfg(args.data_dir, f"{tmp}/{r}-{variant}", args.set)
                ratios = paired_fit(cfg, args.steps, args.warmup, variant=variant, output_dir=f"{tmp}/{r}-{variant}")
                medians[variant].append(statistics.median(ratios))
    print(
        f"default VQA model (visual_bert_tiny, batch 32{''.join(', ' + o for o in args.set)}), {args.steps} step pairs "
        f"per run, first {args.warmup} not timed, {args.repeats} repeats, {torch.get_num_threads()} torch thread(s)"
    )
    for variant in variants:
        values = medians[variant]
        emit(
            f"Lightning ({variant}) / bare loop per step ({', '.join(args.set) or 'tiny'})",
            values,
            goal=1.05 if variant in ("minimal", "real") and not args.set else None,  # the goal: tiny
            why=WHY[variant],
        )
        print(
            f"  {variant} / bare per step (median pair): min {min(values):.3f}  median {statistics.median(values):.3f}"
            f"   runs: {', '.join(f'{x:.3f}' for x in values)}"
        )


if __name__ == "__main__":
    main()
