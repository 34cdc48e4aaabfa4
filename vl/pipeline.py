"""`train(cfg)` and `evaluate(cfg)`: plain functions that tests call; `train.py`/`evaluate.py` only wrap them."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vl.build import build_datamodule, build_model, load_run_config, stage_config
from vl.callbacks import MetricsLine, ValidateAtMaxSteps
from vl.checkpoint import CHECKPOINT_FORMAT, check_architecture, is_deepspeed_dir, read_checkpoint
from vl.checkpoint import run_record as run_record_of
from vl.checkpoint_io import AtomicCheckpointIO
from vl.config import check_config, launcher_rank, trainer_config
from vl.errors import ConfigError, VLError
from vl.eval.tasks import run_eval_task, task_name
from vl.preflight import (
    accumulation,
    check_devices,
    check_fresh_output,
    check_hand_off,
    check_stage_arguments,
    preflight_main_stage,
)
from vl.report import plot_curves, write_results
from vl.run_dir import is_requeued
from vl.run_loggers import (
    CSVLogger,
    command_overrides,
    finish_wandb,
    flat_config,
    log_test_metrics,
    resumes_in_place,
    stage_loggers,
)
from vl.sweep_report import METRICS_FILE

log = logging.getLogger(__name__)

# Lightning 2.6's batch-transfer helper (`lightning.pytorch.utilities._pytree`) asks torch 2.13's deprecated
# `isinstance(treespec, LeafSpec)`: a FutureWarning at every fit that no vl user can act on; only that one is silenced
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
#: the start of Lightning's warning when a Trainer without the checkpoint's callbacks loads it (ignored for the tester)
TESTER_CALLBACKS_NOTE = r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint"
#: Lightning's warning when a fit's checkpoint dir holds files (ignored when the fit resumes from one of them)
CHECKPOINT_DIR_NOTE = r"Checkpoint directory .* exists and is not empty"


def _instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a group dict (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> L.Trainer:
    """The fitting Trainer: `cfg.trainer` + the configured callbacks/loggers + what every vl fit gets: crash-safe
    checkpoint writes (`AtomicCheckpointIO`) and validation when `max_steps` ends an epoch early."""
    plugins: list[Any] = []
    if "deepspeed" not in str(cfg.trainer.get("strategy", "")).lower():  # DeepSpeed writes its own checkpoint dirs
        plugins.append(AtomicCheckpointIO())
    return instantiate(
        trainer_config(cfg.trainer),
        callbacks=[*callbacks, ValidateAtMaxSteps(), MetricsLine()],
        logger=loggers or False,
        plugins=plugins or None,
    )


def _validate_every(trainer: L.Trainer, steps: int | None) -> None:
    """`trainer.val_every_n_steps`: validation every `steps` optimizer steps = `steps` x accumulation micro-batches
    (Lightning's integer `val_check_interval` counts micro-batches), across epoch ends."""
    if steps is None:
        return
    trainer.val_check_interval = int(steps) * int(trainer.accumulate_grad_batches)
    trainer.check_val_every_n_epoch = None


def score_checkpoint(
    trainer_cfg: DictConfig, model: Any, dm: Any, ckpt: str | None, *, testing: bool = True
) -> tuple[dict[str, Any], bool]:
    """(`test` / `validate` metrics of `ckpt`, whether this process is rank 0) from a fresh Trainer without loggers,
    callbacks or checkpointing: it scores the checkpoint (test metrics go to results.md; CSVLogger cannot take new
    columns in the processes a ddp_spawn test starts). Lightning's default ModelCheckpoint would load the fit's callback
    state and warn that its dirpath changed, and its note that the callbacks which wrote the checkpoint are not given
    concerns resuming a fit, not this (filtered)."""
    scorer: L.Trainer = instantiate(trainer_config(trainer_cfg), logger=False, callbacks=[], enable_checkpointing=False)
    run = scorer.test if testing else scorer.validate
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TESTER_CALLBACKS_NOTE)
        results = run(model, datamodule=dm, ckpt_path=ckpt, weights_only=True)[0]
    return results, scorer.is_global_zero


@contextlib.contextmanager
def _own_rendezvous() -> Iterator[None]:
    """Spawned DDP (`ddp_spawn`) picks a free MASTER_PORT and leaves it in os.environ; the next run in this process
    (a multirun job, a test) would reuse that port while the old one may still be held. Restore what the user had."""
    saved = {key: os.environ.get(key) for key in ("MASTER_PORT", "MASTER_ADDR")}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _spawned_vl_error(err: BaseException) -> VLError | None:
    """A vl error raised inside a spawned DDP process reaches this one as the child's traceback text
    (`torch.multiprocessing.ProcessRaisedException`): the same error class and message, or None."""
    import re

    import vl.errors

    found = re.findall(r"^vl\.errors\.(\w+): (.*)$", str(err), flags=re.MULTILINE)
    cls = getattr(vl.errors, found[-1][0], None) if found else None
    return cls(found[-1][1]) if isinstance(cls, type) and issubclass(cls, VLError) else None


def run_record(cfg: DictConfig, dm: Any) -> dict[str, Any]:
    """What every checkpoint of this stage carries (`vl.checkpoint.RUN_KEY`) so the file alone is enough to evaluate
    and predict: the stage's resolved config (weights loaded at the start, `model.init_from` / `state_dict_path`,
    are in the state dict: cleared), the tokenizer name, the answer vocabulary, vl's version."""
    from vl._version import __version__

    stage = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        plain = OmegaConf.to_container(stage, resolve=True)
    except Exception as err:  # noqa: BLE001 - an interpolation only Hydra's runtime can resolve
        log.warning("run record: config stored unresolved (%s)", str(err).splitlines()[0])
        plain = OmegaConf.to_container(stage, resolve=False)
    assert isinstance(plain, dict)
    for key in ("init_from", "state_dict_path"):
        if isinstance(plain.get("model"), dict) and key in plain["model"]:
            plain["model"][key] = None
    plain["ckpt_path"] = None
    return {
        "format": CHECKPOINT_FORMAT,
        "vl_version": __version__,
        "config": plain,
        "tokenizer": dm.tokenizer_name,
        "answers": dm.answer_vocabulary(),
    }


def run_stage(cfg: DictConfig, name: str, init_from: str | None = None) -> tuple[dict[str, float], str | None]:
    """Fit (and test) one stage. Returns (metrics, path of the checkpoint to continue from)."""
    with _own_rendezvous():
        try:
            return _run_stage(cfg, name, init_from)
        except Exception as err:
            if type(err).__name__ == "ProcessRaisedException" and (vl_err := _spawned_vl_error(err)) is not None:
                raise vl_err from err
            raise


def _run_stage(cfg: DictConfig, name: str, init_from: str | None) -> tuple[dict[str, float], str | None]:
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("ckpt_path") is None:
        check_fresh_output(output_dir)
        resume = None
    elif is_deepspeed_dir(cfg.ckpt_path):  # hardware=deepspeed checkpoints are directories DeepSpeed loads itself
        resume = None
    else:  # a missing / damaged / foreign / code-carrying file fails here, in one line, before Lightning sees it
        resume = read_checkpoint(cfg.ckpt_path, "ckpt_path", resume=True)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm, init_from=init_from)
    if resume is not None:
        check_architecture(resume, model, cfg.ckpt_path)
        del resume
    record = run_record(cfg, dm)
    if hasattr(model, "run_record"):
        model.run_record = record
    loggers = _instantiate_dict(stage_loggers(cfg, name))
    if loggers and not any(isinstance(lg, L.pytorch.loggers.CSVLogger) for lg in loggers):  # metrics.csv, always
        loggers.append(CSVLogger(save_dir=str(output_dir), name="csv", version=""))
    in_place = resumes_in_place(cfg)
    for lg in loggers:  # a fit resumed in its own run dir keeps the earlier rows of metrics.csv
        if isinstance(lg, CSVLogger):
            lg.resumed = in_place
    trainer = build_trainer(cfg, _instantiate_dict(cfg.get("callbacks")), loggers)
    trainer.accumulate_grad_batches = accumulation(cfg, dm, trainer.world_size)
    _validate_every(trainer, cfg.trainer.get("val_every_n_steps"))
    log.info(
        "[%s] %s on %s: global batch %d = %d per device x %d devices x %d accumulation",
        name,
        type(model).__name__,
        type(dm).__name__,
        dm.batch_size,
        dm.batch_size_per_device,
        trainer.world_size,
        trainer.accumulate_grad_batches,
    )
    if trainer.world_size > 1:
        env = getattr(trainer.strategy, "cluster_environment", None)
        log.info("[%s] rank %d/%d (%s)", name, trainer.global_rank, trainer.world_size, type(env).__name__)
    params = {
        "params/total": sum(p.numel() for p in model.parameters()),
        "params/trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    for lg in loggers:  # the resolved config, flat (`model.optimizer.lr`), once; the system logs no hparams itself
        lg.log_hyperparams({**flat_config(record["config"]), **params})

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        with warnings.catch_warnings():
            if in_place:  # the run's own checkpoints are there (it is resuming from one): Lightning's note is noise
                warnings.filterwarnings("ignore", message=CHECKPOINT_DIR_NOTE)
            trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        if getattr(model, "last_train_loss", None) is not None:  # the last step's, also when it was not `self.log`ged
            metrics["train/loss"] = float(model.last_train_loss)
        for cb in trainer.checkpoint_callbacks:  # the monitored metric's best value (what sweeps optimise)
            score = getattr(cb, "best_model_score", None)
            if getattr(cb, "monitor", None) and score is not None and torch.isfinite(torch.as_tensor(score)):
                metrics[f"{cb.monitor}_best"] = float(score)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    last = str(output_dir / "checkpoints" / "last.ckpt")
    ckpt = best or (last if Path(last).exists() else None)
    if cfg.get("test", True):
        # VQA predictions are written by the model's test hook; `test_checkpoint: last`: the final epoch's weights
        ckpt = None if trainer.fast_dev_run else ckpt
        tested = last if ckpt and cfg.get("test_checkpoint", "best") == "last" and Path(last).exists() else ckpt
        log.info("[%s] testing %s", name, tested or "the model in memory")
        test_metrics = score_checkpoint(cfg.trainer, model, dm, tested)[0]
        metrics.update({k: float(v) for k, v in test_metrics.items()})
        if trainer.is_global_zero and loggers and test_metrics:  # the test metrics in the same run as the fit's curves
            log_test_metrics(loggers, {k: float(v) for k, v in test_metrics.items()}, trainer.global_step)
        if not trainer.fast_dev_run:
            metrics.update(dm.baselines("test"))
    if trainer.is_global_zero and loggers:
        plot_curves(output_dir, title=f"{cfg.task_name} / {name}")
    return metrics, ckpt


_stage_cfg = stage_config  # the pretrain stage's config (vl/build.py)


def hand_off(pretrain: DictConfig, stage_dir: Path, best: str | None) -> str | None:
    """The pretrain stage's checkpoint the main stage starts from: `best` (what `run_stage` returns: best.ckpt, or
    last.ckpt when nothing is monitored) unless `pretrain.hand_off` is "last": `stage_dir`/checkpoints/last.ckpt
    (the `last_checkpoint` callback writes it after every epoch; `check_hand_off` asks for it before the fit). A
    stage that saved nothing (`fast_dev_run`) hands on nothing, as with `best`."""
    if pretrain.get("hand_off", "best") != "last":
        return best
    last = stage_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return str(last)
    if best is None:
        return None
    raise ConfigError(f"pretrain.hand_off=last: {last} was not written (only {best})")


class _NoAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip:" lines (install litlogger / litmodels, a cloud platform), printed at every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _single_log_lines() -> None:
    """Lightning adds its own console handlers when imported (`lightning`: "INFO: ...", and `lightning.pytorch` /
    `lightning.fabric` when no root handler exists yet); under Hydra's root handler every line would print twice.
    Lightning's tips to install its cloud loggers are dropped."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True  # Lightning turns it off where it adds its own handler
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdverts())


def resumed_config(cfg: DictConfig) -> DictConfig:
    """`resume=<run dir>`: the run's own config (stored in its `checkpoints/last.ckpt`) with this command's overrides
    applied (e.g. `trainer.max_epochs=10`; a config group choice such as `model=x` is refused: a resumed run keeps its
    architecture and data), continuing from `last.ckpt` in that same dir. Its `.hydra/config.yaml` is rewritten with
    the config the run continues with."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = Path(str(cfg.resume)).expanduser().resolve()
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(f"resume: '{run_dir}' has no checkpoints/last.ckpt to continue from")
    record = run_record_of(read_checkpoint(last, "resume", resume=True), last, "resume")
    if record is None:
        raise ConfigError(
            f"resume: '{last}' holds no run config (written by an older vl); resume it with ckpt_path=<that file> "
            "and the run's own overrides"
        )
    restored = OmegaConf.create(record["config"])
    for override in OverridesParser.create().parse_overrides(command_overrides()):
        key = override.key_or_group
        if key == "resume" or key.startswith("hydra.") or key.startswith("paths."):
            continue
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(restored, parent) if parent else restored
            if isinstance(node, DictConfig) and leaf in node:
                with open_dict(node):
                    node.pop(leaf)
            continue
        value = override.value()
        if "." not in key and isinstance(restored.get(key), DictConfig) and isinstance(value, str):
            raise ConfigError(
                f"resume: '{key}={value}' picks another config group; a resumed run keeps its own config (override "
                "keys instead, e.g. trainer.max_epochs=10)"
            )
        OmegaConf.update(restored, key, value, merge=True, force_add=True)
    with open_dict(restored):
        restored.ckpt_path = str(last)
        restored.resume = str(run_dir)
        restored.paths.output_dir = str(run_dir)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(restored, run_dir / ".hydra" / "config.yaml")
    log.info("resume: %s continues from %s", run_dir, last)
    return restored


def train(cfg: DictConfig) -> tuple[dict[str, float], float | None]:
    """Train (optionally after a pretrain stage), test, write results. Returns (metrics, optimized metric value)."""
    _single_log_lines()
    if cfg.get("resume"):
        cfg = resumed_config(cfg)
    check_config(cfg)  # batch sizes, epochs, steps >= 1: one line before anything is built or written
    check_stage_arguments(cfg)
    check_hand_off(cfg)
    check_devices(cfg)
    if cfg.get("pretrain") and cfg.get("ckpt_path") is None:
        preflight_main_stage(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, dict[str, float]]] = []
    requeued = is_requeued() and cfg.get("ckpt_path") is None
    if requeued and (output_dir / "checkpoints" / "last.ckpt").is_file():  # SLURM requeue: continue the main stage
        with open_dict(cfg):
            cfg.ckpt_path = str(output_dir / "checkpoints" / "last.ckpt")
        log.info("requeued job: resuming from %s", cfg.ckpt_path)
    failed = True
    try:
        init_from = cfg.model.get("init_from")
        if cfg.get("pretrain") and cfg.get("ckpt_path") is None:
            stage_cfg = _stage_cfg(cfg, cfg.pretrain, output_dir / "pretrain")
            if requeued and (output_dir / "pretrain" / "checkpoints" / "last.ckpt").is_file():
                with open_dict(stage_cfg):
                    stage_cfg.ckpt_path = str(output_dir / "pretrain" / "checkpoints" / "last.ckpt")
            pre_metrics, init_from = run_stage(stage_cfg, "pretrain")
            init_from = hand_off(cfg.pretrain, output_dir / "pretrain", init_from)
            rows.append(("pretrain", pre_metrics))
            finish_wandb()
            L.seed_everything(cfg.seed, workers=True)
        metrics, _ = run_stage(cfg, "finetune" if rows else "train", init_from=init_from)
        rows.append(("main" if rows else "train", metrics))
        failed = False
    finally:
        finish_wandb(exit_code=1 if failed else 0)  # a crashed job is closed as failed
    merged = {f"{stage}:{k}" if stage == "pretrain" else k: v for stage, m in rows for k, v in m.items()}
    if rows and launcher_rank() == 0:  # under torchrun / srun every rank runs train(): rank 0 writes the run dir
        write_results(output_dir, rows, title=str(cfg.task_name))
    # sweepers optimise the monitored metric's best value over the run (`<metric>_best`), else its final value
    opt = str(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None
    value = merged.get(f"{opt}_best", merged.get(opt)) if opt else None
    if value is not None and math.isnan(value):
        value = None
    if rows and launcher_rank() == 0:
        mode = str(cfg.data.get("monitor_mode", "max")) if opt == cfg.data.get("monitor") else None
        record = {"metrics": merged, "monitor": opt, "mode": mode, "value": value}
        (output_dir / METRICS_FILE).write_text(json.dumps(record, indent=1, default=float))
    return merged, value


def evaluation_data(chosen: DictConfig, run_data: DictConfig) -> DictConfig:
    """`evaluate.py data=<corpus>`: that corpus's config with the run's `tokenizer` and `objectives` (the model's
    vocabulary and heads: a checkpoint is evaluated as it was trained; its heads score the new corpus, e.g. a
    pretraining run's ITM head ranks a retrieval gallery)."""
    data = OmegaConf.create(OmegaConf.to_container(chosen, resolve=True))
    for key in ("tokenizer", "objectives"):
        if key in run_data:
            data[key] = run_data[key]
    return data


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Rebuild the model from the run's saved config, load `cfg.ckpt_path`, test, write predictions + results."""
    _single_log_lines()
    # a missing / damaged / foreign / code-carrying file fails here, in one line, before anything is built
    ckpt = read_checkpoint(cfg.ckpt_path, "ckpt_path")
    run_cfg, stage_dir = load_run_config(cfg.ckpt_path, ckpt)  # the config stored in the checkpoint, else .hydra/
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if stage_dir.name == "pretrain" and run_cfg.get("pretrain"):
        run_cfg = _stage_cfg(run_cfg, run_cfg.pretrain, output_dir)
    with open_dict(run_cfg):
        run_cfg.paths = cfg.paths
        run_cfg.trainer = OmegaConf.merge(run_cfg.trainer, cfg.get("trainer") or {})
        run_cfg.trainer.default_root_dir = str(output_dir)
        run_cfg.model.init_from = None
        if (cfg.get("data") or {}).get("_target_"):  # `data=<corpus>`: its config, the model's vocabulary and heads
            run_cfg.data = evaluation_data(cfg.data, run_cfg.data)  # (a hardware preset's data keys alone: not)
        run_cfg = OmegaConf.merge(run_cfg, cfg.get("overrides") or {})
    check_config(run_cfg)
    check_devices(run_cfg)
    L.seed_everything(cfg.seed, workers=True)
    mode = str(cfg.get("mode") or "test")
    if mode not in ("test", "predict"):
        raise ConfigError(f"mode: '{mode}' is not one of 'test', 'predict'")
    if mode == "predict":
        from vl.inference import predict

        with _own_rendezvous():  # hardware=ddp_cpu spawns the predict processes
            path = predict(cfg, run_cfg, ckpt, output_dir, run_record_of(ckpt, cfg.ckpt_path))
        log.info("predictions: %s", path)
        return {"predict/queries": float(sum(1 for _ in path.open()))}
    task = task_name(cfg.get("task"))
    if task != "test":
        del ckpt
        metrics = run_eval_task(cfg.task, cfg=cfg, run_cfg=run_cfg, output_dir=output_dir)
        write_results(output_dir, [(task, metrics)], title=f"{task} {cfg.ckpt_path}")
        return metrics
    dm = build_datamodule(run_cfg)
    model = build_model(run_cfg, dm)
    check_architecture(ckpt, model, cfg.ckpt_path)
    del ckpt
    testing = cfg.get("split", "test") != "val"
    with _own_rendezvous():
        results, is_global_zero = score_checkpoint(run_cfg.trainer, model, dm, str(cfg.ckpt_path), testing=testing)
    metrics = {k: float(v) for k, v in results.items()}
    if testing:  # the computed baselines of the split evaluated (e.g. another test split), as train's
        metrics.update(dm.baselines("test"))
    if is_global_zero:
        write_results(output_dir, [("evaluate", metrics)], title=f"evaluate {cfg.ckpt_path}")
    return metrics


__all__ = ["train", "evaluate", "build_datamodule", "build_model", "build_trainer", "load_run_config"]
