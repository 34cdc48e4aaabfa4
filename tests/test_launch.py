"""Launching past one process: SLURM through hydra-submitit-launcher, torchrun, a shared run dir per launched job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vl.config import launcher_rank, launcher_run_name
from vl.pipeline import train
from vl.run_dir import claim_run_dir, release_run_dir

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_ENV = (
    "TORCHELASTIC_RUN_ID",
    "MASTER_PORT",
    "MASTER_ADDR",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_NTASKS",
    "SLURM_ARRAY_TASK_ID",
    "RANK",
    "SLURM_PROCID",
    "SLURM_RESTART_COUNT",
)


@pytest.fixture
def clean_env(monkeypatch):
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_run_name_is_shared_by_the_ranks_of_a_launched_job(clean_env) -> None:
    assert launcher_run_name("2026-12-03_10-00-00-123456") == "2026-12-03_10-00-00-123456"  # one process
    clean_env.setenv("SLURM_JOB_ID", "4242")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert launcher_run_name("t") == "t"  # `python train.py` inside an allocation: one process, its own dir
    clean_env.setenv("SLURM_NTASKS", "16")
    clean_env.setenv("SLURM_STEP_ID", "0")
    assert launcher_run_name("t") == "slurm-4242-0"  # every task of the srun step, and the requeued job
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert launcher_run_name("t") == "slurm-4242_3-0"
    clean_env.setenv("TORCHELASTIC_RUN_ID", "exp7")
    assert launcher_run_name("t") == "torchrun-exp7"
    clean_env.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id
    clean_env.setenv("MASTER_PORT", "29511")
    assert re.fullmatch(r"torchrun-localhost-29511-\d{4}-\d\d-\d\d", launcher_run_name("t"))


def test_launcher_rank(clean_env) -> None:
    assert launcher_rank() == 0
    clean_env.setenv("SLURM_PROCID", "5")
    assert launcher_rank() == 5
    clean_env.setenv("RANK", "3")
    assert launcher_rank() == 3


def test_slurm_launcher_takes_the_hardware_preset(make_cfg) -> None:
    cfg = make_cfg(
        "hydra/launcher=slurm", "hardware=multi_node", "hardware.num_nodes=4", "hardware.partition=gpu", tiny=False
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (4, 8, 8)
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 1440 and launcher["max_num_timeout"] == 3
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (4, 8)  # Lightning's world size = what SLURM starts
    local = make_cfg("hydra/launcher=local", tiny=False)
    assert OmegaConf.to_container(local.hydra.launcher, resolve=True)["_target_"].endswith("LocalLauncher")
    assert make_cfg(tiny=False).trainer.num_nodes == 1


def test_a_slurm_sweep_off_the_cluster_is_one_line_before_the_sweep_dir(
    make_cfg, tmp_path, monkeypatch, capsys
) -> None:
    """`-m hydra/launcher=slurm` where no `sbatch` is on PATH: one line and exit 2 at the multirun's start, before the
    sweep dir is claimed (submitit printed a traceback, "Could not detect srun", at the first submission)."""
    import shutil

    from vl.run_dir import RunDirGuard

    def multirun(launcher: str, sweep: str) -> OmegaConf:
        """What the callback reads of the composed config: the launcher's target, the sweep dir."""
        target = make_cfg(f"hydra/launcher={launcher}", name=launcher, tiny=False).hydra.launcher._target_
        return OmegaConf.create({"hydra": {"launcher": {"_target_": target}, "sweep": {"dir": str(tmp_path / sweep)}}})

    slurm = multirun("slurm", "sweep")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exit_:
        RunDirGuard().on_multirun_start(slurm)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: hydra/launcher=slurm: no `sbatch` on PATH")
    assert not (tmp_path / "sweep").exists()
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # on a cluster: the sweep goes on
    RunDirGuard().on_multirun_start(slurm)
    assert (tmp_path / "sweep").is_dir()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    RunDirGuard().on_multirun_start(multirun("local", "local"))  # the local launcher needs no SLURM
    assert (tmp_path / "local").is_dir()


def test_a_requeued_job_may_reuse_its_run_dir(tmp_path, clean_env) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    from vl.run_dir import RunDirGuard

    config = OmegaConf.create({"hydra": {"run": {"dir": str(run)}}, "ckpt_path": None})
    with pytest.raises(SystemExit):  # a fresh run into a dir with checkpoints is refused
        RunDirGuard().on_run_start(config)
    clean_env.setenv("SLURM_RESTART_COUNT", "1")
    RunDirGuard().on_run_start(config)  # the requeued job resumes there
    release_run_dir(run)


def test_secondary_ranks_leave_the_run_dir_to_rank_zero(tmp_path, clean_env) -> None:
    from vl.run_dir import RunDirGuard

    run = tmp_path / "run"
    claim_run_dir(run)  # rank 0 holds it
    clean_env.setenv("RANK", "1")
    config = OmegaConf.create(
        {
            "hydra": {
                "run": {"dir": str(run)},
                "runtime": {"output_dir": str(run)},
                "output_subdir": ".hydra",
                "job_logging": {"handlers": {"file": {"filename": "x.log"}}},
            }
        }
    )
    RunDirGuard().on_run_start(config)  # not refused: it is the same job
    assert config.hydra.output_subdir is None  # no second copy of .hydra/
    assert config.hydra.job_logging.handlers.file.filename == f"{run}/logs/rank1.log"
    release_run_dir(run)


def _quick(tmp_path: Path) -> list[str]:
    return [
        "experiment=none",
        "data.corpus.num_images=60",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "callbacks.rich_progress_bar=null",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=local", "seed=1,2", *_quick(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "logs").glob("*/multiruns/*"))
    results = sorted(sweep.glob("*/results.md"))
    assert [r.parent.name for r in results] == ["0", "1"], list(sweep.rglob("*"))[:30]
    assert list(sweep.glob(".submitit/*"))  # the jobs went through submitit


def _torchrun(tmp_path: Path, node: int, port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for key in LAUNCH_ENV:
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        f"--node-rank={node}",
        "--rdzv-backend=static",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "--rdzv-id=vltest",
        "train.py",
        "hardware=multi_node",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.sync_batchnorm=false",
        "hardware.gpus_per_node=1",
        "data.pin_memory=false",
        "data.num_workers=0",
        "data.batch_size_per_device=32",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost_share_one_run_dir(tmp_path) -> None:
    """Two "nodes" (torchrun agents on localhost, gloo on CPU): both ranks finish, one run dir named after the job,
    written by rank 0 only (rank 1 logs to logs/rank1.log)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = _quick(tmp_path)
    procs = [_torchrun(tmp_path, node, port, extra) for node in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-2500:] for o in outs)
    runs = list((tmp_path / "logs").glob("*/runs/*"))
    assert [r.name for r in runs] == ["torchrun-vltest"], runs
    run = runs[0]
    assert (run / "results.md").is_file() and (run / ".hydra" / "config.yaml").is_file()
    assert "] rank 1/2 (TorchElasticEnvironment)" in (run / "logs" / "rank1.log").read_text()
    log = (run / "train.log").read_text()
    assert "] rank 0/2 (TorchElasticEnvironment)" in log
    assert re.search(r"global batch \d+ = \d+ per device x 2 devices", log), log[-2000:]


@pytest.mark.slow
def test_simulated_slurm_job_trains_with_the_right_ranks(tmp_path) -> None:
    """The environment of a 2-task `srun` step on one node, 2 local processes: Lightning's SLURMEnvironment is
    detected (no process launching of its own), each process gets its SLURM_PROCID as global rank, and both share the
    run dir `slurm-<job>-<step>`."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
        env.update(
            PYTHONPATH=str(ROOT),
            WANDB_MODE="disabled",
            OMP_NUM_THREADS="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            SLURM_JOB_ID="777",
            SLURM_STEP_ID="0",
            SLURM_JOB_NAME="vl",
            SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="2",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NODEID="0",
            SLURM_NODELIST="localhost",
            SLURM_JOB_NUM_NODES="1",
        )
        cmd = [
            sys.executable,
            "train.py",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "data.batch_size_per_device=32",
            "data.num_workers=0",
            *_quick(tmp_path),
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-2500:] for o in outs)
    runs = list((tmp_path / "logs").glob("*/runs/*"))
    assert [r.name for r in runs] == ["slurm-777-0"], runs
    assert (runs[0] / "results.md").is_file()
    for rank, log in enumerate([runs[0] / "train.log", runs[0] / "logs" / "rank1.log"]):
        assert f"] rank {rank}/2 (SLURMEnvironment)" in log.read_text(), log.read_text()[-2000:]


def _val_losses(run: Path) -> list[float]:
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]


@pytest.mark.slow
def test_same_global_batch_gives_the_same_curve_at_any_world_size(make_cfg) -> None:
    """Global batch 32: 1 process x 4 accumulated micro-batches of 8 and 2 processes x 2 micro-batches of 8 see the
    same 32 examples per optimiser step (rank r takes positions r, r+2, ... of the epoch's order), so the validation
    loss after every epoch agrees (tolerance 1e-4: DDP's all-reduce sums in another order)."""
    common = (
        "experiment=none",
        "data=vqa",
        "trainer.max_epochs=2",
        "trainer.limit_val_batches=1.0",  # all of val: a DDP run shards it, so a batch limit would differ
        "data.batch_size=32",
        "data.batch_size_per_device=8",
        "test=false",
        "model.encoder.text_encoder.dropout=0.0",
    )
    one = make_cfg(*common, "trainer.limit_train_batches=8", name="one")  # 8 micro-batches = 2 steps per epoch
    two = make_cfg(*common, "hardware=ddp_cpu", "trainer.limit_train_batches=4", name="two")  # 4 per rank = 2 steps
    train(one)
    train(two)
    first, second = _val_losses(Path(one.paths.output_dir)), _val_losses(Path(two.paths.output_dir))
    assert len(first) == 2 and first == pytest.approx(second, abs=1e-4), (first, second)
    assert first[1] != pytest.approx(first[0], abs=1e-3)  # the steps changed the model
