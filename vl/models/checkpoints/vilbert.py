"""ViLBERT's checkpoints: `map_vilbert_key` renames a `vilbert-multi-task` / `vilbert_beta` checkpoint
(`BertForMultiModalPreTraining` or `VILBertForVLTasks`: `bert.embeddings.*`, `bert.v_embeddings.*`,
`bert.encoder.{layer,v_layer,c_layer}.*`, `bert.{t,v}_pooler.*`, `cls.*`, `vil_prediction.*`, `vil_logit.*`,
`vision_logit.*`) to `VilbertSystem` keys; `seed_itm_transform` turns the seed's alignment head into vl's ITM head."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from vl.errors import ConfigError

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
