"""BERT checkpoints (an HF model dir's `model.safetensors` / `pytorch_model.bin`): chosen tensors into a model
(`load_bert_parts`) and the `BertForMaskedLM` head into `objectives.mlm` (`load_bert_mlm_head`,
`load_mlm_head_file`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vl.errors import ConfigError
from vl.models.bert_backbone import log_key_report
from vl.models.checkpoints.base import read_state_dict

log = logging.getLogger(__name__)


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
    """The tensors of a BERT weights file whose names are in `keys` (a safetensors file: only those are read). A
    damaged file is a ConfigError naming `text_encoder.pretrained` and the file."""
    if weights.suffix == ".safetensors":
        from vl.checkpoint import load_safetensors

        return load_safetensors(weights, "text_encoder.pretrained", keys=keys)
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
