"""Nothing lost, nothing silently wrong: exact mid-epoch resume, crash-safe checkpoint writes, non-finite losses,
run-dir claims, short `max_steps` runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import read_losses
from vl.pipeline import train

RESUME = (
    "experiment=none",
    "data=vqa",
    "trainer.deterministic=true",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=7",  # odd: the epoch's last optimizer step takes one micro-batch
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "test=false",
    "+callbacks.record._target_=tests.conftest.RecordLosses",
)
STEP_CKPT = "+callbacks.last_checkpoint.every_n_train_steps=1"  # last.ckpt after every optimizer step


def _weights(record: Path) -> dict[str, torch.Tensor]:
    """The final weights `RecordLosses` saved at the end of training."""
    return torch.load(f"{record}.weights.pt", map_location="cpu", weights_only=True)


def _resume_runs(
    make_cfg,
    tmp_path: Path,
    *extra: str,
    straight_extra: tuple[str, ...] = (),
    kill_batch: int = 5,
    base: tuple[str, ...] = RESUME,
) -> dict[str, object]:
    """An uninterrupted run, a run killed before epoch 1 micro-batch 5 (mid-accumulation: accumulation 2, so the last
    checkpoint is the step after micro-batch 3) and its resumption from last.ckpt."""
    runs = {}
    straight = make_cfg(*base, *straight_extra, f"+callbacks.record.path={tmp_path}/straight", name="straight")
    train(straight)
    first = make_cfg(
        *base,
        *extra,
        f"+callbacks.record.path={tmp_path}/first",
        "+callbacks.kill._target_=tests.conftest.InterruptAt",
        "+callbacks.kill.epoch=1",
        f"+callbacks.kill.batch={kill_batch}",
        name="first",
    )
    with pytest.raises(Exception, match=f"interrupted before epoch 1 batch {kill_batch}"):
        train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = make_cfg(*base, *extra, f"+callbacks.record.path={tmp_path}/resumed", f"ckpt_path={last}", name="resumed")
    train(resumed)
    runs["dirs"] = {k: Path(c.paths.output_dir) for k, c in (("straight", straight), ("resumed", resumed))}
    return runs


def _assert_exact_resume(tmp_path: Path, runs: dict, rank: int = 0, tol: float = 0.0, resumed_at: int = 4) -> None:
    straight = read_losses(tmp_path / "straight", rank)
    first = read_losses(tmp_path / "first", rank)
    resumed = read_losses(tmp_path / "resumed", rank)
    assert len(straight) == 14
    # the first run's last checkpoint was taken after micro-batch `resumed_at - 1` of epoch 1
    assert sorted(resumed) == [(1, b) for b in range(resumed_at, 7)], sorted(resumed)
    assert {(0, b) for b in range(7)} | {(1, b) for b in range(resumed_at)} <= set(first)
    for key, loss in {**first, **resumed}.items():
        assert loss == pytest.approx(straight[key], abs=tol, rel=tol), key
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        if tol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=tol, rtol=tol)


def test_mid_epoch_resume_is_exact_with_accumulation(make_cfg, tmp_path: Path) -> None:
    """Bit-exact on CPU, one process: every micro-batch loss and the final weights equal an uninterrupted run's."""
    acc = ("data.batch_size=16", "data.batch_size_per_device=8")
    runs = _resume_runs(make_cfg, tmp_path, *acc, STEP_CKPT, straight_extra=acc)
    _assert_exact_resume(tmp_path, runs)


def test_mid_epoch_resume_is_exact_with_a_combined_loader(make_cfg, tmp_path: Path) -> None:
    """MM-BERT pretraining batches the image data and the aux text corpus jointly (Lightning's CombinedLoader over
    {"main", "aux"}): both loaders' positions come back (they restarted their epoch before: the resumed losses
    differed from micro-batch 5 on)."""
    base = ("experiment=mm_bert_pretrain_tiny", *RESUME[2:])
    runs = _resume_runs(make_cfg, tmp_path, STEP_CKPT, straight_extra=(), base=base)
    last = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=False)
    positions = last["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert positions[0]["batches"] == 5 and [p["batch_size"] for p in positions] == [32, 8]  # main, aux
    _assert_exact_resume(tmp_path, runs, resumed_at=5)


@pytest.mark.slow
def test_resume_from_a_checkpoint_inside_an_accumulation_window_is_exact(make_cfg, tmp_path: Path) -> None:
    """Validation every 3 micro-batches with accumulation 2 checkpoints after micro-batch 2, half-way through a
    window: the checkpoint carries the window's gradients so far, and the resumed run is still bit-exact."""
    acc = ("data.batch_size=16", "data.batch_size_per_device=8", "trainer.val_check_interval=3")
    runs = _resume_runs(make_cfg, tmp_path, *acc, straight_extra=acc, kill_batch=4)
    last = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5 and "vl_partial_gradients" in last
    _assert_exact_resume(tmp_path, runs, resumed_at=3)


@pytest.mark.slow
def test_mid_epoch_resume_is_exact_with_workers(make_cfg, tmp_path: Path) -> None:
    """2 loader workers (prefetching ahead of the training loop) in the killed and the resumed run, none in the
    uninterrupted one: still bit-exact."""
    acc = ("data.batch_size=16", "data.batch_size_per_device=8")
    runs = _resume_runs(make_cfg, tmp_path, *acc, STEP_CKPT, "data.num_workers=2", straight_extra=acc)
    _assert_exact_resume(tmp_path, runs)


@pytest.mark.slow
def test_mid_epoch_resume_under_ddp(make_cfg, tmp_path: Path) -> None:
    """2 spawned CPU processes, accumulation 2: every rank's micro-batch losses and the final weights match the
    uninterrupted DDP run within 1e-6 (gloo all-reduce; measured bit-exact here)."""
    ddp = ("hardware=ddp_cpu", "data.batch_size=16", "data.batch_size_per_device=4")
    runs = _resume_runs(make_cfg, tmp_path, *ddp, STEP_CKPT, straight_extra=ddp)
    for rank in (0, 1):
        _assert_exact_resume(tmp_path, runs, rank=rank, tol=1e-6)


# ---------------------------------------------------------------------------------------------------- crash-safe writes
WRITER = """
import sys, torch
from vl.checkpoint_io import AtomicCheckpointIO
io, path, version = AtomicCheckpointIO(), sys.argv[1], int(sys.argv[2])
while True:
    version += 1
    io.save_checkpoint({"version": version, "w": torch.full((1_000_000,), float(version))}, path)
    print(version, flush=True)
"""


def _check_loadable(path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(state["w"], torch.full((1_000_000,), float(state["version"])))
    return int(state["version"])


@pytest.mark.slow
def test_killed_checkpoint_writer_always_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a process that keeps rewriting last.ckpt (4 MB) at random moments, 8 times (TMPDIR elsewhere): the
    file always loads and holds at least the last version the writer reported as written."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "elsewhere")}
    (tmp_path / "elsewhere").mkdir()
    rng = random.Random(0)
    written = 0
    for trial in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(ckpt), str(1000 * trial)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None
        written = int(proc.stdout.readline())  # one complete write by this process
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        written = max([written, *map(int, out.split())])
        assert _check_loadable(ckpt) >= written, trial
    # a clean save afterwards removes what the killed writers left behind
    from vl.checkpoint_io import AtomicCheckpointIO, stale_temp_files

    AtomicCheckpointIO().save_checkpoint({"version": 1, "w": torch.full((1_000_000,), 1.0)}, ckpt)
    assert _check_loadable(ckpt) == 1
    assert stale_temp_files(ckpt) == [] and sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]
    assert not list((tmp_path / "elsewhere").iterdir())


def test_atomic_save_failure_keeps_the_old_checkpoint_and_leaves_no_temp(tmp_path: Path) -> None:
    from vl.checkpoint_io import AtomicCheckpointIO, stale_temp_files

    io, ckpt = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"version": 1, "w": torch.full((1_000_000,), 1.0)}, ckpt)
    (tmp_path / ".last.ckpt.dead0001.tmp").write_bytes(b"half a checkpoint")  # a killed writer's leftover

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"version": 2, "w": torch.zeros(3), "x": Unpicklable()}, ckpt)
    assert _check_loadable(ckpt) == 1
    assert stale_temp_files(ckpt) == []
    io.save_checkpoint({"version": 3, "w": torch.full((1_000_000,), 3.0)}, ckpt)
    assert _check_loadable(ckpt) == 3 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_every_fit_writes_checkpoints_atomically(make_cfg) -> None:
    from vl.checkpoint_io import AtomicCheckpointIO
    from vl.pipeline import build_trainer

    trainer = build_trainer(make_cfg("experiment=none", "data=vqa"), [], [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer = build_trainer(make_cfg("experiment=none", "data=vqa", "hardware=ddp_cpu"), [], [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_cpu_ddp_collectives_time_out_instead_of_hanging(make_cfg) -> None:
    """hardware=ddp_cpu: spawned gloo DDP whose process group times out (hardware.collective_timeout_min), so a rank
    waiting on a collective that another rank never joins raises (gloo: "Timed out waiting ... for recv operation")
    instead of hanging for torch's default 30 minutes."""
    import datetime

    from lightning.pytorch.strategies import DDPStrategy

    from vl.pipeline import build_trainer

    trainer = build_trainer(make_cfg("experiment=none", "data=vqa", "hardware=ddp_cpu"), [], [])
    strategy = trainer.strategy
    assert isinstance(strategy, DDPStrategy) and strategy._start_method == "spawn"
    assert strategy._timeout == datetime.timedelta(minutes=10) and trainer.num_devices == 2
    cfg = make_cfg("experiment=none", "data=vqa", "hardware=ddp_cpu", "hardware.collective_timeout_min=1", name="one")
    assert build_trainer(cfg, [], []).strategy._timeout == datetime.timedelta(minutes=1)


# ---------------------------------------------------------------------------------------------------- short runs
def test_max_steps_shorter_than_an_epoch_ends_cleanly_with_checkpoints(make_cfg) -> None:
    cfg = make_cfg(
        "experiment=none",
        "data=vqa",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
    )
    metrics, _ = train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    for name in ("last.ckpt", "best.ckpt"):
        state = torch.load(ckpts / name, map_location="cpu", weights_only=False)
        assert state["global_step"] == 3, name
    assert {"val/vqa_acc", "test/vqa_acc"} <= set(metrics)


# ---------------------------------------------------------------------------------------------------- NaN / inf
def _assert_no_nonfinite_checkpoint(run: Path) -> None:
    for ckpt in run.rglob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def test_huge_lr_stops_with_a_clear_error_and_no_nonfinite_checkpoint(make_cfg) -> None:
    from vl.errors import TrainingDiverged

    cfg = make_cfg(
        "experiment=none",
        "data=vqa",
        "model.optimizer.lr=1e6",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=1",
    )
    with pytest.raises(TrainingDiverged, match=r"training diverged at optimizer step \d+: non-finite") as err:
        train(cfg)
    assert "vqa=" in str(err.value) or "gradient" in str(err.value)
    run = Path(cfg.paths.output_dir)
    assert not (run / "results.md").exists()
    _assert_no_nonfinite_checkpoint(run)


def test_injected_nan_loss_names_the_objective_and_step(make_cfg) -> None:
    """A NaN weight on one objective of two (MLM + ITM pretraining): the error names that term, at step 1."""
    from omegaconf import open_dict

    from vl.errors import TrainingDiverged

    cfg = make_cfg("experiment=none", "data=captions", "trainer.limit_train_batches=3")
    with open_dict(cfg):
        cfg.model.loss_weights = {"itm": float("nan")}
    with pytest.raises(
        TrainingDiverged, match=r"at optimizer step 1: non-finite loss term itm=nan \(epoch 0, micro-batch 0\)"
    ):
        train(cfg)
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))


@pytest.mark.slow
def test_cli_diverged_ddp_run_exits_nonzero_with_one_line_and_no_results(tmp_path: Path, data_dir: Path) -> None:
    """lr=1e6 under hardware=ddp_cpu: both ranks stop at the same step; the CLI prints one `error:` line, exits 2,
    writes no results.md and no non-finite checkpoint."""
    from tests.conftest import TINY_MODEL

    run = tmp_path / "diverged"
    proc = _train_cli(
        f"hydra.run.dir={run}",
        "experiment=none",
        "data=vqa",
        *TINY_MODEL,
        "hardware=ddp_cpu",
        "data.batch_size=32",
        "data.batch_size_per_device=16",
        "model.optimizer.lr=1e6",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "~callbacks.rich_progress_bar",
        f"paths.data_dir={data_dir}",
        "data.corpus.num_images=150",
        cwd=tmp_path,
    )
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: training diverged at optimizer step ")
    assert not (run / "results.md").exists()
    _assert_no_nonfinite_checkpoint(run)


# ---------------------------------------------------------------------------------------------------- run-dir claims
def _train_cli(*args: str, cwd: Path, timeout: int = 400):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)},
    )


def test_claim_run_dir_is_exclusive_and_refuses_earlier_checkpoints(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT
    from vl.errors import ConfigError
    from vl.run_dir import claim_run_dir, release_run_dir

    run = tmp_path / "run"
    other = [sys.executable, "-c", f"from vl.run_dir import claim_run_dir; claim_run_dir({str(run)!r})"]
    claim_run_dir(run)
    assert claim_run_dir(run) == run.resolve()  # idempotent in the owning process
    try:
        out = subprocess.run(other, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode != 0 and "is in use by another run (pid" in out.stderr
    finally:
        release_run_dir(run)
    assert subprocess.run(other, capture_output=True, cwd=ROOT, timeout=60).returncode == 0  # free again
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already holds checkpoints of an earlier run"):
        claim_run_dir(run)
    claim_run_dir(run, resume=True)  # ckpt_path= resumes into it
    release_run_dir(run)


def test_refused_rerun_leaves_the_old_run_config_untouched(tmp_path: Path) -> None:
    """The guard is a Hydra callback (on_run_start): it refuses before Hydra writes .hydra/config.yaml."""
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"old weights")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("old: config\n")
    proc = _train_cli(f"hydra.run.dir={run}", "experiment=none", "model.optimizer.lr=0.5", cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"error: hydra.run.dir: {run} already holds checkpoints")
    assert (run / ".hydra" / "config.yaml").read_text() == "old: config\n"
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
def test_an_output_dir_holding_a_run_is_refused_like_the_run_dir(tmp_path: Path, script: str) -> None:
    """`paths.output_dir=<a run dir>` (the dir the run writes to, apart from Hydra's run dir) gets the same claim:
    `evaluate.py ckpt_path=<run>/checkpoints/best.ckpt paths.output_dir=<run>` wrote its results.md and predictions
    over the training run's; now one line, before anything is read, and the run's files stay as they were."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"old weights")
    (run / "results.md").write_text("old results\n")
    args = ["experiment=none"] if script == "train.py" else [f"ckpt_path={run}/checkpoints/best.ckpt"]
    done = subprocess.run(
        [sys.executable, str(ROOT / script), *args, f"paths.output_dir={run}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: paths.output_dir: {run} already holds checkpoints of an earlier run"), last
    if script == "evaluate.py":
        assert "an evaluation writes its results and predictions there" in last
    assert (run / "results.md").read_text() == "old results\n"
    assert {p.name for p in run.iterdir()} - {".vl-run.lock"} == {"checkpoints", "results.md"}


def test_a_run_dir_in_use_is_refused(tmp_path: Path) -> None:
    from vl.run_dir import claim_run_dir, release_run_dir

    run = tmp_path / "busy"
    claim_run_dir(run)  # this process plays the first run
    try:
        proc = _train_cli(f"hydra.run.dir={run}", "experiment=none", cwd=tmp_path)
        _, err = proc.communicate(timeout=120)
    finally:
        release_run_dir(run)
    assert proc.returncode == 2 and f"error: hydra.run.dir: {run} is in use by another run (pid" in err
    assert not (run / ".hydra").exists()


@pytest.mark.slow
def test_two_runs_started_at_once_in_one_dir_one_proceeds(tmp_path: Path, data_dir: Path) -> None:
    from tests.conftest import TINY_MODEL

    run = tmp_path / "shared"
    args = [
        f"hydra.run.dir={run}",
        "experiment=none",
        "data=vqa",
        *TINY_MODEL,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "~callbacks.rich_progress_bar",
        f"paths.data_dir={data_dir}",
        "data.corpus.num_images=150",
    ]
    procs = [_train_cli(*args, f"seed={seed}", cwd=tmp_path) for seed in (1, 2)]
    results = [(p.communicate(timeout=400)[1], p.returncode)[::-1] for p in procs]  # drains the pipes
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-1500:] for _, err in results]
    refused = next(err for code, err in results if code == 2)
    assert "is in use by another run" in refused or "already holds checkpoints" in refused
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert (run / "csv" / "metrics.csv").read_text().count(header) == 1  # one run wrote it
    winner_seed = 1 if results[0][0] == 0 else 2
    assert f"seed: {winner_seed}" in (run / ".hydra" / "config.yaml").read_text()


BEST_BEFORE_KILL = (  # val/loss, highest is best: epoch 0's (the loss falls), before the kill at epoch 2
    "experiment=none",
    "data=vqa",
    "trainer.deterministic=true",
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.monitor=val/loss",
    "data.monitor_mode=max",
)


def test_resume_into_a_new_run_dir_keeps_the_best_checkpoint(make_cfg, tmp_path: Path) -> None:
    """`ckpt_path=<old run>/checkpoints/last.ckpt` in a new run dir: the best score and checkpoint so far come along
    (Lightning only reloads them when the checkpoint dir is unchanged, so best.ckpt used to restart at the resumed
    epoch and the test stage scored the best since the resume). The earlier best file is linked / copied into the
    new run dir; the test metrics equal the uninterrupted run's."""
    import warnings

    straight = make_cfg(*BEST_BEFORE_KILL, name="straight")
    straight_metrics, _ = train(straight)
    first = make_cfg(
        *BEST_BEFORE_KILL,
        "test=false",
        "+callbacks.kill._target_=tests.conftest.InterruptAt",
        "+callbacks.kill.epoch=2",
        "+callbacks.kill.batch=0",
        name="first",
    )
    with pytest.raises(Exception, match="interrupted before epoch 2 batch 0"):
        train(first)
    first_best = Path(first.paths.output_dir) / "checkpoints" / "best.ckpt"
    assert torch.load(first_best, weights_only=False)["epoch"] == 0  # the precondition: best before the kill
    before = first_best.read_bytes()
    resumed = make_cfg(*BEST_BEFORE_KILL, f"ckpt_path={first.paths.output_dir}/checkpoints/last.ckpt", name="resumed")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dirpath has changed.*")
        resumed_metrics, _ = train(resumed)
    assert resumed_metrics["val/loss_best"] == straight_metrics["val/loss_best"]
    tests = {k: v for k, v in straight_metrics.items() if k.startswith("test/")}
    assert tests and {k: resumed_metrics[k] for k in tests} == tests
    copied = Path(resumed.paths.output_dir) / "checkpoints" / "best.ckpt"
    assert copied.read_bytes() == before  # the run dir holds its best checkpoint
    assert first_best.read_bytes() == before  # and the earlier run's is untouched


def _earlier_state(old_dir: Path, score: float) -> dict[str, object]:
    """The state an earlier run's best-checkpoint callback saved (top 1, file `best.ckpt` in `old_dir`)."""
    best = str(old_dir / "best.ckpt")
    return {
        "monitor": "val/loss",
        "best_model_score": torch.tensor(score),
        "best_model_path": best,
        "current_score": torch.tensor(score),
        "dirpath": str(old_dir),
        "best_k_models": {best: torch.tensor(score)},
        "kth_best_model_path": best,
        "kth_value": torch.tensor(score),
        "last_model_path": "",
    }


@pytest.mark.parametrize("where", ["earlier dir", "moved dir", "gone"])
def test_best_checkpoint_state_follows_a_resume_into_another_dir(tmp_path: Path, caplog, where: str) -> None:
    """The earlier run's file is copied in ("earlier dir"); found under its own name in this dir when the run dir was
    moved ("moved dir"); when it is nowhere, tracking restarts, with a warning naming the file ("gone")."""
    import logging
    import warnings

    from vl.checkpoint_io import ModelCheckpoint

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    if where == "earlier dir":
        (old / "best.ckpt").write_bytes(b"earlier best")
    elif where == "moved dir":
        (new / "best.ckpt").write_bytes(b"moved best")
    cb = ModelCheckpoint(dirpath=new, filename="best", monitor="val/loss", mode="min")
    caplog.set_level(logging.INFO, logger="vl.checkpoint_io")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.load_state_dict(_earlier_state(old, 0.25))
    if where == "gone":
        assert cb.best_model_score is None and cb.best_k_models == {}
        assert f"{old / 'best.ckpt'} (val/loss=0.25) is gone" in caplog.text
        return
    target = str(new / "best.ckpt")
    assert cb.best_model_score == torch.tensor(0.25) and cb.best_model_path == target
    assert cb.best_k_models == {target: torch.tensor(0.25)} and cb.kth_best_model_path == target
    assert (new / "best.ckpt").read_bytes() == (b"earlier best" if where == "earlier dir" else b"moved best")
    if where == "earlier dir":
        assert (old / "best.ckpt").read_bytes() == b"earlier best"
    assert not list(new.glob(".*.tmp"))


def test_last_checkpoint_callback_resumes_into_another_dir_quietly(tmp_path: Path) -> None:
    """No monitored metric (`last.ckpt`): nothing to carry, and no "dirpath has changed" warning."""
    import warnings

    from vl.checkpoint_io import ModelCheckpoint

    cb = ModelCheckpoint(dirpath=tmp_path / "new", filename="last", monitor=None)
    state = {**_earlier_state(tmp_path / "old", 0.0), "monitor": None, "best_model_score": None, "best_k_models": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.load_state_dict(state)
    assert cb.best_model_score is None


def _loss_rows(run: Path) -> list[tuple[str, str]]:
    """(step, train/loss) of every training-loss row of the run's metrics.csv, in file order."""
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


KILL_AT = ("+callbacks.kill._target_=tests.conftest.InterruptAt", "+callbacks.kill.epoch=1")


def test_metrics_csv_of_a_run_resumed_in_place_is_the_uninterrupted_runs(make_cfg, tmp_path: Path) -> None:
    """Killed before epoch 1 micro-batch 5 (last.ckpt every 3 steps: the last after micro-batch 2, so the killed fit
    logged steps past it), killed again before micro-batch 4 of the fit resumed in place (`ckpt_path=` under the run
    dir), then resumed in place to the end: metrics.csv holds the uninterrupted run's training-loss rows, each step once (the earlier code
    appended the resumed rows after every earlier one: the steps logged after the checkpoint stood twice). After the
    second kill the rows before the checkpoint are all still there (Lightning's writer deleted the file when the
    resumed fit started; vl wrote the earlier rows back only at the stage's end)."""
    every3 = "+callbacks.last_checkpoint.every_n_train_steps=3"
    base = tuple(o for o in RESUME if not o.startswith("+callbacks.record")) + (every3,)
    straight = make_cfg(*base, name="straight")
    train(straight)
    want = _loss_rows(Path(straight.paths.output_dir))
    first = make_cfg(*base, *KILL_AT, "+callbacks.kill.batch=5", name="run")
    with pytest.raises(Exception, match="interrupted before epoch 1 batch 5"):
        train(first)
    run = Path(first.paths.output_dir)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    logged = _loss_rows(run)
    assert float(logged[-1][0]) >= last["global_step"]  # rows past the checkpoint, logged again on resume
    again = make_cfg(*base, *KILL_AT, "+callbacks.kill.batch=4", f"ckpt_path={run}/checkpoints/last.ckpt", name="run")
    with pytest.raises(Exception, match="interrupted before epoch 1 batch 4"):
        train(again)
    kept = _loss_rows(run)
    before = [row for row in want if float(row[0]) < last["global_step"]]
    assert kept[: len(before)] == before  # nothing lost to the second kill
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(make_cfg(*base, f"ckpt_path={run}/checkpoints/last.ckpt", name="run"))
    assert _loss_rows(run) == want
    # resuming from its own checkpoint dir is no surprise: Lightning's "exists and is not empty" note is not shown
    assert not [w for w in seen if "exists and is not empty" in str(w.message)]


@pytest.mark.parametrize("every", [2, 50])
def test_a_step_interval_last_checkpoint_also_holds_the_final_step(every: int, make_cfg) -> None:
    """`callbacks.last_checkpoint.every_n_train_steps=n` (the CLIP-BERT recipes: 50 / 1000) saves last.ckpt at the
    multiples of n; the fit's final state is saved too, so `trainer.max_steps=3` leaves last.ckpt at step 3 (Lightning
    alone: step 2 with n = 2, none with n = 50), for the probes, `resume=` and `test_checkpoint=last`."""
    cfg = make_cfg(
        "experiment=none",
        "data=vqa",
        "data.batch_size=16",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "test=false",
        f"+callbacks.last_checkpoint.every_n_train_steps={every}",
    )
    train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 3
