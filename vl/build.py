"""Building the run's objects from a composed config: the data module (files checked, no compute), the system
(with the data's objectives and corpus facts), and a trained run's saved config. Shared by the pipeline and the
evaluation tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vl.config import (
    CorpusConfig,
    OptimizerConfig,
    TrainerConfig,
    instantiate_node,
    register_resolvers,
    schema_from_signature,
)
from vl.data.captions import CaptionsDataModule
from vl.data.clip_vil import ClipVilPretrainDataModule, ClipVilVQADataModule
from vl.data.lxmert_text import LxmertTextDataModule
from vl.data.refcoco import RefCOCODataModule
from vl.data.retrieval import RetrievalDataModule
from vl.data.vcr import VCRDataModule
from vl.data.vlp import VLPDataModule
from vl.data.vqa import VQADataModule
from vl.errors import ConfigError
from vl.models.bert_backbone import build_bert
from vl.models.clip_bert import ClipBertEncoder, ClipBertSystem
from vl.models.clip_vil import ClipVilEncoder, ClipVilSystem
from vl.models.single_stream import SingleStreamEncoder
from vl.models.system import VLSystem
from vl.models.vilbert import VilbertEncoder, VilbertSystem
from vl.models.visual_bert import VisualBertEncoder, VisualBertSystem

__all__ = [
    "instantiate_node",
    "build_datamodule",
    "build_model",
    "load_run_config",
    "model_schema",
    "data_schema",
    "register_configs",
]

#: `schema/model/<name>`: (system class, encoder class); `conf/model/<name>.yaml` starts from it
MODELS: dict[str, tuple[type, type]] = {
    "visual_bert": (VisualBertSystem, VisualBertEncoder),
    "single_stream": (VLSystem, SingleStreamEncoder),
    "vilbert": (VilbertSystem, VilbertEncoder),
    "clip_bert": (ClipBertSystem, ClipBertEncoder),
    "clip_vil": (ClipVilSystem, ClipVilEncoder),
}
#: `schema/data/<name>`: the DataModule class; `conf/data/<name>.yaml` starts from it
DATA: dict[str, type] = {
    "captions": CaptionsDataModule,
    "vqa": VQADataModule,
    "vcr": VCRDataModule,
    "refcoco": RefCOCODataModule,
    "retrieval": RetrievalDataModule,
    "vlp": VLPDataModule,
    "lxmert_text": LxmertTextDataModule,
    "clip_vil_pretrain": ClipVilPretrainDataModule,
    "clip_vil_vqa": ClipVilVQADataModule,
}

#: `model.encoder.text_encoder`: the arguments of `build_bert`
TextEncoderConfig = schema_from_signature(build_bert, "TextEncoderConfig", with_target=False)


def model_schema(system: type, encoder: type, name: str) -> type:
    """`model` = the system's constructor arguments (minus what `build_model` passes: objectives, data_info) with
    `encoder` = the encoder's constructor arguments (minus `data_info`) and its `_target_`. Instantiated with
    `_recursive_: false`: the system builds its encoder (it needs the data's facts) and its optimizer."""
    enc = schema_from_signature(
        encoder, f"{name}Encoder", exclude=["data_info"], types_={"text_encoder": TextEncoderConfig}
    )
    return schema_from_signature(
        system,
        name,
        exclude=["objectives", "data_info"],
        types_={"encoder": enc, "optimizer": OptimizerConfig},
        extra={"_recursive_": (bool, False), "_convert_": (str, "all")},
    )


def data_schema(datamodule: type, name: str) -> type:
    """`data` = the DataModule's constructor arguments (its own and its base's), `corpus` typed as `CorpusConfig`."""
    return schema_from_signature(datamodule, name, types_={"corpus": CorpusConfig})


def register_configs() -> None:
    """Put the schemas, generated from the constructors, in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for name, (system, encoder) in MODELS.items():
        cs.store(group="schema/model", name=name, node=model_schema(system, encoder, f"{name}_model"))
    for name, datamodule in DATA.items():
        cs.store(group="schema/data", name=name, node=data_schema(datamodule, f"{name}_data"))
    cs.store(group="schema/trainer", name="trainer", node=TrainerConfig)


def build_datamodule(cfg: DictConfig):
    """Instantiate the data module, check its files, and return it (no compute spent yet)."""
    dm = instantiate_node(cfg.data)
    dm.prepare_data()
    return dm


def build_model(cfg: DictConfig, dm: Any, init_from: str | None = None) -> L.LightningModule:
    extra: dict[str, Any] = {"objectives": list(dm.objectives), "data_info": dm.info}
    if init_from:
        extra["init_from"] = init_from
    return instantiate_node(cfg.model, **extra)


def load_run_config(ckpt_path: str | Path) -> tuple[DictConfig, Path]:
    """The saved `.hydra/config.yaml` of the run that wrote `ckpt_path` (…/<run>/checkpoints/x.ckpt)."""
    ckpt = Path(ckpt_path).expanduser()
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path: '{ckpt}' does not exist")
    for run_dir in (ckpt.parent.parent, ckpt.parent.parent.parent):
        saved = run_dir / ".hydra" / "config.yaml"
        if saved.is_file():
            return OmegaConf.load(saved), ckpt.parent.parent  # type: ignore[return-value]
    raise ConfigError(f"ckpt_path: no .hydra/config.yaml in the run dir above '{ckpt}'")


register_configs()
register_resolvers()
