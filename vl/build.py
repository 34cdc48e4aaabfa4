"""Building the run's objects from a composed config: the data module (files checked, no compute), the system
(with the data's objectives and corpus facts), and a trained run's saved config. Shared by the pipeline and the
evaluation tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from vl.config import (
    CorpusConfig,
    OptimizerConfig,
    TrainerConfig,
    accepts_any_keyword,
    instantiate_node,
    register_resolvers,
    schema_from_signature,
    signature_parameters,
)
from vl.data.captions import CaptionsDataModule
from vl.data.clip_vil import ClipVilPretrainDataModule, ClipVilVQADataModule
from vl.data.custom import CustomDataModule
from vl.data.lxmert_text import LxmertTextDataModule
from vl.data.multi30k import Multi30kDataModule
from vl.data.refcoco import RefCOCODataModule
from vl.data.retrieval import RetrievalDataModule
from vl.data.vcr import VCRDataModule
from vl.data.vg_bert import VGBertCocoDataModule, VGBertVGDataModule
from vl.data.vlp import VLPDataModule
from vl.data.vqa import VQADataModule
from vl.errors import ConfigError
from vl.models.bert_backbone import build_bert
from vl.models.clip_bert import ClipBertEncoder, ClipBertSystem
from vl.models.clip_vil import ClipVilEncoder, ClipVilSystem
from vl.models.mm_bert import MMBertEncoder, MMBertSystem
from vl.models.single_stream import SingleStreamEncoder
from vl.models.system import VLSystem
from vl.models.vg_bert import VGBertEncoder, VGBertSystem
from vl.models.vilbert import VilbertEncoder, VilbertSystem
from vl.models.visual_bert import VisualBertEncoder, VisualBertSystem

__all__ = [
    "instantiate_node",
    "build_datamodule",
    "check_arguments",
    "build_model",
    "model_from_checkpoint",
    "load_run_config",
    "stage_config",
    "model_schema",
    "data_schema",
    "register_configs",
    "schemas",
]

#: `schema/model/<name>`: (system class, encoder class); `conf/model/<name>.yaml` starts from it
MODELS: dict[str, tuple[type, type]] = {
    "visual_bert": (VisualBertSystem, VisualBertEncoder),
    "single_stream": (VLSystem, SingleStreamEncoder),
    "vilbert": (VilbertSystem, VilbertEncoder),
    "clip_bert": (ClipBertSystem, ClipBertEncoder),
    "mm_bert": (MMBertSystem, MMBertEncoder),
    "clip_vil": (ClipVilSystem, ClipVilEncoder),
    "vg_bert": (VGBertSystem, VGBertEncoder),
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
    "custom": CustomDataModule,
    "multi30k": Multi30kDataModule,
    "clip_vil_pretrain": ClipVilPretrainDataModule,
    "clip_vil_vqa": ClipVilVQADataModule,
    "vg_bert_coco": VGBertCocoDataModule,
    "vg_bert_vg": VGBertVGDataModule,
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


def schemas() -> dict[tuple[str, str], type]:
    """{(ConfigStore group, name): schema dataclass} of the models, corpora and the trainer."""
    out: dict[tuple[str, str], type] = {}
    for name, (system, encoder) in MODELS.items():
        out["schema/model", name] = model_schema(system, encoder, f"{name}_model")
    for name, datamodule in DATA.items():
        out["schema/data", name] = data_schema(datamodule, f"{name}_data")
    out["schema/trainer", "trainer"] = TrainerConfig
    return out


def register_configs() -> None:
    """Put the schemas, generated from the constructors, in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for (group, name), node in schemas().items():
        cs.store(group=group, name=name, node=node)


#: Hydra's own keys of an instantiable node
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
#: what `build_model` / the system pass themselves (never in the config)
_PASSED = {"objectives", "data_info"}


def check_arguments(node: Any, key: str) -> None:
    """Every key of an instantiable config node (`model`, `model.encoder`, `data`) must be an argument of its
    `_target_`: one `ConfigError` naming the key (and the nearest argument) before data or a model is built. This
    covers classes with no registered schema, such as an architecture outside `vl` (`tests/plugins/`); a target
    that takes arbitrary `**kwargs` is not checked."""
    import difflib

    from hydra.utils import get_object

    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    try:
        target = get_object(str(node._target_))
    except Exception as err:  # noqa: BLE001 - Hydra raises several kinds; all mean the same to the user
        raise ConfigError(f"{key}._target_: cannot import '{node._target_}' ({type(err).__name__})") from None
    if callable(target) and not accepts_any_keyword(target):
        allowed = set(signature_parameters(target)) - _PASSED
        for name in node:
            if name not in allowed and name not in _HYDRA_KEYS and name not in _PASSED:
                near = difflib.get_close_matches(str(name), sorted(allowed), n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else f"; it takes: {', '.join(sorted(allowed))}"
                raise ConfigError(f"{key}.{name}: not an argument of {node._target_}{hint}")
    encoder = node.get("encoder") if key.endswith("model") else None
    if isinstance(encoder, DictConfig):
        check_arguments(encoder, f"{key}.encoder")


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


def model_from_checkpoint(run_cfg: DictConfig, ckpt: dict[str, Any], path: str | Path) -> L.LightningModule:
    """The system the checkpoint holds, built from its config and saved hyper-parameters (objectives, corpus facts:
    no data file is read) with the weights loaded strictly; nothing from `init_from` / `state_dict_path` is re-read."""
    hparams = ckpt.get("hyper_parameters") or {}
    if "objectives" not in hparams or "data_info" not in hparams:
        raise ConfigError(f"ckpt_path: '{path}' has no saved objectives / data_info hyper-parameters")
    model_cfg = OmegaConf.to_container(run_cfg.model, resolve=True)
    assert isinstance(model_cfg, dict)
    for key in ("init_from", "state_dict_path"):
        if key in model_cfg:
            model_cfg[key] = None
    model = instantiate_node(model_cfg, objectives=list(hparams["objectives"]), data_info=dict(hparams["data_info"]))
    from vl.checkpoint import check_architecture

    check_architecture(ckpt, model, path)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model


def stage_config(cfg: DictConfig, stage: DictConfig, output_dir: Path) -> DictConfig:
    """The pretrain stage's config: the main config with `data` and trainer overrides swapped in."""
    stage_cfg = cfg.copy()
    with open_dict(stage_cfg):
        stage_cfg.data = stage.data
        # `every_stage_trainer` (set by the debug presets) overrides each stage's own trainer settings too
        stage_cfg.trainer = OmegaConf.merge(
            cfg.trainer, stage.get("trainer") or {}, cfg.get("every_stage_trainer") or {}
        )
        if stage.get("model"):
            stage_cfg.model = OmegaConf.merge(cfg.model, stage.model)
        stage_cfg.paths.output_dir = str(output_dir)
        stage_cfg.ckpt_path = None
        stage_cfg.pretrain = None
    return stage_cfg


def load_run_config(ckpt_path: str | Path, checkpoint: dict[str, Any] | None = None) -> tuple[DictConfig, Path]:
    """The config that built the model in `ckpt_path`: the resolved stage config stored in the checkpoint itself
    (`checkpoint`, when given and written by a vl that stores it), else the saved `.hydra/config.yaml` of the run that
    wrote it (…/<run>/checkpoints/x.ckpt). Returns (config, the stage dir above `checkpoints/`)."""
    from vl.checkpoint import run_record

    ckpt = Path(ckpt_path).expanduser()
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path: '{ckpt}' does not exist")
    record = run_record(checkpoint, ckpt) if checkpoint is not None else None
    if record is not None:
        return _without_streaming(OmegaConf.create(record["config"])), ckpt.parent.parent
    for run_dir in (ckpt.parent.parent, ckpt.parent.parent.parent):
        saved = run_dir / ".hydra" / "config.yaml"
        if saved.is_file():
            return _without_streaming(OmegaConf.load(saved)), ckpt.parent.parent  # type: ignore[arg-type]
    raise ConfigError(f"ckpt_path: no .hydra/config.yaml in the run dir above '{ckpt}'")


def _without_streaming(cfg: DictConfig) -> DictConfig:
    """A run config for evaluation: `data.streaming` off (only the training split streams; val / test and the corpus
    facts come from the local corpus), so a run trained from shards evaluates without them."""
    for node in (cfg.get("data"), (cfg.get("pretrain") or {}).get("data")):
        if isinstance(node, DictConfig) and node.get("streaming"):
            node.streaming = False
    return cfg


register_configs()
register_resolvers()
