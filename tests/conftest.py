"""Shared fixtures: compose configs the way `train.py` does, with tiny models and a small embedded corpus."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import vl.pipeline  # noqa: F401
from vl.compose import register

register(use_cache=False)  # schemas + resolvers, as train.py registers them (generated: tests need the classes anyway)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
#: the shared real sample files (`VL_REAL_SAMPLES`, default `../shared/real_samples`); absent on a plain clone
REAL_SAMPLES = Path(os.environ.get("VL_REAL_SAMPLES") or ROOT.parent / "shared" / "real_samples")


def real_sample(*parts: str) -> Path:
    """`REAL_SAMPLES/<parts>`; skips the calling test, naming the path, when the file is absent."""
    path = REAL_SAMPLES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real sample {path} not found (set VL_REAL_SAMPLES to the shared real_samples dir)")
    return path


#: a model small enough for many CPU fits per test session
TINY_MODEL = (
    "model.encoder.text_encoder.hidden_size=32",
    "model.encoder.text_encoder.num_heads=2",
    "model.encoder.text_encoder.intermediate_size=64",
    "model.encoder.text_encoder.num_layers=1",
)
TINY_CORPUS_IMAGES = 150


class StopAtEpoch(L.Callback):
    """Simulates an interrupted run: stop (after checkpointing) once `epochs` epochs are done."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class Interrupted(RuntimeError):
    """Raised by `InterruptAt`: a simulated kill (nothing is saved on the way out)."""


class InterruptAt(L.Callback):
    """Simulates a kill mid-epoch: raise before micro-batch `batch` of epoch `epoch` runs."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Interrupted(f"interrupted before epoch {self.epoch} batch {self.batch}")


class RecordLosses(L.Callback):
    """Appends `epoch batch_idx loss example-indices` (loss as repr: exact) of every training micro-batch to `<path>.rank<r>`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            ids = ",".join(str(int(i)) for i in batch["index"]) if "index" in batch else "-"
            f.write(f"{trainer.current_epoch} {batch_idx} {loss!r} {ids}\n")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, f"{self.path}.weights.pt")


def read_losses(path: Path | str, rank: int = 0) -> dict[tuple[int, int], float]:
    """What `RecordLosses` wrote: {(epoch, batch_idx): loss}."""
    out: dict[tuple[int, int], float] = {}
    file = Path(f"{path}.rank{rank}")
    if file.is_file():
        for line in file.read_text().splitlines():
            epoch, batch, loss, _ = line.split()
            out[(int(epoch), int(batch))] = float(loss)
    return out


def compose_cfg(
    overrides: Sequence[str] = (),
    *,
    output_dir: Path,
    data_dir: Path,
    config_name: str = "train",
    tiny: bool = True,
) -> DictConfig:
    """Compose `conf/<config_name>.yaml` like the CLI, point paths at tmp dirs, make `${hydra:...}` resolvable."""
    GlobalHydra.instance().clear()
    extra: list[str] = []
    if tiny and config_name == "train":
        extra.append("trainer.enable_model_summary=false")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name, overrides=extra + list(overrides), return_hydra_config=True)
        chosen = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), None)
        if (
            tiny
            and config_name == "train"
            and cfg.model.encoder._target_.endswith("SingleStreamEncoder")
            and chosen in (None, "single_stream")
        ):
            cfg = compose(config_name, overrides=extra + list(TINY_MODEL) + list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(data_dir)
        if tiny and config_name == "train":
            if cfg.get("callbacks"):
                cfg.callbacks.pop("rich_progress_bar", None)  # plain logs in tests
            explicit = any("corpus.num_images" in o for o in overrides)
            for node in (cfg.data, (cfg.get("pretrain") or {}).get("data")):
                if node is not None and not explicit:
                    node.corpus.num_images = TINY_CORPUS_IMAGES
    return cfg


def save_run_config(cfg: DictConfig) -> None:
    """What Hydra writes for a CLI run (`<run>/.hydra/config.yaml`), so `evaluate` can find it."""
    out = Path(cfg.paths.output_dir) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(plain, out / "config.yaml")


def trained_run(overrides: Sequence[str], *, output_dir: Path, data_dir: Path) -> tuple[DictConfig, dict[str, float]]:
    """A run to evaluate: composed as `compose_cfg` does, fitted, its config saved where `evaluate` finds it;
    returns (config, the fit's metrics)."""
    from vl.pipeline import train

    cfg = compose_cfg(overrides, output_dir=output_dir, data_dir=data_dir)
    metrics, _ = train(cfg)
    save_run_config(cfg)
    return cfg, metrics


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded-corpus cache for the whole session."""
    return tmp_path_factory.mktemp("vl-data")


@pytest.fixture
def make_cfg(tmp_path: Path, data_dir: Path) -> Callable[..., DictConfig]:
    def factory(*overrides: str, name: str = "run", **kwargs) -> DictConfig:
        return compose_cfg(overrides, output_dir=tmp_path / name, data_dir=data_dir, **kwargs)

    return factory
