"""What a run leaves for a person and a dashboard: test metrics in the logger, a metrics line per validation, curves
and metrics.csv whatever the logger, W&B names / job types / resolved config / failure exit code, short debug runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_cfg
from vl.build import stage_config
from vl.pipeline import train

FAST = (
    "experiment=none",
    "data=vqa",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
)


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_test_metrics_reach_the_logger_and_the_log_has_a_line_per_validation(make_cfg, caplog) -> None:
    cfg = make_cfg(*FAST, "data.batch_size=16")  # data.batch_size alone: vqa's per-device 64 follows it down
    with caplog.at_level("INFO"):
        metrics, _ = train(cfg)
    run = Path(cfg.paths.output_dir)
    logged = [float(r["test/vqa_acc"]) for r in _csv_rows(run) if r.get("test/vqa_acc")]
    assert logged == [pytest.approx(metrics["test/vqa_acc"], abs=1e-6)]
    assert "global batch 16 = 16 per device x 1 devices x 1 accumulation" in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 0 step 2", "epoch 1 step 4"], lines
    val = [float(r["val/vqa_acc"]) for r in _csv_rows(run) if r.get("val/vqa_acc")]
    assert f"val/vqa_acc={val[-1]:.4g}" in lines[-1]
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["monitor"] == "val/vqa_acc" and saved["mode"] == "max"
    assert saved["metrics"]["val/vqa_acc_best"] == pytest.approx(max(val), abs=1e-6)
    assert saved["value"] == saved["metrics"]["val/vqa_acc_best"]  # what a sweeper optimises: the best, not the last


@pytest.mark.parametrize("choice", ["best", "last"])
def test_the_test_stage_scores_the_chosen_checkpoint(choice: str, make_cfg, monkeypatch) -> None:
    """`test_checkpoint`: best.ckpt (the default) or last.ckpt, the final epoch's weights (ViLBERT's seed tests its
    last epoch); the returned checkpoint (what a pretrain stage hands on) stays the best."""
    import torch

    import vl.pipeline

    scored: list[str | None] = []
    real = vl.pipeline.score_checkpoint

    def recording(trainer_cfg, model, dm, ckpt, **kwargs):
        scored.append(ckpt)
        return real(trainer_cfg, model, dm, ckpt, **kwargs)

    monkeypatch.setattr(vl.pipeline, "score_checkpoint", recording)
    cfg = make_cfg(*FAST, "data.batch_size=16", f"test_checkpoint={choice}")
    run = Path(cfg.paths.output_dir) / "checkpoints"
    metrics, _ = train(cfg)
    assert scored == [str(run / f"{choice}.ckpt")]
    assert torch.load(scored[0], weights_only=True, map_location="cpu")["epoch"] == (
        1 if choice == "last" else torch.load(run / "best.ckpt", weights_only=True, map_location="cpu")["epoch"]
    )
    assert "test/vqa_acc" in metrics


def test_test_checkpoint_choices_are_checked_before_the_fit(make_cfg) -> None:
    from vl.config import check_config
    from vl.errors import ConfigError
    from vl.preflight import check_hand_off

    for exp in ("vilbert_vqa", "vilbert_vcr", "vilbert_retrieval", "vilbert_refcoco"):
        assert make_cfg(f"experiment={exp}", tiny=False).test_checkpoint == "last"
    assert make_cfg(*FAST).test_checkpoint == "best"
    with pytest.raises(ConfigError, match=r"^test_checkpoint=latest: must be one of best, last"):
        check_config(make_cfg(*FAST, "test_checkpoint=latest"))
    with pytest.raises(ConfigError, match=r"^test_checkpoint=last: no callback writes last\.ckpt"):
        check_hand_off(make_cfg(*FAST, "test_checkpoint=last", "callbacks=none"))
    check_hand_off(make_cfg(*FAST, "test_checkpoint=last", "callbacks=none", "test=false"))  # nothing is tested


def _wandb_record(run_dir: Path, expected: bytes, timeout: float = 60.0) -> bytes:
    """The offline run record once it holds `expected`: wandb's writer process may still be flushing it after
    `finish()` returns on a busy machine (seen: a record of 8 bytes)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        record = b"".join(p.read_bytes() for p in run_dir.glob("run-*.wandb"))
        if expected in record or time.monotonic() > deadline:
            return record
        time.sleep(0.5)


def test_wandb_run_names_job_types_resolved_config_and_curves(make_cfg, monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = make_cfg(*FAST, "logger=wandb", "test=false")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    assert (run / "csv" / "metrics.csv").is_file() and (run / "curves.png").is_file()  # whatever the logger
    (wandb_run,) = run.glob("wandb/offline-run-*")
    record = _wandb_record(wandb_run, b"params/total")  # offline: config, name, job type are in the record
    assert b"model.optimizer.lr" in record and b"params/total" in record  # flat, with parameter counts
    assert b"${data.monitor}" not in record and b"val/vqa_acc" in record  # resolved
    # the run's name: task name + the overrides (the test harness puts its own first)
    assert b"train trainer.enable_model_summary=false" in record and b"experiment=none data=vqa" in record
    # tags: the configured ones + one per override (a sweep can be grouped by what it swept)
    # (a protobuf string: its length byte, 10 = b"\n", then the tag; in the run name it follows a space)
    assert b"\ntest=false" in record


def test_wandb_tags_are_the_configured_ones_plus_the_overrides(monkeypatch) -> None:
    import vl.run_loggers as run_loggers

    overrides = ["model=vilbert", "+model.loss_weights.itm=2", "paths.output_dir=/x", "model=vilbert", "x=" + "y" * 80]
    monkeypatch.setattr(run_loggers, "command_overrides", lambda: overrides)
    tags = run_loggers.run_tags(OmegaConf.create({}), ["vqa", "model=vilbert"])
    assert tags == ["vqa", "model=vilbert", "model.loss_weights.itm=2", ("x=" + "y" * 80)[:64]]


def test_a_failed_run_closes_wandb_with_its_exit_code(make_cfg, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    codes: list[int] = []
    monkeypatch.setattr(wandb, "run", object())
    monkeypatch.setattr(wandb, "finish", lambda exit_code=0: codes.append(exit_code))

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("vl.pipeline.run_stage", crash)
    with pytest.raises(RuntimeError, match="boom"):
        train(make_cfg(*FAST))
    assert codes == [1]


def test_stage_job_types_and_debug_limit_shrinks_every_stage(tmp_path: Path, data_dir: Path) -> None:
    from vl.run_loggers import stage_loggers

    cfg = compose_cfg(["debug=limit", "logger=wandb"], output_dir=tmp_path, data_dir=data_dir)
    pre = stage_config(cfg, cfg.pretrain, tmp_path / "pretrain")
    assert cfg.pretrain.trainer.max_epochs == 16  # the default experiment's pretrain stage ...
    assert (pre.trainer.max_epochs, pre.trainer.limit_train_batches, pre.trainer.limit_test_batches) == (2, 5, 2)
    assert pre.trainer.default_root_dir == str(tmp_path / "pretrain")  # the stage's own dir
    assert stage_loggers(cfg, "pretrain").wandb.job_type == "pretrain"
    assert stage_loggers(cfg, "finetune").wandb.job_type == "finetune"
    assert stage_loggers(cfg, "train").wandb.job_type == "train"


def test_tensorboard_logger_writes_event_files_with_the_test_metrics(make_cfg) -> None:
    """`logger=tensorboard` (the `[tensorboard]` extra): event files in <run>/tensorboard holding the fit's and the
    test stage's scalars; metrics.csv and curves.png are still written."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(*FAST, "logger=tensorboard")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    scalars: set[str] = set()
    for events in (run / "tensorboard").rglob("events.out.tfevents.*"):  # the fit's and the test stage's
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert {"train/loss", "val/vqa_acc", "test/vqa_acc"} <= scalars, sorted(scalars)
    assert (run / "csv" / "metrics.csv").is_file() and (run / "curves.png").is_file()


class _WatchLoss(L.Callback):
    """Records, after every training step, the loss the progress bar shows (when there is one) and the step's loss."""

    shown: list[tuple[float, float]] = []
    last = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        if trainer.progress_bar_callback is not None:
            _WatchLoss.shown.append(
                (float(trainer.progress_bar_callback.get_metrics(trainer, pl_module)["train/loss"]), loss)
            )
        _WatchLoss.last = loss


@pytest.mark.parametrize("bar", ["none", "vl_rich"])
def test_train_loss_is_logged_only_when_read_and_its_readers_see_every_step(bar: str, make_cfg, monkeypatch) -> None:
    """With no progress bar, or vl's rich bar (which shows `last_train_loss` itself), `train/loss` is `self.log`ged
    only on the steps the loggers write; the bar shows each step's loss, and the metrics `train()` returns carry the
    last step's loss, as a per-step `self.log` gave them."""
    from omegaconf import open_dict

    from vl.models.system import VLSystem

    logged: list[int] = []
    real_log = VLSystem.log

    def counting_log(self, name, *args, **kwargs):
        if self.trainer.training and name == "train/loss":
            logged.append(self.trainer.global_step)
        return real_log(self, name, *args, **kwargs)

    monkeypatch.setattr(VLSystem, "log", counting_log)
    monkeypatch.setattr(_WatchLoss, "shown", [])
    cfg = make_cfg(
        "experiment=none",
        "data=vqa",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=4",
        "test=false",
        *(["trainer.enable_progress_bar=false"] if bar == "none" else []),
    )
    with open_dict(cfg):
        if bar == "vl_rich":
            cfg.callbacks.rich_progress_bar = {"_target_": "vl.callbacks.RichProgressBar"}
        cfg.callbacks.watch = {"_target_": f"{__name__}._WatchLoss"}
    metrics, _ = train(cfg)
    written = {int(r["step"]) for r in _csv_rows(Path(cfg.paths.output_dir)) if r.get("train/loss")}
    assert written == {3, 7, 11}, written  # log_every_n_steps=4
    assert sorted(set(logged)) == sorted(written), logged  # a call on each written step, none on the others
    if bar == "vl_rich":  # the bar showed every step's own loss
        assert len(_WatchLoss.shown) == 12 and all(abs(a - b) < 1e-6 for a, b in _WatchLoss.shown), _WatchLoss.shown
    assert metrics["train/loss"] == pytest.approx(_WatchLoss.last, abs=1e-6)


def test_a_step_logs_only_what_is_shown_and_the_loggers_get_every_term(make_cfg, monkeypatch) -> None:
    """Per training step `self.log` runs once (`train/loss`, for the tests' default TQDM bar, which reads it through
    Lightning; vl's rich bar does not need it: the test above), whatever the number of terms; the per-head
    terms are logged on exactly the steps the loggers write (`log_every_n_steps`), and the training metrics once per
    epoch (they were never written before: a per-step torchmetrics `update` has no step value)."""
    from vl.models.system import VLSystem

    calls: list[tuple[int, str]] = []
    real_log = VLSystem.log

    def counting_log(self, name, *args, **kwargs):
        if self.trainer.training and name.startswith("train/"):
            calls.append((self.trainer.global_step, name))
        return real_log(self, name, *args, **kwargs)

    monkeypatch.setattr(VLSystem, "log", counting_log)
    cfg = make_cfg(
        "experiment=none",
        "data=captions",
        "model=visual_bert_tiny",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=3",
        "test=false",
        "data.batch_size=8",
        "data.batch_size_per_device=8",
    )
    train(cfg)
    per_step: dict[int, list[str]] = {}
    for step, name in calls:
        per_step.setdefault(step, []).append(name)
    rows = [r for r in _csv_rows(Path(cfg.paths.output_dir)) if r.get("train/loss")]
    written = {int(r["step"]) for r in rows}
    heads = sorted({name for _, name in calls if name.endswith("_loss") and name != "train/loss"})
    assert len(heads) >= 2, heads  # a multi-objective run: mlm + itm (+ region terms)
    for step in range(12):
        names = [n for n in per_step.get(step, []) if n.endswith("loss")]
        if step in written:  # the loggers write after this step: every term, as before
            assert sorted(names) == sorted(["train/loss", *heads]), (step, names)
        else:
            assert names == ["train/loss"], (step, names)
    assert written == {2, 5, 8, 11}, written  # log_every_n_steps=3
    for r in rows:  # what the loggers got: each term at every written step
        assert all(r.get(h) not in (None, "") for h in heads), r
    accs = [r for r in _csv_rows(Path(cfg.paths.output_dir)) if r.get("train/itm_acc")]
    assert [int(r["epoch"]) for r in accs] == [0, 1] and all(0 <= float(r["train/itm_acc"]) <= 1 for r in accs)


def test_lightning_lines_reach_the_log_once_and_without_its_adverts() -> None:
    """Under Hydra the root logger prints each line (console + <task>.log); the `lightning` package adds its own
    console handler on import ("INFO: ..."), so every Lightning line printed twice, and Lightning advertised its cloud
    loggers ("💡 Tip: ... litlogger") at every fit."""
    import io
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from vl.pipeline import _single_log_lines

    package = logging.getLogger("lightning")
    second = logging.StreamHandler(io.StringIO())  # the one `import lightning` adds (an earlier train() removed it)
    package.addHandler(second)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    root, keep = logging.getLogger(), Keep()
    root.addHandler(keep)
    try:
        _single_log_lines()
        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        assert second.stream.getvalue() == ""  # type: ignore[attr-defined]
        assert lines == ["GPU available: False, used: False"]
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            assert not [h for h in logging.getLogger(name).handlers if type(h) is logging.StreamHandler], name
    finally:
        root.removeHandler(keep)
        package.removeHandler(second)


def test_a_run_resumed_in_its_own_dir_continues_its_wandb_run(make_cfg, monkeypatch, tmp_path: Path) -> None:
    """Killed and resumed in place (`ckpt_path=` under the run dir, as `resume=` and a requeued job do): the second
    process logs to the same W&B run id (before: a new run per restart); resumed into a new dir: a new run."""
    pytest.importorskip("wandb")
    from vl.run_loggers import wandb_run_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    base = (*FAST, "logger=wandb", "test=false", "trainer.max_epochs=2")
    kill = ("+callbacks.kill._target_=tests.conftest.InterruptAt", "+callbacks.kill.epoch=1", "+callbacks.kill.batch=0")
    first = make_cfg(*base, *kill, name="run")
    with pytest.raises(Exception, match="interrupted before epoch 1"):
        train(first)
    run = Path(first.paths.output_dir)
    (started,) = run.glob("wandb/offline-run-*")
    run_id = wandb_run_id(started)
    train(make_cfg(*base, f"ckpt_path={run}/checkpoints/last.ckpt", name="run"))
    ids = [wandb_run_id(p) for p in run.glob("wandb/offline-run-*")]
    assert len(ids) == 2 and set(ids) == {run_id}, ids
    elsewhere = make_cfg(*base, f"ckpt_path={run}/checkpoints/last.ckpt", name="elsewhere")
    train(elsewhere)
    (other,) = Path(elsewhere.paths.output_dir).glob("wandb/offline-run-*")
    assert wandb_run_id(other) != run_id


def test_earlier_wandb_run_reads_the_latest_run_or_the_newest_dir(tmp_path: Path) -> None:
    from vl.run_loggers import earlier_wandb_run

    assert earlier_wandb_run(tmp_path) is None
    root = tmp_path / "wandb"
    for name in ("run-20261201_100000-aaaa1111", "offline-run-20261202_090000-bbbb2222"):
        (root / name).mkdir(parents=True)
    assert earlier_wandb_run(tmp_path) == "bbbb2222"  # newest by its start time
    (root / "offline-run-20261202_090000-bbbb2222-1").mkdir()  # the same id restarted within the same second
    (root / "offline-run-20261202_090000-bbbb2222-1" / "run-bbbb2222.wandb").write_bytes(b"")
    assert earlier_wandb_run(tmp_path) == "bbbb2222"
    (root / "latest-run").symlink_to(root / "run-20261201_100000-aaaa1111")
    assert earlier_wandb_run(tmp_path) == "aaaa1111"  # what wandb itself marks as the latest
