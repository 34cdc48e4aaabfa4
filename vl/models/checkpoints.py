"""Released checkpoints -> vl systems: read a state dict safely, rename its keys, load it loudly.

`load_mapped_state_dict` is the one place a foreign state dict enters a model. Every source key either maps onto a
parameter of the model (same shape), or is listed by the caller as expected-unused (a pooler the model does not have,
a tied decoder, heads of tasks vl does not train); any other key is a `ConfigError`, as is a shape mismatch, so a
checkpoint never loads "half" without saying so. Missing model keys (heads the checkpoint lacks) are logged.

`map_vilbert_key` renames a `vilbert-multi-task` / `vilbert_beta` checkpoint (`BertForMultiModalPreTraining` or
`VILBertForVLTasks`: `bert.embeddings.*`, `bert.v_embeddings.*`, `bert.encoder.{layer,v_layer,c_layer}.*`,
`bert.{t,v}_pooler.*`, `cls.*`, `vil_prediction.*`, `vil_logit.*`, `vision_logit.*`) to `VilbertSystem` keys.
`mbert_hybrid_state` / `vlbert_hybrid_state` take MM-BERT's hybrid init from M-BERT and VL-BERT checkpoints;
`vg_bert_seed_to_vl` renames VG-BERT's seed checkpoints (its stage-2/3 model or its stage-1 ImageNet classifier).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vl.errors import ConfigError
from vl.models.bert_backbone import log_key_report
from vl.pretrained import as_one_element

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path, *, key: str = "model.state_dict_path") -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or a torch file (loaded with `weights_only=True`: no code runs) holding it
    directly or under `module` (DeepSpeed) / `state_dict` (Lightning) / `model`."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ConfigError(f"{key}: '{path}' does not exist")
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a truncated / foreign file: one line naming it
            raise ConfigError(f"{key}: '{path}' is not a readable safetensors file ({e})") from None
    from vl.checkpoint import load_torch_file

    state = load_torch_file(path, key)  # weights_only: a file that would run code is refused, damage named
    for inner in ("module", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(inner), dict):
            state = state[inner]
            break
    if not isinstance(state, dict):
        raise ConfigError(f"{key}: '{path}' holds a {type(state).__name__}, not a state dict")
    return state


def load_mapped_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    map_key: Callable[[str], str | None],
    *,
    what: str,
    expected_unused: Iterable[str] = (),
    transforms: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, list[str]]:
    """Load `state` into `model` through `map_key` (source key -> model key, or None: maps to nothing).

    `expected_unused`: regular expressions (full match on the source key) of keys allowed to map to nothing.
    `transforms`: a function applied to the mapped {model key: tensor} dict before loading (e.g. a label flip).
    Raises `ConfigError` naming the keys that map to nothing unexpectedly, or whose shapes differ. Logs the missing
    and unused keys. Returns {"missing", "unused", "loaded"}."""
    own = model.state_dict()
    patterns = [re.compile(p) for p in expected_unused]
    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unused: list[str] = []
    unknown: list[str] = []
    bad_shape: list[str] = []
    for key, value in state.items():
        new = map_key(key)
        if new is None or new not in own:
            (unused if any(p.fullmatch(key) for p in patterns) else unknown).append(key)
            continue
        if new in mapped:
            raise ConfigError(f"{what}: '{sources[new]}' and '{key}' both map to '{new}'")
        mapped[new], sources[new] = as_one_element(value, own[new]), key
    if transforms is not None:
        mapped = transforms(mapped)
    for new, value in mapped.items():
        if tuple(own[new].shape) != tuple(value.shape):
            bad_shape.append(f"{sources.get(new, new)} {tuple(value.shape)} -> {new} {tuple(own[new].shape)}")
    if unknown:
        more = f" ... (+{len(unknown) - 10})" if len(unknown) > 10 else ""
        raise ConfigError(
            f"{what}: {len(unknown)} checkpoint key(s) map to no parameter of {type(model).__name__}: "
            f"{', '.join(sorted(unknown)[:10])}{more}"
        )
    if bad_shape:
        raise ConfigError(f"{what}: shape mismatch (check the model sizes): {'; '.join(bad_shape[:5])}")
    result = model.load_state_dict(mapped, strict=False)
    loaded_storage = {own[k].data_ptr() for k in mapped}
    # a tied parameter (e.g. the MLM decoder = the word embeddings) is loaded when its twin is
    missing = sorted(k for k in result.missing_keys if own[k].data_ptr() not in loaded_storage)
    log_key_report(what, missing, sorted(unused))
    if unused:
        log.info("%s: the %d unexpected keys are expected-unused (not part of this model)", what, len(unused))
    return {"missing": missing, "unused": sorted(unused), "loaded": sorted(mapped)}


# ---------------------------------------------------------------------------------------------------- BERT MLM head
#: `BertForMaskedLM` / `BertImageForMaskedLM` / ViLBERT MLM-head names -> `objectives.mlm` (MaskedLanguageModeling)
BERT_MLM_HEAD_KEYS = {
    "cls.predictions.transform.dense.weight": "objectives.mlm.transform.0.weight",
    "cls.predictions.transform.dense.bias": "objectives.mlm.transform.0.bias",
    "cls.predictions.transform.LayerNorm.weight": "objectives.mlm.transform.2.weight",
    "cls.predictions.transform.LayerNorm.bias": "objectives.mlm.transform.2.bias",
    "cls.predictions.transform.LayerNorm.gamma": "objectives.mlm.transform.2.weight",
    "cls.predictions.transform.LayerNorm.beta": "objectives.mlm.transform.2.bias",
    "cls.predictions.bias": "objectives.mlm.bias",
    "cls.predictions.decoder.bias": "objectives.mlm.bias",
}


def bert_weights_file(model_dir: Path) -> Path | None:
    """The weights file of an HF model dir: `model.safetensors`, else `pytorch_model.bin`, else None."""
    files = [model_dir / "model.safetensors", model_dir / "pytorch_model.bin"]
    return next((f for f in files if f.is_file()), None)


def bert_file_tensors(weights: Path, keys: Any) -> dict[str, torch.Tensor]:
    """The tensors of a BERT weights file whose names are in `keys` (a safetensors file: only those are read)."""
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k in keys}
    state = read_state_dict(weights, key="text_encoder.pretrained")
    return {k: v for k, v in state.items() if k in keys}


def load_bert_parts(model: nn.Module, pretrained: str, parts: dict[str, str]) -> list[str]:
    """Copy BERT checkpoint tensors into `model` by `parts` ({checkpoint key: model key}; the first checkpoint key
    found for a model key wins, so a map may list `bert.pooler.dense.weight` and a `BertModel` save's
    `pooler.dense.weight` for one target). Shapes must match (ConfigError naming both). Logged; returns the model keys
    loaded (none when the dir has no weights file or none of the keys)."""
    from vl.models.bert_backbone import resolve_model_dir

    weights = bert_weights_file(resolve_model_dir(pretrained))
    if weights is None:
        return []
    found = bert_file_tensors(weights, parts)
    own = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, target in parts.items():
        if key not in found or target in loaded:
            continue
        if own[target].shape != found[key].shape:
            raise ConfigError(
                f"{weights}: '{key}' has shape {tuple(found[key].shape)}, {target} {tuple(own[target].shape)}"
            )
        loaded[target] = found[key]
    model.load_state_dict(loaded, strict=False)
    log.info("from %s: %s", weights, ", ".join(sorted(loaded)) or "nothing (no such keys)")
    return sorted(loaded)


def load_bert_mlm_head(model: nn.Module, pretrained: str) -> dict[str, torch.Tensor]:
    """`cls.predictions.*` of the `BertForMaskedLM` checkpoint in a pretrained BERT dir -> `objectives.mlm` (its decoder
    is tied to the word embeddings, which come with the BERT body). Logged; returns the loaded {key: tensor} (empty
    when the dir has no weights file or no MLM head: the head then stays randomly initialised)."""
    from vl.models.bert_backbone import resolve_model_dir

    model_dir = resolve_model_dir(pretrained)
    weights = bert_weights_file(model_dir)
    if weights is None:
        log.warning("MLM head: no weights file in %s; the head stays randomly initialised", model_dir)
        return {}
    return load_mlm_head_file(model, weights)[0]


def load_mlm_head_file(model: nn.Module, weights: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`load_bert_mlm_head` from a weights file: ({key: tensor} loaded, model keys skipped for a shape mismatch). A
    bias shorter than the model's (tokens added after the checkpoint, e.g. MM-BERT's [STOP]) fills its first entries;
    the others keep their init, as those tokens' word rows do."""
    found = bert_file_tensors(weights, BERT_MLM_HEAD_KEYS)
    head: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, value in found.items():  # `cls.predictions.bias` and `.decoder.bias`: one tied tensor, often saved twice
        target = BERT_MLM_HEAD_KEYS[key]
        if target in head and not torch.equal(head[target], value):
            raise ConfigError(f"{weights}: '{source[target]}' and '{key}' differ; both are the MLM head's {target}")
        head[target], source[target] = value, key
    if not head:
        log.info("MLM head: %s has no cls.predictions.* weights; the head stays randomly initialised", weights)
        return {}, []
    own = model.state_dict()
    bias, mine = head.get("objectives.mlm.bias"), own.get("objectives.mlm.bias")
    if bias is not None and mine is not None and 0 < bias.shape[0] < mine.shape[0]:
        head["objectives.mlm.bias"] = torch.cat([bias, mine[bias.shape[0] :]])
    missing = sorted(k for k in own if k.startswith("objectives.mlm.") and k not in head)
    missing = [k for k in missing if k != "objectives.mlm.word_embeddings.weight"]  # tied, comes with BERT
    bad = sorted(k for k, v in head.items() if own[k].shape != v.shape)
    head = {k: v for k, v in head.items() if k not in bad}
    model.load_state_dict(head, strict=False)
    log_key_report(f"MLM head from {weights}", missing, [f"{k} (shape mismatch)" for k in bad])
    return head, bad


# ---------------------------------------------------------------------------------------------------- ViLBERT
#: co-attention (`BertConnectionLayer`) names -> `CoAttentionLayer` names. In `BertBiAttention`, `*1` projections read
#: the vision stream and `*2` the text stream; text queries (query2) attend vision keys/values (key1/value1).
#: `BertBiOutput.dense1/LayerNorm1` finish the vision stream, `dense2/LayerNorm2` the text stream.
_VILBERT_CO = {
    "biattention.query2": "text_attends_vision.query",
    "biattention.key1": "text_attends_vision.key",
    "biattention.value1": "text_attends_vision.value",
    "biattention.query1": "vision_attends_text.query",
    "biattention.key2": "vision_attends_text.key",
    "biattention.value2": "vision_attends_text.value",
    "biOutput.dense1": "vision_out.dense",
    "biOutput.LayerNorm1": "vision_out.norm",
    "biOutput.dense2": "text_out.dense",
    "biOutput.LayerNorm2": "text_out.norm",
    "v_intermediate.dense": "vision_ffn.intermediate",
    "v_output.dense": "vision_ffn.output.dense",
    "v_output.LayerNorm": "vision_ffn.output.norm",
    "t_intermediate.dense": "text_ffn.intermediate",
    "t_output.dense": "text_ffn.output.dense",
    "t_output.LayerNorm": "text_ffn.output.norm",
}
_VILBERT_PREFIX = {
    "bert.embeddings.": "encoder.bert.embeddings.",
    "bert.v_embeddings.image_embeddings.": "encoder.image_embedding.feat_proj.",
    "bert.v_embeddings.image_location_embeddings.": "encoder.image_embedding.loc_proj.",
    "bert.v_embeddings.LayerNorm.": "encoder.image_embedding.norm.",
    "bert.t_pooler.dense.": "encoder.text_pooler.0.",
    "bert.v_pooler.dense.": "encoder.image_pooler.0.",
    "cls.predictions.transform.dense.": "objectives.mlm.transform.0.",
    "cls.predictions.transform.LayerNorm.": "objectives.mlm.transform.2.",
    "cls.bi_seq_relationship.": "objectives.itm.classifier.",
    "cls.imagePredictions.transform.dense.": "objectives.mrc.head.0.",
    "cls.imagePredictions.transform.LayerNorm.": "objectives.mrc.head.2.",
    "cls.imagePredictions.decoder.": "objectives.mrc.head.3.",
    # vilbert-multi-task's SimpleClassifier (Linear-GeLU-LN-Linear) = the "mlp" VQA classifier
    "vil_prediction.logit_fc.": "objectives.vqa.classifier.",
    "vision_logit.": "objectives.refer.vision_logit.",
}
#: vilbert_beta's weight-normed SimpleClassifier (`main.0` / `main.3`, weight_g / weight_v) = the "simple" classifier
_VILBERT_WEIGHT_NORM = re.compile(r"vil_prediction\.main\.([03])\.(weight_g|weight_v|bias)")

#: checkpoint keys that have no counterpart in vl's ViLBERT (regular expressions, full match)
VILBERT_EXPECTED_UNUSED = (
    r"cls\.predictions\.decoder\.weight",  # tied to the word embeddings
    r"bert\.embeddings\.position_ids",  # a buffer in newer transformers
    r"bert\.encoder\.c_layer\.\d+\.biOutput\.q_dense[12]\.(weight|bias)",  # built but never used upstream
    r"vil_prediction_gqa\..*",  # heads of tasks vl does not train
    r"vil_binary_prediction\..*",
    r"vil_tri_prediction\..*",
    r"linguisic_logit\..*",
)


def map_vilbert_key(key: str, *, multiple_choice_head: str = "retrieval") -> str | None:
    """A `vilbert-multi-task` / `vilbert_beta` key -> the `VilbertSystem` key (None: no counterpart).

    `vil_logit` (the multiple-choice scorer of VCR and retrieval) maps to `objectives.<multiple_choice_head>.vil_logit`.
    `cls.bi_seq_relationship` maps to the ITM head but still uses the seed's convention (0 = aligned): the loader
    converts it with `vl.heads.itm_head_from_seed` (`seed_itm_transform`). Keys already in vl's naming pass unchanged,
    and so does their ITM head (already 1 = aligned)."""
    if key.startswith("module."):
        key = key[len("module.") :]
    if key.startswith(("encoder.", "objectives.")):
        return key
    if key.startswith("bert.encoder.layer."):
        return "encoder.bert.encoder.layer." + key[len("bert.encoder.layer.") :]
    if key.startswith("bert.encoder.v_layer."):
        return "encoder.vision_layers." + key[len("bert.encoder.v_layer.") :]
    match = re.fullmatch(r"bert\.encoder\.c_layer\.(\d+)\.(\w+\.\w+)\.(weight|bias)", key)
    if match:
        part = _VILBERT_CO.get(match.group(2))
        return None if part is None else f"encoder.co_layers.{match.group(1)}.{part}.{match.group(3)}"
    if key in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
        return "objectives.mlm.bias"
    if key.startswith("vil_logit."):
        return f"objectives.{multiple_choice_head}.vil_logit.{key[len('vil_logit.') :]}"
    match = _VILBERT_WEIGHT_NORM.fullmatch(key)
    if match:
        index, name = match.groups()
        name = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}.get(
            name, name
        )
        return f"objectives.vqa.classifier.{index}.{name}"
    for prefix, target in _VILBERT_PREFIX.items():
        if key.startswith(prefix):
            return target + key[len(prefix) :]
    return None


#: the seed's alignment head (index 0 = aligned); `objectives.itm.classifier.*` is vl's (index 1 = aligned)
SEED_ITM_PREFIX = "cls.bi_seq_relationship."


def seed_itm_transform(
    state: Mapping[str, torch.Tensor],
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    """The `transforms` argument of `load_mapped_state_dict` for a ViLBERT state dict: `seed_itm_to_vl` when its ITM
    head comes from the seed's `cls.bi_seq_relationship.*` (0 = aligned), None when the state dict has no ITM head or
    has it in vl's naming (`objectives.itm.classifier.*`, already 1 = aligned: a vl state dict loads unchanged).
    Raises `ConfigError` when only one of the seed head's weight / bias is there."""
    seed = {k.removeprefix("module.") for k in state if k.removeprefix("module.").startswith(SEED_ITM_PREFIX)}
    if not seed:
        return None
    if seed != {SEED_ITM_PREFIX + "weight", SEED_ITM_PREFIX + "bias"}:
        raise ConfigError(
            f"ViLBERT checkpoint: cls.bi_seq_relationship needs exactly its weight and its bias, got {sorted(seed)}"
        )
    return seed_itm_to_vl


def seed_itm_to_vl(mapped: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The alignment head of a seed ViLBERT checkpoint (0 = aligned) -> vl's ITM head (1 = aligned). Only for a head
    that came from `cls.bi_seq_relationship.*` (`seed_itm_transform` decides)."""
    from vl.heads import itm_head_from_seed

    weight, bias = "objectives.itm.classifier.weight", "objectives.itm.classifier.bias"
    if weight in mapped and bias in mapped:
        mapped[weight], mapped[bias] = itm_head_from_seed(mapped[weight], mapped[bias])
    elif weight in mapped or bias in mapped:
        raise ConfigError("ViLBERT checkpoint: cls.bi_seq_relationship needs both its weight and its bias")
    return mapped


# ------------------------------------------------------------------------------------------------ MM-BERT's hybrid init
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


# ------------------------------------------------------------------------------------------------ VG-BERT's seed
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
    """The seed's layout: "full" for a state dict of its `TwoStreamPretrain` / `RelationalGrounding`
    (`image_model.image_model.*`, `language_model.*`, ...), "stage1" for its ImageNet classifier
    (`image_model.<i>.*`, `embedder.*`, `attention.*`; `classifier.*` too), None otherwise (`module.` prefixes of
    DataParallel allowed)."""
    keys = [str(k).removeprefix("module.") for k in state]
    if any(k.startswith(_VG_BERT_FULL_STARTS) or k.startswith("cross_attention_model.") for k in keys):
        return "full"
    if keys and any(_VG_BERT_STAGE1.match(k) for k in keys):
        return "stage1"
    return None


def vg_bert_seed_to_vl(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A state dict of the seed (`vg_bert_seed_layout`: the stage-2/3 `best_model.pth`, or the stage-1 ImageNet model's
    `state_dict`; `module.` prefixes of DataParallel allowed) -> (vl keys, the seed keys that map to nothing, e.g.
    BERT's pooler or the ImageNet classifier)."""
    prefixes = VG_BERT_VG_BERT_STAGE1_PREFIXES if vg_bert_seed_layout(state) == "stage1" else VG_BERT_SEED_PREFIXES
    out, unmapped = {}, []
    for key, value in state.items():
        k = key.removeprefix("module.")
        for seed, ours in prefixes:
            if k.startswith(seed):
                out[ours + k[len(seed) :]] = value
                break
        else:
            unmapped.append(key)
    return out, unmapped
