"""Sweeps from the CLI: Optuna over the monitored metric, one W&B (offline) run per job, grouped by sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, TINY_MODEL
from vl.config import _sweep_group

SHORT = (
    "experiment=none",
    "data=vqa",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "test=false",
    "data.corpus.num_images=150",
    *TINY_MODEL,
)


def test_optuna_sweep_with_wandb_offline(tmp_path: Path, data_dir: Path) -> None:
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "logger=wandb",
        *SHORT,
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Best value" in out.stdout + out.stderr
    assert (tmp_path / "sweep" / "optimization_results.yaml").is_file()
    runs = sorted((tmp_path / "sweep").glob("*/wandb/offline-run-*"))
    assert len(runs) == 2, runs  # one W&B run per job, each finished before the next starts
    assert {r.parts[-3] for r in runs} == {"0", "1"}


def test_wandb_group_is_the_sweep_outside_hydra() -> None:
    assert _sweep_group("pretrain_vqa") == "pretrain_vqa"
