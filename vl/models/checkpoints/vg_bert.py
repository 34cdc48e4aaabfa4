"""VG-BERT's seed checkpoints (its stage-2/3 model or its stage-1 ImageNet classifier) -> vl keys
(`vg_bert_seed_layout`, `vg_bert_seed_to_vl`), loaded into a model with the key report (`load_vg_bert_seed`)."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from vl.errors import ConfigError
from vl.pretrained import log_key_report

#: VG-BERT's seed (`yizhen-zhang/VG-Bert`), its `full_model` state-dict prefixes (after `module.`) -> vl's
VG_BERT_SEED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("image_model.image_model.", "encoder.visual.vgg.features."),
    ("image_model.embedder.", "encoder.visual.embedder."),
    ("image_model.attention.", "encoder.visual.attention."),
    ("language_model.language_model.", "encoder.bert."),
    ("image_projection_head.0.", "encoder.image_projection_head."),
    ("language_projection_head.0.", "encoder.language_projection_head."),
    ("cross_attention_model.query_language.", "encoder.cross_attention.query_language."),
    ("cross_attention_model.key_visual.", "encoder.cross_attention.key_visual."),
    ("cross_attention_model.value_visual.", "encoder.cross_attention.value_visual."),
    ("cross_attention_model.object_transform.", "objectives.vg_relational.object_transform."),
    ("cross_attention_model.relational_matrix", "objectives.vg_relational.relational_matrix"),
    ("object_classifier.", "objectives.vg_relational.object_classifier."),
)

#: the seed's `TransferCrossModalRetrieval` heads (its released `best_model.pth`, "finetuned for multimodal image
#: search"): `Sequential(Conv2d 1x1, ReLU, Dropout, Conv2d 1x1)` on the image side, the same with Linear on the language
#: side, at `.0` and `.3` -> vl's transfer head, whose image side is a Linear per cell (a 1x1 conv's weight, squeezed)
VG_BERT_TRANSFER_HEADS: tuple[tuple[str, str], ...] = (
    ("image_projection_head.", "objectives.vg_transfer.image_projection_head."),
    ("language_projection_head.", "objectives.vg_transfer.language_projection_head."),
)
_VG_BERT_TRANSFER = "image_projection_head.3."

#: the seed's stage-1 (`visual_stream_pretraining.py`, ImageNet) `VGG16_Attention_classification` /
#: `VGG16_classification` prefixes (after `module.`): features at `image_model.<index>.`, then `embedder.`, `attention.`
#: (`classifier.*`, the ImageNet classifier, maps to nothing: reported as unexpected)
VG_BERT_VG_BERT_STAGE1_PREFIXES: tuple[tuple[str, str], ...] = (
    ("image_model.", "encoder.visual.vgg.features."),
    ("embedder.", "encoder.visual.embedder."),
    ("attention.", "encoder.visual.attention."),
)
_VG_BERT_FULL_STARTS = (
    "image_model.image_model.",
    "image_model.embedder.",
    "image_model.attention.",
    "language_model.",
)
_VG_BERT_STAGE1 = re.compile(r"(image_model\.\d+|embedder|attention)\.")


def vg_bert_seed_layout(state: dict[str, Any]) -> str | None:
    """The seed's layout: "transfer" for a state dict of its `TransferCrossModalRetrieval` (two-layer projection heads:
    `image_projection_head.3.*`), "full" for its `TwoStreamPretrain` / `RelationalGrounding` (`image_model.image_model.*`,
    `language_model.*`, ...), "stage1" for its ImageNet classifier (`image_model.<i>.*`, `embedder.*`, `attention.*`;
    `classifier.*` too), None otherwise (`module.` prefixes of DataParallel allowed)."""
    keys = [str(k).removeprefix("module.") for k in state]
    if any(k.startswith(_VG_BERT_FULL_STARTS) or k.startswith("cross_attention_model.") for k in keys):
        return "transfer" if any(k.startswith(_VG_BERT_TRANSFER) for k in keys) else "full"
    if keys and any(_VG_BERT_STAGE1.match(k) for k in keys):
        return "stage1"
    return None


def vg_bert_seed_to_vl(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A state dict of the seed (`vg_bert_seed_layout`: the stage-2/3 or transfer `best_model.pth`, or the stage-1
    ImageNet model's `state_dict`; `module.` prefixes of DataParallel allowed) -> (vl keys, the seed keys that map to
    nothing, e.g. BERT's pooler or the ImageNet classifier)."""
    layout = vg_bert_seed_layout(state)
    prefixes = VG_BERT_VG_BERT_STAGE1_PREFIXES if layout == "stage1" else VG_BERT_SEED_PREFIXES
    if layout == "transfer":  # its projection heads are the transfer head's, not stage 2's
        prefixes = VG_BERT_TRANSFER_HEADS + prefixes
    out, unmapped = {}, []
    for key, value in state.items():
        k = key.removeprefix("module.")
        for seed, ours in prefixes:
            if k.startswith(seed):
                if layout == "transfer" and seed.startswith("image_projection_head") and value.ndim == 4:
                    value = value.reshape(value.shape[0], value.shape[1])  # a 1x1 conv per cell = a Linear per cell
                out[ours + k[len(seed) :]] = value
                break
        else:
            unmapped.append(key)
    return out, unmapped


def load_vg_bert_seed(model: nn.Module, state: dict[str, Any], layout: str, path: str) -> None:
    """A seed state dict (`layout`: `vg_bert_seed_layout(state)`) into `model`: its keys mapped to vl's, loaded
    non-strictly where name and shape match, the rest in the key report (BERT's pooler, the ImageNet classifier and
    other unmapped keys as unexpected); a file none of whose tensors lands in the model is a `ConfigError`."""
    own = model.state_dict()
    mapped, unmapped = vg_bert_seed_to_vl(state)
    usable = {k: v for k, v in mapped.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not usable:
        raise ConfigError(
            f"model.init_from: '{path}' (the seed's {layout} layout) loaded nothing: none of its {len(state)} "
            "keys maps to a parameter of this model with the same shape"
        )
    result = model.load_state_dict(usable, strict=False)
    unexpected = unmapped + sorted(k for k in mapped if k not in usable)
    log_key_report(f"init from the seed's ({layout}) {path}", result.missing_keys, unexpected)
