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
    "+callbacks.last_checkpoint.every_n_train_steps=1",  # last.ckpt after every optimizer step
    "+callbacks.record._target_=tests.conftest.RecordLosses",
)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _resume_runs(make_cfg, tmp_path: Path, *extra: str, straight_extra: tuple[str, ...] = ()) -> dict[str, object]:
    """An uninterrupted run, a run killed before epoch 1 micro-batch 5 (mid-accumulation: accumulation 2, so the last
    checkpoint is the step after micro-batch 3) and its resumption from last.ckpt."""
    runs = {}
    straight = make_cfg(*RESUME, *straight_extra, f"+callbacks.record.path={tmp_path}/straight", name="straight")
    train(straight)
    first = make_cfg(
        *RESUME,
        *extra,
        f"+callbacks.record.path={tmp_path}/first",
        "+callbacks.kill._target_=tests.conftest.InterruptAt",
        "+callbacks.kill.epoch=1",
        "+callbacks.kill.batch=5",
        name="first",
    )
    with pytest.raises(Exception, match="interrupted before epoch 1 batch 5"):
        train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = make_cfg(
        *RESUME, *extra, f"+callbacks.record.path={tmp_path}/resumed", f"ckpt_path={last}", name="resumed"
    )
    train(resumed)
    runs["dirs"] = {k: Path(c.paths.output_dir) for k, c in (("straight", straight), ("resumed", resumed))}
    return runs


def _assert_exact_resume(tmp_path: Path, runs: dict, rank: int = 0, tol: float = 0.0) -> None:
    straight = read_losses(tmp_path / "straight", rank)
    first = read_losses(tmp_path / "first", rank)
    resumed = read_losses(tmp_path / "resumed", rank)
    assert len(straight) == 14
    assert sorted(first) == [(0, b) for b in range(7)] + [(1, b) for b in range(5)]
    # the last checkpoint is the optimizer step after micro-batch 3: the resumed fit continues at micro-batch 4
    assert sorted(resumed) == [(1, 4), (1, 5), (1, 6)], sorted(resumed)
    for key, loss in {**first, **resumed}.items():
        assert loss == pytest.approx(straight[key], abs=tol, rel=tol), key
    a, b = _weights(runs["dirs"]["straight"]), _weights(runs["dirs"]["resumed"])
    assert a.keys() == b.keys()
    for name in a:
        if tol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=tol, rtol=tol)


def test_mid_epoch_resume_is_exact_with_accumulation(make_cfg, tmp_path: Path) -> None:
    """Bit-exact on CPU, one process: every micro-batch loss and the final weights equal an uninterrupted run's."""
    runs = _resume_runs(
        make_cfg,
        tmp_path,
        "data.batch_size=16",
        "data.batch_size_per_device=8",
        straight_extra=("data.batch_size=16", "data.batch_size_per_device=8"),
    )
    _assert_exact_resume(tmp_path, runs)


@pytest.mark.slow
def test_mid_epoch_resume_is_exact_with_workers(make_cfg, tmp_path: Path) -> None:
    """2 loader workers (prefetching ahead of the training loop) in the killed and the resumed run, none in the
    uninterrupted one: still bit-exact."""
    acc = ("data.batch_size=16", "data.batch_size_per_device=8")
    runs = _resume_runs(make_cfg, tmp_path, *acc, "data.num_workers=2", straight_extra=acc)
    _assert_exact_resume(tmp_path, runs)


@pytest.mark.slow
def test_mid_epoch_resume_under_ddp(make_cfg, tmp_path: Path) -> None:
    """2 spawned CPU processes, accumulation 2: every rank's micro-batch losses and the final weights match the
    uninterrupted DDP run within 1e-6 (gloo all-reduce; measured bit-exact here)."""
    ddp = ("hardware=ddp_cpu", "data.batch_size=16", "data.batch_size_per_device=4")
    runs = _resume_runs(make_cfg, tmp_path, *ddp, straight_extra=ddp)
    for rank in (0, 1):
        _assert_exact_resume(tmp_path, runs, rank=rank, tol=1e-6)
