"""MM-BERT's hybrid init from an M-BERT and a VL-BERT checkpoint: the parts each one gives (`MBERT_PARTS`,
`VLBERT_PARTS`) under `MMBertSystem`'s names (`mbert_hybrid_state`, `vlbert_hybrid_state`), loaded into a model with
the key report (`load_hybrid_init`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vl.errors import ConfigError
from vl.models.checkpoints.base import read_state_dict
from vl.models.checkpoints.bert import bert_weights_file, load_mlm_head_file
from vl.pretrained import log_key_report

#: VL-BERT (``vl-bert-base-prec.model``, ``ResNetVLBERTForPretraining*``) key prefixes taken by the hybrid init
#: (after stripping ``module.``) -> vl parameter names: the seed's list (``smart_hybrid_partial_load_model_state_dict``)
#: of ``vlbert.mvrc_head`` (``transform.dense`` + act, ``region_cls_pred``; vl's ``head.0`` / ``head.2``),
#: ``image_feature_extractor`` (``obj_downsample`` = Dropout, Linear, ReLU: ``.1.`` is the Linear; the extractor's
#: other modules have no vl counterpart and are reported), ``vlbert.visual_ln*``, ``end_embedding``,
#: ``token_type_embeddings``, ``position_embeddings``, ``aux_text_visual_embedding``, ``object_mask_word_embedding``,
#: ``object_linguistic_embeddings`` (root attributes of the seed's module). ``object_mask_visual_embedding`` is not in
#: the list: it keeps its init (0), as in the seed.
VLBERT_PARTS: dict[str, str] = {
    "vlbert.mvrc_head.transform.dense.": "objectives.mvrc.head.0.",
    "vlbert.mvrc_head.region_cls_pred.": "objectives.mvrc.head.2.",
    "image_feature_extractor.obj_downsample.": "encoder.obj_downsample.",
    "vlbert.visual_ln_text.": "encoder.visual_ln_text.",
    "vlbert.visual_ln_object.": "encoder.visual_ln_object.",
    "vlbert.end_embedding.": "encoder.end_embedding.",
    "vlbert.token_type_embeddings.": "encoder.bert.embeddings.token_type_embeddings.",
    "vlbert.position_embeddings.": "encoder.bert.embeddings.position_embeddings.",
    "aux_text_visual_embedding.": "encoder.aux_text_visual_embedding.",
    "object_mask_word_embedding.": "encoder.object_mask_word_embedding.",
    "object_linguistic_embeddings.": "encoder.object_linguistic_embeddings.",
}
#: M-BERT (``BertModel`` / ``BertForPreTraining``) keys taken by the hybrid init, as the seed's
#: ``load_language_pretrained_model``: the encoder layers, the embeddings (word rows beyond M-BERT's vocabulary, e.g.
#: [STOP], and the third token type keep their init; position / token type are then overwritten by VL-BERT's when
#: a VL-BERT checkpoint is given), the embedding LayerNorm and the pooler (when the model has one)
MBERT_PARTS = (
    "encoder.",
    "embeddings.word_embeddings.",
    "embeddings.position_embeddings.",
    "embeddings.token_type_embeddings.",
    "embeddings.LayerNorm.",
    "pooler.",
)
#: M-BERT tensors whose rows fill the first rows of a larger vl tensor (vocabulary + [STOP]; 2 -> 3 token types)
_MBERT_ROW_PREFIX = ("embeddings.word_embeddings.", "embeddings.token_type_embeddings.")


def mbert_hybrid_state(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An M-BERT state dict (`bert.` prefix or none) -> (the `MBERT_PARTS` tensors under `MMBertSystem`'s names,
    the keys that map to nothing or to another shape). A tensor of `_MBERT_ROW_PREFIX` fills the first rows of a
    larger one of the model (the model's own rows beyond it kept)."""
    loaded, unexpected = {}, []
    for key, value in state.items():
        name = key[len("bert.") :] if key.startswith("bert.") else key
        target = f"encoder.bert.{name}"
        if not name.startswith(MBERT_PARTS) or target not in own:
            unexpected.append(key)
            continue
        if name.startswith(_MBERT_ROW_PREFIX) and value.shape[1:] == own[target].shape[1:]:
            if value.shape[0] <= own[target].shape[0]:
                merged = own[target].clone()
                merged[: value.shape[0]] = value
                value = merged
        if own[target].shape != value.shape:
            unexpected.append(f"{key} (shape {tuple(value.shape)} vs {tuple(own[target].shape)})")
            continue
        loaded[target] = value
    return loaded, unexpected


def vlbert_hybrid_state(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A VL-BERT checkpoint's state dict (`module.` prefixes allowed) -> (the `VLBERT_PARTS` tensors under
    `MMBertSystem`'s names, the keys that map to nothing or to another shape)."""
    loaded, unexpected = {}, []
    for key, value in state.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        prefix = next((p for p in VLBERT_PARTS if key.startswith(p)), None)
        target = VLBERT_PARTS[prefix] + key[len(prefix) :] if prefix else None
        if target is None or target not in own or own[target].shape != value.shape:
            unexpected.append(key)
            continue
        loaded[target] = value
    return loaded, unexpected


def load_hybrid_init(model: nn.Module, mbert_dir: str | None, vlbert_checkpoint: str | None, *, mlm_head: bool) -> None:
    """MM-BERT's hybrid init into `model` (an `MMBertSystem`): M-BERT's `MBERT_PARTS` from the HF model dir
    `mbert_dir` (and its `BertForMaskedLM` head when `mlm_head`, as the seed loads it from the language model), then
    VL-BERT's `VLBERT_PARTS` from `vlbert_checkpoint`; every missing / unexpected key is logged. A source of which no
    tensor loads, or an MLM head of another shape, is a ConfigError naming the option and the file."""
    own = model.state_dict()
    if mbert_dir:
        model_dir = Path(mbert_dir).expanduser()
        weights = bert_weights_file(model_dir)
        if weights is None:
            raise ConfigError(f"model.mbert_dir: '{model_dir}' holds no model.safetensors or pytorch_model.bin")
        loaded, unexpected = mbert_hybrid_state(read_state_dict(weights, key="model.mbert_dir"), own)
        if not loaded:
            raise ConfigError(f"model.mbert_dir: no M-BERT tensor of '{mbert_dir}' matches the model's names")
        model.load_state_dict(loaded, strict=False)
        missing = [k for k in own if k.startswith("encoder.bert.") and k not in loaded]
        log_key_report(f"hybrid init: M-BERT from {mbert_dir}", missing, unexpected)
        if mlm_head:
            _, bad = load_mlm_head_file(model, weights)
            if bad:
                raise ConfigError(f"model.mbert_dir: {weights}: the MLM head's {bad[0]} has another shape")
    if vlbert_checkpoint:
        loaded, unexpected = vlbert_hybrid_state(read_state_dict(vlbert_checkpoint, key="model.vlbert_checkpoint"), own)
        if not loaded:
            raise ConfigError(
                f"model.vlbert_checkpoint: no tensor of '{vlbert_checkpoint}' is one of the hybrid init's VL-BERT "
                f"parts ({', '.join(VLBERT_PARTS)})"
            )
        model.load_state_dict(loaded, strict=False)
        wanted = [k for k in own if any(k.startswith(v) for v in VLBERT_PARTS.values())]
        log_key_report(
            f"hybrid init: VL-BERT parts from {vlbert_checkpoint}", [k for k in wanted if k not in loaded], unexpected
        )
