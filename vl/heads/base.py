"""What a head is: a self-describing `nn.Module` on an `EncoderOutput`, registered by name, built from config.

A head (objective) declares
  - `name`: the objective name a corpus lists in `data.objectives` (and the key of its options in `model.heads`);
  - `needs`: what it reads from the encoder: "text" (token states + word embeddings), "regions" (per-region states),
    "image" (it is meaningless unless the encoder sees an image);
  - `requires`: the batch keys it consumes (a batch without them skips the head: e.g. unlabelled test rows);
  - `build(ctx, **options)`: how it is made from the encoder's sizes and the corpus facts (`HeadContext`).
Subclassing `Objective` with a `name` registers the head; `build_heads` makes them with one registry lookup (or the
class named by `model.heads.<name>._target_`, for heads defined outside `vl`). Heads never know which architecture
produced the states.

Label conventions (one, internally): `mlm_labels` use ignore index -100; `itm_labels` 1 = aligned, 0 = not aligned
(ViLBERT's "0 = aligned" is converted where its checkpoints/data are read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import Metric

from vl.batch import IGNORE_INDEX, EncoderOutput
from vl.errors import ConfigError
from vl.metrics import Accuracy

__all__ = [
    "IGNORE_INDEX",
    "EncoderOutput",
    "ObjectiveResult",
    "Objective",
    "HeadContext",
    "HEADS",
    "VISUAL_INPUTS",
    "build_heads",
    "check_compatible",
]

#: what an encoder sees of the image with the chosen data: per-region states, one global embedding, or nothing
VISUAL_INPUTS = ("regions", "global", None)


@dataclass
class ObjectiveResult:
    loss: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor


@dataclass
class HeadContext:
    """What a head is built from. `pooled_size`: the size of `EncoderOutput.pooled`; `text_size` / `visual_size`
    those of `.text` / `.visual` (they differ in two-stream models); `word_embeddings`: the encoder's (tied MLM
    decoder); `data_info`: corpus facts (`num_answers`, `num_region_classes`, `visual_dim`, ...)."""

    pooled_size: int
    text_size: int
    visual_size: int
    word_embeddings: nn.Embedding | None = None
    data_info: dict[str, Any] = field(default_factory=dict)


#: every registered head class by objective name (filled by `Objective.__init_subclass__`)
HEADS: dict[str, type[Objective]] = {}


class Objective(nn.Module):
    """Base head: `forward(out, batch) -> ObjectiveResult`; `make_metrics()` -> {name: Metric}; `update_metrics`;
    `predictions` (rows of the task's submission file)."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and "name" in cls.__dict__:
            taken = HEADS.get(cls.name)
            same = taken is not None and (taken.__module__, taken.__qualname__) == (cls.__module__, cls.__qualname__)
            if taken is not None and not same:  # a re-imported module (same class path) may register again
                raise TypeError(
                    f"objective name '{cls.name}' of {cls.__module__}.{cls.__qualname__} is already taken by "
                    f"{taken.__module__}.{taken.__qualname__}; give the new head another `name`"
                )
            HEADS[cls.name] = cls

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> Objective:
        """Default: a head on the pooled vector, `cls(hidden_size=ctx.pooled_size, **options)`."""
        return cls(hidden_size=ctx.pooled_size, **options)

    def make_metrics(self) -> dict[str, Metric]:
        return {f"{self.name}_acc": Accuracy()}

    def bert_init(self, std: float = 0.02) -> None:
        """The seeds' initialisation of their heads (BERT's `init_bert_weights`, HF's `_init_weights`, VL-BERT's
        `init_weights`, applied to the whole model): every `nn.Linear` weight ~ N(0, std) and bias 0, LayerNorm
        weight 1 and bias 0; a module with its own `bert_init(std)` (a weight-normed Linear) does its part. The tied
        word embeddings of the MLM head are the encoder's and are not touched (no Embedding is)."""
        for module in self.modules():
            if module is not self and hasattr(module, "bert_init"):
                module.bert_init(std)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        metrics[f"{self.name}_acc"].update(result.logits.argmax(-1), result.target)

    def predictions(self, result: ObjectiveResult, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows for the task's submission file (test stage); each has a unique `key` (de-duplication across ranks)."""
        return []

    def unlabelled_predictions(self, out: EncoderOutput, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The same rows for a test batch without this head's `requires` (a split with no published answers, e.g.
        VQA test-dev): no loss, no metric. Default: none (such a batch skips the head)."""
        return []


def check_compatible(head: type[Objective], visual_input: str | None, system: str) -> None:
    """A head the encoder cannot serve fails here, at build time, naming the objective."""
    name = head.name
    if "regions" in head.needs and visual_input != "regions":
        raise ConfigError(
            f"data.objectives: '{name}' scores image regions, but {system} has no region states "
            f"({'one global image embedding' if visual_input else 'text only'} with this data); "
            "use a region-feature model (model=visual_bert, model=vilbert)"
        )
    if "image" in head.needs and visual_input is None:
        raise ConfigError(
            f"data.objectives: '{name}' matches text against images, but {system} sees no image "
            "with this data (text only); use a model that reads this data's visual features"
        )


def _head_class(name: str, options: dict[str, Any]) -> type[Objective]:
    if "_target_" in options:
        from hydra.utils import get_class

        cls = get_class(options.pop("_target_"))
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise ConfigError(f"model.heads.{name}._target_: {cls} is not a vl.heads.Objective")
        return cls
    if name not in HEADS:
        raise ConfigError(f"data.objectives: unknown objective '{name}'; choose from {sorted(HEADS)}")
    return HEADS[name]


def build_heads(
    names: list[str],
    ctx: HeadContext,
    *,
    visual_input: str | None,
    system: str,
    head_options: dict[str, dict[str, Any]] | None = None,
) -> nn.ModuleDict:
    """The heads of the named objectives, in order. `head_options[name]`: extra keyword arguments of a head
    (`model.heads`, e.g. the VQA classifier type; `_target_`: a head class defined outside `vl`). A head the
    encoder cannot serve (`visual_input`: "regions", "global" or None) fails before any compute."""
    head_options = dict(head_options or {})
    known = set(HEADS) | set(names)
    for unknown in sorted(set(head_options) - known):  # options of heads this data doesn't use are fine
        raise ConfigError(f"model.heads.{unknown}: unknown objective; choose from {sorted(HEADS)}")
    classes = {name: _head_class(name, dict(head_options.get(name) or {})) for name in names}
    for cls in classes.values():
        check_compatible(cls, visual_input, system)
    heads = nn.ModuleDict()
    for name, cls in classes.items():
        options = {k: v for k, v in dict(head_options.get(name) or {}).items() if k != "_target_"}
        heads[name] = cls.build(ctx, **options)
    return heads
