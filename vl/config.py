"""Structured-config schemas (validated at compose time) and OmegaConf resolvers.

YAML files in `conf/model`, `conf/data`, `conf/trainer`, `conf/task` start with
`defaults: [/schema/<group>/<name>@_here_, _self_]`, so an unknown key or a wrong type fails while Hydra composes,
naming the full key. A component's parameters and defaults are stated once, in its constructor's signature:
`schema_from_signature` turns that signature into the schema (registered by `vl.build.register_configs`); the YAML
files state only what differs from those defaults.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from vl.errors import VLError


# ---------------------------------------------------------------------------------------------------- generated
def _schema_type(hint: Any) -> Any:
    """A type annotation -> one OmegaConf can validate (unions other than Optional, and unknown classes, -> Any)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, float, str, bool, Any):
        return hint
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            inner = _schema_type(rest[0])
            return Optional[inner] if len(rest) < len(args) else inner
        return Any
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return list[_schema_type(inner[0])] if len(set(inner)) == 1 else list[Any]
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return dict[str, _schema_type(args[1]) if len(args) == 2 else Any]
    return Any


def _default(value: Any) -> Any:
    if value is inspect.Parameter.empty:
        return field(default=MISSING)
    if isinstance(value, list | tuple | dict):
        copy = list(value) if isinstance(value, tuple) else value
        return field(default_factory=lambda: copy.copy() if hasattr(copy, "copy") else copy)
    return field(default=value)


def accepts_any_keyword(target: Callable[..., Any]) -> bool:
    """True when `target` takes arbitrary keywords (its `**kwargs` chain ends in one that is not forwarded to a base
    constructor), so its arguments cannot be checked from the signature."""
    functions = (
        [c.__dict__["__init__"] for c in target.__mro__ if "__init__" in c.__dict__ and c is not object]
        if isinstance(target, type)
        else [target]
    )
    for fn in functions:
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
            return False
    return True


def signature_parameters(target: Callable[..., Any]) -> dict[str, tuple[Any, Any]]:
    """Keyword parameters of a function or class constructor -> {name: (annotation, default)}, following `**kwargs`
    into the base classes' constructors (a subclass that forwards `**kwargs` inherits its base's parameters)."""
    functions = (
        [c.__dict__["__init__"] for c in target.__mro__ if "__init__" in c.__dict__ and c is not object]
        if isinstance(target, type)
        else [target]
    )
    params: dict[str, tuple[Any, Any]] = {}
    for fn in functions:
        hints = typing.get_type_hints(fn)
        more = False
        for p in inspect.signature(fn).parameters.values():
            if p.name == "self" or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                more = True
                continue
            params.setdefault(p.name, (hints.get(p.name, Any), p.default))
        if not more:
            break
    return params


def schema_from_signature(
    target: Callable[..., Any],
    name: str,
    *,
    exclude: Iterable[str] = (),
    types_: dict[str, Any] | None = None,
    extra: dict[str, tuple[Any, Any]] | None = None,
    with_target: bool = True,
) -> type:
    """A dataclass schema with one field per keyword parameter of `target` (type from its annotation, default from
    its signature; required parameters are MISSING), plus `_target_` (the dotted path of `target`). `types_`
    replaces a field's type with a nested schema (its default becomes that schema's defaults); `extra` adds fields
    (`name: (type, default)`), e.g. Hydra's `_recursive_`."""
    types_ = dict(types_ or {})
    fields: list[tuple[str, Any, Any]] = []
    if with_target:
        fields.append(("_target_", str, field(default=f"{target.__module__}.{target.__qualname__}")))
    for key, (kind, value) in (extra or {}).items():
        fields.append((key, kind, _default(value)))
    for key, (hint, default) in signature_parameters(target).items():
        if key in set(exclude):
            continue
        if key in types_:
            nested = types_[key]
            fields.append((key, nested, field(default_factory=nested)))
        else:
            kind = _schema_type(hint)
            if default is None and typing.get_origin(kind) is typing.Union and _is_mapping(typing.get_args(kind)[0]):
                # an optional mapping (`loss_weights: dict | None = None`) is an empty dict in the config, so that
                # `model.loss_weights.itm=2` can add a key from the command line (a None node cannot take one)
                default = {}
            fields.append((key, kind, _default(default)))
    return dataclasses.make_dataclass(name, fields)


def _is_mapping(kind: Any) -> bool:
    return typing.get_origin(kind) is dict


# ---------------------------------------------------------------------------------------------------- model
@dataclass
class OptimizerConfig:
    """`model.optimizer`: a `_partial_` optimizer (the system passes its parameter groups). `fused`: null = use the
    fused kernel wherever the optimizer and the parameters' device support it (torch's AdamW/Adam on CPU and CUDA);
    false = torch's default implementation; true = require it."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: Optional[bool] = None


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class CorpusConfig:
    """The embedded scene corpus (`data.corpus`): everything that determines it; its cache key is a hash of these
    fields + the generator version. `vl.data.scenes.SceneSettings` is the frozen, validated form of this schema."""

    seed: int = 0
    num_images: int = 1500
    image_size: int = 64
    max_shapes: int = 3
    region_dim: int = 2048
    clip_dim: int = 512
    num_background_regions: int = 2
    feature_noise: float = 0.1
    captions_per_image: int = 3
    questions_per_image: int = 3
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    answer_noise: float = 0.1  # probability that one annotator answer is replaced by a wrong same-type answer


# ---------------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    """The `lightning.pytorch.Trainer` arguments `vl` uses (unions typed `Any`), plus `val_every_n_steps`, vl's own
    (`vl.pipeline.build_trainer` takes it out): validate every n optimizer steps, whatever the gradient accumulation
    (Lightning's integer `val_check_interval` counts micro-batches; `max_steps`, `log_every_n_steps` and the
    checkpoints' `every_n_train_steps` count optimizer steps)."""

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
    val_every_n_steps: Optional[int] = None
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


def trainer_config(node: DictConfig) -> DictConfig:
    """`cfg.trainer` as `lightning.pytorch.Trainer` arguments (resolved): without vl's own `val_every_n_steps`
    (applied by `vl.pipeline` once the accumulation is known)."""
    args = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    with open_dict(args):
        args.pop("val_every_n_steps", None)
    return args


def instantiate_node(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, re-raising vl's own errors unwrapped (Hydra wraps them in InstantiationException)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, VLError):
            cause = cause.__cause__
        if isinstance(cause, VLError):
            raise cause from None
        raise


# ---------------------------------------------------------------------------------------------------- range checks
#: (key, minimum, also allowed): counts that Hydra's types cannot bound; `None` is allowed where the schema says so
_DATA_COUNTS = (
    ("batch_size", 1, ()),
    ("batch_size_per_device", 1, ()),
    ("num_workers", 0, ()),
    ("aspect_ratio_group_factor", 0, ()),  # the pixel corpora's aspect-ratio bins (0: by orientation)
)
_TRAINER_COUNTS = (
    ("max_epochs", 1, (-1,)),  # -1: unlimited (Lightning)
    ("min_epochs", 0, ()),
    ("max_steps", 1, (-1,)),  # -1: unlimited
    ("min_steps", 0, ()),
    ("accumulate_grad_batches", 1, ()),
    ("check_val_every_n_epoch", 1, ()),
    ("val_every_n_steps", 1, ()),
    ("log_every_n_steps", 1, ()),
    ("num_nodes", 1, ()),
)
#: `pretrain.hand_off` / `test_checkpoint`: which checkpoint of the pretrain stage initialises the main stage / the
#: test stage scores (`best.ckpt`: the monitored metric's best epoch; `last.ckpt`: the last epoch, as CLIP-ViL's seed
#: hands its last epoch on and ViLBERT's tests its last epoch)
PRETRAIN_HAND_OFF = ("best", "last")
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
        if prefix and node.get("hand_off", "best") not in PRETRAIN_HAND_OFF:
            _bad("pretrain.hand_off", node.get("hand_off"), f"must be one of {', '.join(PRETRAIN_HAND_OFF)}")
        if not prefix and node.get("test_checkpoint", "best") not in PRETRAIN_HAND_OFF:
            _bad("test_checkpoint", node.get("test_checkpoint"), f"must be one of {', '.join(PRETRAIN_HAND_OFF)}")
        if trainer.get("val_every_n_steps") is not None and trainer.get("val_check_interval") is not None:
            _bad(f"{prefix}trainer.val_every_n_steps", trainer.get("val_every_n_steps"), "set it or val_check_interval")
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


def launcher_run_name(default: str) -> str:
    """The run-dir name every rank of one launched job agrees on: `torchrun-<TORCHELASTIC_RUN_ID>` (torchrun's
    `--rdzv-id`; `--standalone` makes a unique one), else `slurm-<SLURM_JOB_ID>[_<array task>]-<step>` (all tasks of an
    `srun` step; a requeued job gets the same name and resumes there), else `default` (the start time: one process
    per run). torchrun without `--rdzv-id` ("none") falls back to the rendezvous endpoint and today's date."""
    env = os.environ
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if run_id == "none" and env.get("MASTER_PORT"):
        import datetime

        day = datetime.date.today().isoformat()
        return f"torchrun-{env.get('MASTER_ADDR', 'localhost')}-{env['MASTER_PORT']}-{day}"
    job = env.get("SLURM_JOB_ID")
    if job and env.get("SLURM_STEP_ID") is not None and int(env.get("SLURM_NTASKS", "1")) > 1:
        array = f"_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_TASK_ID") else ""
        return f"slurm-{job}{array}-{env['SLURM_STEP_ID']}"
    return default


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (torchrun's RANK, SLURM's SLURM_PROCID), 0 without one."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


#: the config groups `--help` leaves out: Hydra's own (see `--hydra-help`) and the generated schemas
_HIDDEN_GROUPS = ("hydra", "schema")


def option_table(conf_dir: str | os.PathLike[str] | None = None, width: int = 118) -> str:
    """`--help`'s list of config groups: per group of `conf_dir` (default: the repository's `conf/`), one line per
    option with its file's first comment line (the description every config file starts with)."""
    from pathlib import Path

    root = Path(conf_dir) if conf_dir else Path(__file__).resolve().parents[1] / "conf"
    lines: list[str] = []
    for group in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in _HIDDEN_GROUPS):
        options = sorted(group.rglob("*.yaml"))
        if not options:
            continue
        lines.append(f"{group.name}:")
        names = [o.relative_to(group).with_suffix("").as_posix() for o in options]
        pad = max(len(n) for n in names) + 2
        for name, path in zip(names, options):
            about = _description(path).replace("$", "$$")  # Hydra fills the help template with string.Template
            text = f"  {name.ljust(pad)}{about}"
            lines.append(text if len(text) <= width else text[: width - 3] + "...")
    return "\n".join(lines)


def _description(path: os.PathLike[str]) -> str:
    """The first line of a config file's leading comment, `# @package` directives skipped ("" without one)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            if not line.startswith("#"):
                return ""
            text = line.lstrip("#").strip()
            if text and not text.startswith("@package"):
                return text
    return ""


def _direction(mode: str) -> str:
    """Optuna's `direction` from a monitored metric's mode: `min` (a loss) -> minimize, `max` -> maximize."""
    from vl.errors import ConfigError

    if mode not in ("min", "max"):
        raise ConfigError(f"data.monitor_mode: '{mode}' is not 'min' or 'max'")
    return "minimize" if mode == "min" else "maximize"


def _or(value: Any, default: Any) -> Any:
    """`${vl_or:${x},default}`: x unless it is null or empty."""
    return default if value in (None, "") else value


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("vl_or"):
        OmegaConf.register_new_resolver("vl_or", _or)
    if not OmegaConf.has_resolver("vl_direction"):
        OmegaConf.register_new_resolver("vl_direction", _direction)
    if not OmegaConf.has_resolver("vl_sweep_group"):
        OmegaConf.register_new_resolver("vl_sweep_group", _sweep_group)
    if not OmegaConf.has_resolver("vl_run_name"):
        OmegaConf.register_new_resolver("vl_run_name", launcher_run_name)
    if not OmegaConf.has_resolver("vl_option_table"):
        OmegaConf.register_new_resolver("vl_option_table", option_table)
    if not OmegaConf.has_resolver("vl_cwd"):
        # like ${hydra:runtime.cwd}, but also resolvable where HydraConfig is not set yet (sweepers' launch)
        OmegaConf.register_new_resolver("vl_cwd", os.getcwd)


register_resolvers()
