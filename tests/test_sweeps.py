"""Sweeps from the CLI: Optuna over the monitored metric, one W&B (offline) run per job, grouped by sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from tests.conftest import ROOT, TINY_MODEL, compose_cfg
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


@pytest.mark.slow  # a subprocess sweep
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
        f"hydra.sweep.dir={tmp_path}/sweep-7f3a",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Best value" in out.stdout + out.stderr
    assert (tmp_path / "sweep-7f3a" / "optimization_results.yaml").is_file()
    results = OmegaConf.load(tmp_path / "sweep-7f3a" / "optimization_results.yaml")
    best = max(json.loads((tmp_path / "sweep-7f3a" / j / "metrics.json").read_text())["value"] for j in ("0", "1"))
    assert results.best_value == best  # maximize (val/vqa_acc is a max metric), on each run's best value
    assert (tmp_path / "sweep-7f3a" / "multirun.md").is_file()
    runs = sorted((tmp_path / "sweep-7f3a").glob("*/wandb/offline-run-*"))
    assert len(runs) == 2, runs  # one W&B run per job, each finished before the next starts
    assert {r.parts[-3] for r in runs} == {"0", "1"}
    # grouped by sweep: each run's record file carries the group "<task_name>-<sweep dir name>"
    task_name = OmegaConf.load(tmp_path / "sweep-7f3a" / "0" / ".hydra" / "config.yaml").task_name
    for run in runs:
        (record,) = run.glob("run-*.wandb")
        assert f"{task_name}-sweep-7f3a".encode() in record.read_bytes(), run


def test_wandb_group_is_the_sweep_outside_hydra() -> None:
    assert _sweep_group("pretrain_vqa") == "pretrain_vqa"


def test_wandb_group_names_the_sweep_in_a_multirun(tmp_path: Path, data_dir: Path) -> None:
    """The resolver's multirun branch: `<default>-<last part of hydra.sweep.dir>`; a single run keeps the default."""
    cfg = compose_cfg(["logger=wandb"], output_dir=tmp_path / "run", data_dir=data_dir)
    try:
        with read_write(cfg.hydra), open_dict(cfg.hydra):  # set_config made the hydra node read-only
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(tmp_path / "multiruns" / "2026-12-03_08-00-00") + "/"
        HydraConfig.instance().set_config(cfg)
        assert _sweep_group("pretrain_vqa") == "pretrain_vqa-2026-12-03_08-00-00"
        assert cfg.logger.wandb.group == f"{cfg.task_name}-2026-12-03_08-00-00"  # what WandbLogger receives
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(cfg)
        assert _sweep_group("pretrain_vqa") == "pretrain_vqa"
        assert cfg.logger.wandb.group == cfg.task_name
    finally:
        HydraConfig.instance().cfg = None


def test_optuna_direction_follows_the_monitored_metric(tmp_path: Path, data_dir: Path) -> None:
    loss = compose_cfg(["hparams_search=optuna", "experiment=none", "data=vlp"], output_dir=tmp_path, data_dir=data_dir)
    acc = compose_cfg(["hparams_search=optuna", "experiment=none", "data=vqa"], output_dir=tmp_path, data_dir=data_dir)
    assert (loss.data.monitor, loss.hydra.sweeper.direction) == ("val/mlm_loss", "minimize")
    assert (acc.data.monitor, acc.hydra.sweeper.direction) == ("val/vqa_acc", "maximize")
