"""BERT text encoders: random-init from a size config, or real weights from a local dir (key report logged)."""

from __future__ import annotations

import logging

from transformers import BertConfig, BertModel

from vl.errors import ConfigError
from vl.pretrained import MINILM, log_key_report, resolve_model_dir

__all__ = ["MINILM", "bert_config", "build_bert", "log_key_report", "resolve_model_dir"]

log = logging.getLogger(__name__)


def bert_config(
    *, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, dropout: float, **extra: object
) -> BertConfig:
    """A `BertConfig` from vl's size names (one dropout for hidden states and attention probabilities); `extra`:
    other `BertConfig` fields under their own names."""
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    return BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **extra,
    )


def build_bert(
    *,
    pretrained: str | None = None,
    vocab_size: int = 30522,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 512,
    type_vocab_size: int = 2,
    dropout: float = 0.1,
    initializer_range: float = 0.02,
    add_pooling_layer: bool = True,
) -> BertModel:
    """A `BertModel` in training mode: random-init from the given sizes, or `from_pretrained(pretrained)` (sizes then
    come from its config.json; the size arguments are ignored)."""
    if pretrained:
        model_dir = resolve_model_dir(pretrained)
        model, info = BertModel.from_pretrained(
            str(model_dir), add_pooling_layer=add_pooling_layer, output_loading_info=True
        )
        log_key_report(f"BERT weights from {model_dir}", info["missing_keys"], info["unexpected_keys"])
        # `from_pretrained` returns eval mode; Lightning trains modules in the mode they were built in (and restores
        # it after validation), so without this the configured dropout would never run
        return model.train()
    if hidden_size % num_heads:
        raise ConfigError(f"text_encoder.hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    config = bert_config(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        dropout=dropout,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=type_vocab_size,
        initializer_range=initializer_range,
    )
    return BertModel(config, add_pooling_layer=add_pooling_layer)
