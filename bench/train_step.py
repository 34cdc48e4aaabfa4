"""Framework overhead: steps/s of `vl` (Lightning fit, the default VQA model and data) vs a bare PyTorch loop over the
same model, data loader and optimizer. Prints the ratio; < 1.15 means the framework costs under 15 % per step.

    python bench/train_step.py [--steps 150] [--repeats 3]
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


def build(steps: int, data_dir: str):
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import vl.build  # noqa: F401
    from vl.pipeline import build_datamodule, build_model

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train",
            overrides=[
                "experiment=none",
                "data=vqa",
                "model=visual_bert_tiny",
                f"paths.data_dir={data_dir}",
                "paths.output_dir=/tmp/vl-bench",
                "data.batch_size=32",
                "data.batch_size_per_device=32",
            ],
        )
    L.seed_everything(0, workers=True)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    model = build_model(cfg, dm)
    return cfg, dm, model, instantiate


def bare_loop(model, dm, steps: int) -> float:
    """The hand-written loop a researcher would otherwise write: same model, loader, AdamW, scheduler-free."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loader = dm.train_dataloader()
    it = iter(loader)
    start, done = time.perf_counter(), 0
    while done < steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        loss = _loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
    return steps / (time.perf_counter() - start)


def _loss(model, batch):
    out = model(batch)
    return sum(head(out, batch).loss for head in model.objectives.values())


def lightning_fit(model, dm, steps: int) -> float:
    import lightning as L

    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "vl-bench-data"))
    args = parser.parse_args()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    bare, framework = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        _, dm, model, _ = build(args.steps, args.data_dir)
        bare.append(bare_loop(model, dm, args.steps))
        _, dm, model, _ = build(args.steps, args.data_dir)
        framework.append(lightning_fit(model, dm, args.steps))
    b, f = statistics.median(bare), statistics.median(framework)
    print(f"bare PyTorch loop : {b:7.1f} steps/s  (runs: {', '.join(f'{x:.1f}' for x in bare)})")
    print(f"vl (Lightning)    : {f:7.1f} steps/s  (runs: {', '.join(f'{x:.1f}' for x in framework)})")
    print(f"time per step, vl / bare: {b / f:.3f}")


if __name__ == "__main__":
    main()
