"""Structured-config schemas (validated at compose time) and OmegaConf resolvers.

YAML files in `conf/model`, `conf/data`, `conf/trainer` start with `defaults: [/schema/<group>/<name>@_here_, _self_]`,
so an unknown key or a wrong type fails while Hydra composes, naming the full key.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


# ---------------------------------------------------------------------------------------------------- model
@dataclass
class TextEncoderConfig:
    """BERT sizes (random init), or `pretrained`: a local HF dir / "minilm" (then the sizes come from its config)."""

    pretrained: Optional[str] = None
    vocab_size: int = 30522
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    initializer_range: float = 0.02  # std of the random init (larger = shorter plateaus for tiny models)
    add_pooling_layer: bool = True


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class ModelConfig:
    _target_: str = MISSING
    _recursive_: bool = False  # optimizer/scheduler are instantiated in configure_optimizers
    _convert_: str = "all"  # plain dicts in, so checkpoints hold no OmegaConf objects
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: Optional[dict[str, Any]] = None
    loss_weights: dict[str, float] = field(default_factory=dict)
    init_from: Optional[str] = None
    pretrained_lr_mult: float = 1.0
    heads: dict[str, Any] = field(default_factory=dict)  # per-head options, e.g. {vqa: {classifier: simple}}
    head_lr: Optional[float] = None  # lr of the task heads (objectives.*); null = optimizer.lr


@dataclass
class SingleStreamModelConfig(ModelConfig):
    """The VisualBERT-style single-stream encoder (vl/models/single_stream.py)."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    pooling: str = "cls"  # "cls": BERT pooler on [CLS]; "mean": masked mean of all states


@dataclass
class VisualBertModelConfig(ModelConfig):
    """The published VisualBERT (vl/models/visual_bert.py, `transformers.VisualBertModel` layout); a VisualBERT or BERT
    dir in `text_encoder.pretrained` loads its weights."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass
class VilbertModelConfig(ModelConfig):
    """ViLBERT (vl/models/vilbert.py): BERT text stream + vision stream + co-attention layers."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    v_hidden: int = 1024
    v_num_layers: int = 6
    v_heads: int = 8
    v_intermediate: int = 1024
    bi_hidden: int = 1024
    bi_heads: int = 8
    # co-attention layer k runs before text layer t_biattention_id[k] and vision layer v_biattention_id[k] (as upstream)
    v_biattention_id: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    t_biattention_id: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    dropout: float = 0.1  # vision stream and co-attention layers (the text stream uses text_encoder.dropout)
    pretrained_lr_mult: float = 0.1
    state_dict_path: Optional[str] = None  # a released vilbert-multi-task / vilbert_beta checkpoint (key-mapped)


# ---------------------------------------------------------------------------------------------------- data
def _corpus_schema() -> type:
    """A mutable schema with exactly the fields and types of `vl.data.scenes.SceneSettings`."""
    from vl.data.scenes import SceneSettings

    hints = typing.get_type_hints(SceneSettings)
    fields = [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(SceneSettings)]
    return dataclasses.make_dataclass("CorpusConfig", fields)


CorpusConfig = _corpus_schema()


@dataclass
class DataConfig:
    _target_: str = MISSING
    root: Optional[str] = None
    cache_dir: str = "data"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # type: ignore[valid-type]
    objectives: list[str] = field(default_factory=list)
    tokenizer: str = "minilm"
    batch_size: int = 64
    batch_size_per_device: Optional[int] = None
    num_workers: int = 0
    max_text_len: int = 32
    max_regions: int = 36
    mlm_probability: float = 0.15
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    pin_memory: bool = False


@dataclass
class CaptionsDataConfig(DataConfig):
    captions: str = "annotations/captions_{split}.json"
    features: str = "regions.lmdb"


@dataclass
class VQADataConfig(DataConfig):
    questions: str = "vqa/v2_OpenEnded_mscoco_{split}2014_questions.json"
    targets: str = "vqa/cache/{split}_target.pkl"
    answers: str = "vqa/cache/trainval_ans2label.pkl"
    features: str = "regions.lmdb"


@dataclass
class VCRDataConfig(DataConfig):
    jsonl: str = "vcr/{split}.jsonl"
    images_dir: str = "vcr/vcr1images"
    names_table: str = "vcr/unisex_names_table.csv"
    features: str = "vcr/regions.lmdb"
    gt_features: Optional[str] = None  # GT-box regions merged after the detections (ViLBERT upstream); null: dets only


@dataclass
class RefCOCODataConfig(DataConfig):
    refs: str = "refcoco+/refs(unc).p"
    instances: str = "refcoco+/instances.json"
    features: str = "refcoco+/dets.lmdb"
    gt_features: Optional[str] = "refcoco+/gt.lmdb"  # null: train on detections only
    iou_threshold: float = 0.5
    iou_plus_one: bool = True  # ViLBERT's pixel-inclusive IoU (w = x2 - x1 + 1); false: continuous boxes


@dataclass
class RetrievalDataConfig(DataConfig):
    jsonl: str = "retrieval/{split}.jsonl"
    hard_negatives: Optional[str] = "retrieval/hard_negative.pkl"  # null: random hard negatives
    features: str = "regions.lmdb"
    captions_per_image: int = 5  # val/test queries per image
    max_images: Optional[int] = None  # val/test gallery size (1000 for the Flickr30k 1k test)


# ---------------------------------------------------------------------------------------------------- clip_bert / vlp
@dataclass
class ClipBertModelConfig(ModelConfig):
    """CLIP-BERT / BERT baselines (vl/models/clip_bert.py). `state_dict_path`: a whole-model state dict (DeepSpeed
    `{"module": ...}`, `BertForMaskedLM`, or this class's), loaded non-strictly with the key report logged."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image_dim: Optional[int] = None  # None: the data's CLIP dim (info["clip_dim"]), else 512
    use_image: bool = True  # false: ignore clip_feats (model=bert: the text-only baselines)
    state_dict_path: Optional[str] = None


@dataclass
class VLPDataConfig(DataConfig):
    jsonl: str = "vlp/{split}.jsonl"
    features: str = "clip_features.hdf5"
    text_only: bool = False  # the text-only baseline corpus: no image features at all
    feature_dtype: str = "float32"  # or "float16" (the original loader's dtype)


@dataclass
class LxmertTextDataConfig(DataConfig):
    jsonl: str = "lxmert_text/{split}.jsonl"


# ---------------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    """The `lightning.pytorch.Trainer` arguments `vl` uses (unions typed `Any`)."""

    _target_: str = "lightning.pytorch.Trainer"
    default_root_dir: Optional[str] = None
    accelerator: str = "cpu"
    strategy: Any = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: Any = "32-true"
    min_epochs: Optional[int] = None
    max_epochs: Optional[int] = None
    max_steps: int = -1
    val_check_interval: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = None
    deterministic: Any = False
    benchmark: Optional[bool] = None
    fast_dev_run: Any = False
    overfit_batches: Any = 0.0
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: Optional[int] = None
    profiler: Any = None
    detect_anomaly: bool = False
    enable_progress_bar: Optional[bool] = None
    enable_model_summary: Optional[bool] = None
    sync_batchnorm: bool = False
    use_distributed_sampler: bool = True
    reload_dataloaders_every_n_epochs: int = 0


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(group="schema/model", name="visual_bert", node=VisualBertModelConfig)
    cs.store(group="schema/model", name="single_stream", node=SingleStreamModelConfig)
    cs.store(group="schema/model", name="vilbert", node=VilbertModelConfig)
    cs.store(group="schema/data", name="captions", node=CaptionsDataConfig)
    cs.store(group="schema/data", name="vqa", node=VQADataConfig)
    cs.store(group="schema/data", name="vcr", node=VCRDataConfig)
    cs.store(group="schema/data", name="refcoco", node=RefCOCODataConfig)
    cs.store(group="schema/data", name="retrieval", node=RetrievalDataConfig)
    cs.store(group="schema/trainer", name="trainer", node=TrainerConfig)
    cs.store(group="schema/model", name="clip_bert", node=ClipBertModelConfig)
    cs.store(group="schema/data", name="vlp", node=VLPDataConfig)
    cs.store(group="schema/data", name="lxmert_text", node=LxmertTextDataConfig)


# ---------------------------------------------------------------------------------------------------- range checks
#: (key, minimum, also allowed): counts that Hydra's types cannot bound; `None` is allowed where the schema says so
_DATA_COUNTS = (("batch_size", 1, ()), ("batch_size_per_device", 1, ()), ("num_workers", 0, ()))
_TRAINER_COUNTS = (
    ("max_epochs", 1, (-1,)),  # -1: unlimited (Lightning)
    ("min_epochs", 0, ()),
    ("max_steps", 1, (-1,)),  # -1: unlimited
    ("min_steps", 0, ()),
    ("accumulate_grad_batches", 1, ()),
    ("check_val_every_n_epoch", 1, ()),
    ("log_every_n_steps", 1, ()),
    ("num_nodes", 1, ()),
)
_FRACTION_OR_COUNT = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "overfit_batches")


def _bad(key: str, value: Any, expected: str) -> None:
    from vl.errors import ConfigError

    raise ConfigError(f"{key}={value}: {expected}")


def _check_count(key: str, value: Any, minimum: int, allowed: tuple[Any, ...]) -> None:
    if value is None or value in allowed and not isinstance(value, bool):
        return
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = f" (or {', '.join(map(str, allowed))})" if allowed else ""
        _bad(key, value, f"must be an integer >= {minimum}{extra}")


def check_config(cfg: Any) -> None:
    """Range checks on a composed train/evaluate config (batch sizes, accumulation, epochs, steps, limits), for the
    main and the pretrain stage: one ConfigError naming the key, before any data or model is built."""
    stages = [("", cfg)]
    if cfg.get("pretrain"):
        stages.append(("pretrain.", cfg.pretrain))
    for prefix, node in stages:
        data = node.get("data") or {}
        for key, minimum, allowed in _DATA_COUNTS:
            if key in data:
                _check_count(f"{prefix}data.{key}", data.get(key), minimum, allowed)
        trainer = node.get("trainer") or {}
        for key, minimum, allowed in _TRAINER_COUNTS:
            if key in trainer:
                _check_count(f"{prefix}trainer.{key}", trainer.get(key), minimum, allowed)
        for key in _FRACTION_OR_COUNT:
            value = trainer.get(key)
            if value is None or isinstance(value, bool):
                continue
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                _bad(f"{prefix}trainer.{key}", value, "must be a fraction in [0, 1] or a batch count >= 0")
            if isinstance(value, int) and value < 0:
                _bad(f"{prefix}trainer.{key}", value, "must be a fraction in [0, 1] or a batch count >= 0")
        interval = trainer.get("val_check_interval")
        if isinstance(interval, float) and not 0.0 < interval <= 1.0 or isinstance(interval, int) and interval < 1:
            _bad(f"{prefix}trainer.val_check_interval", interval, "must be a fraction in (0, 1] or a step count >= 1")


def _sweep_group(default: str) -> str:
    """W&B group: the multirun's sweep dir name, else `default`."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"{default}-{hc.sweep.dir.rstrip('/').split('/')[-1]}"
    except ValueError:
        pass
    return default


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("vl_sweep_group"):
        OmegaConf.register_new_resolver("vl_sweep_group", _sweep_group)
    if not OmegaConf.has_resolver("vl_cwd"):
        # like ${hydra:runtime.cwd}, but also resolvable where HydraConfig is not set yet (sweepers' launch)
        OmegaConf.register_new_resolver("vl_cwd", os.getcwd)


register_configs()
register_resolvers()
