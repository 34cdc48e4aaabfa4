"""The published VisualBERT (`model=visual_bert`): the layout of `transformers.VisualBertModel`.

Text tokens get BERT's word + position + token-type embeddings; each region feature goes through
`visual_projection` (Linear(D -> H)) plus its own `visual_token_type_embeddings` (type 1) and
`visual_position_embeddings` (position 0); one LayerNorm/dropout; BERT layers over [text ; regions]; the pooler is
tanh(Linear(h_[CLS])). No box input (VisualBERT reads the region features only).

Weights (`text_encoder.pretrained`, a local dir with `config.json`):
* a VisualBERT dir (`model_type: visual_bert`: `VisualBertModel.save_pretrained`, or a `VisualBertForPreTraining`
  / `uclanlp/visualbert-*` download): the whole encoder, and where the file has them the pretraining heads
  (`cls.predictions.*` -> the MLM head, `cls.seq_relationship.*` -> the ITM head, converted from HF's
  0 = matching to vl's 1 = aligned). Sizes come from its config.json; its `visual_embedding_dim` must equal the
  data's region-feature size.
* a BERT dir (or "minilm"): the BERT parts, the visual type/position tables initialised from the text ones (HF's
  `special_visual_initialize`), as VisualBERT is initialised from BERT.
Keys that map to nothing raise `ConfigError` unless expected-unused; missing keys are logged.
`model=single_stream` (`vl.models.single_stream`) is the different, VisualBERT-style encoder the CPU default uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import VisualBertConfig, VisualBertModel

from vl.batch import EncoderOutput, region_feature_dim
from vl.errors import ConfigError
from vl.models.checkpoints import BERT_MLM_HEAD_KEYS, load_mapped_state_dict, read_state_dict
from vl.models.system import VLSystem
from vl.pretrained import resolve_model_dir

log = logging.getLogger(__name__)

#: keys of VisualBERT / BERT files with no counterpart here (regular expressions, full match on the source key)
VISUAL_BERT_EXPECTED_UNUSED = (
    r"(visual_bert\.|bert\.)?embeddings\.position_ids",
    r"cls\.predictions\.decoder\.weight",  # tied to the word embeddings
    r"cls\.predictions\.decoder\.bias",  # = cls.predictions.bias
    r"cls\.seq_relationship\.(weight|bias)",  # only when this run has no ITM head
    r"cls\.predictions\..*",  # only when this run has no MLM head
    r"classifier\..*|cls\.(?!predictions|seq_relationship).*",  # task heads of other VisualBert* classes
)


def weights_file(model_dir: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise ConfigError(f"text_encoder.pretrained: '{model_dir}' has no model.safetensors / pytorch_model.bin")


class VisualBertEncoder(nn.Module):
    """`forward(batch) -> EncoderOutput(text (B,T,H), visual (B,R,H), pooled (B,H))` of a `VisualBertModel`.

    Batch keys: input_ids, attention_mask, token_type_ids (B,T); visual_feats (B,R,D); visual_mask (B,R). Boxes are
    not read. `pretrained` / sizes: see the module docstring.
    """

    visual_input = "regions"

    def __init__(self, *, data_info: dict[str, Any], text_encoder: dict[str, Any] | None = None) -> None:
        """`text_encoder`: sizes (random init) or `pretrained` (a VisualBERT or BERT dir, see the module docstring);
        `data_info["visual_dim"]`: the region-feature size (= `visual_embedding_dim`)."""
        super().__init__()
        visual_dim = region_feature_dim(data_info)
        text_encoder = dict(text_encoder or {})
        pretrained = text_encoder.get("pretrained")
        self.source: tuple[str, Path] | None = None
        if pretrained:
            model_dir = resolve_model_dir(pretrained)
            cfg = json.loads((model_dir / "config.json").read_text())
            if cfg.get("model_type") == "visual_bert":
                config = VisualBertConfig.from_json_file(model_dir / "config.json")
                if config.visual_embedding_dim != visual_dim:
                    raise ConfigError(
                        f"text_encoder.pretrained: {model_dir} has visual_embedding_dim={config.visual_embedding_dim}, "
                        f"but the data's region features are {visual_dim}-d"
                    )
                self.source = ("visual_bert", model_dir)
            else:  # a BERT dir: VisualBERT is initialised from BERT
                keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
                keys += ("max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps")
                config = VisualBertConfig(**{k: cfg[k] for k in keys if k in cfg}, visual_embedding_dim=visual_dim)
                self.source = ("bert", model_dir)
        else:
            hidden, heads = int(text_encoder.get("hidden_size", 768)), int(text_encoder.get("num_heads", 12))
            if hidden % heads:
                raise ConfigError(f"text_encoder.hidden_size={hidden} is not divisible by num_heads={heads}")
            dropout = float(text_encoder.get("dropout", 0.1))
            config = VisualBertConfig(
                vocab_size=int(text_encoder.get("vocab_size", 30522)),
                hidden_size=hidden,
                num_hidden_layers=int(text_encoder.get("num_layers", 12)),
                num_attention_heads=heads,
                intermediate_size=int(text_encoder.get("intermediate_size", 3072)),
                max_position_embeddings=int(text_encoder.get("max_position_embeddings", 512)),
                type_vocab_size=int(text_encoder.get("type_vocab_size", 2)),
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
                initializer_range=float(text_encoder.get("initializer_range", 0.02)),
                visual_embedding_dim=visual_dim,
            )
        self.visual_bert = VisualBertModel(config, add_pooling_layer=True)
        self.hidden_size = self.pooled_size = self.text_size = self.visual_size = config.hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.visual_bert.embeddings.word_embeddings

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        text_len = batch["input_ids"].shape[1]
        feats = batch["visual_feats"].to(self.visual_bert.embeddings.visual_projection.weight.dtype)
        out = self.visual_bert(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            visual_embeds=feats,
            visual_attention_mask=batch["visual_mask"].to(batch["attention_mask"].dtype),
        )
        states = out.last_hidden_state
        return EncoderOutput(text=states[:, :text_len], visual=states[:, text_len:], pooled=out.pooler_output)


def map_visual_bert_key(key: str) -> str | None:
    """A key of a `VisualBertModel` / `VisualBertForPreTraining` (or BERT) file -> this system's key."""
    if key in BERT_MLM_HEAD_KEYS:
        return BERT_MLM_HEAD_KEYS[key]
    if key.startswith("cls.seq_relationship."):
        return "objectives.itm.classifier." + key[len("cls.seq_relationship.") :]
    for prefix in ("visual_bert.", "bert."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    if key.startswith(("embeddings.", "encoder.", "pooler.")):
        return f"encoder.visual_bert.{key}"
    return None


class VisualBertSystem(VLSystem):
    """The published VisualBERT + the data's objectives (MLM, ITM, VQA, ...). See the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        """`VLSystem`'s arguments; a pretrained dir in `encoder.text_encoder.pretrained` loads encoder and heads."""
        super().__init__(**kwargs)
        self._pretrained: set[str] = set()
        if self.encoder.source is not None and not self.init_from:
            self.load_pretrained(*self.encoder.source)

    def load_pretrained(self, kind: str, model_dir: Path) -> dict[str, list[str]]:
        """Load a VisualBERT or BERT dir (see the module docstring); returns the key report."""
        from vl.heads import itm_head_from_seed

        def convert(mapped: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            w, b = "objectives.itm.classifier.weight", "objectives.itm.classifier.bias"
            if w in mapped and b in mapped:  # HF: index 0 = matching pair; vl: index 1 = aligned
                mapped[w], mapped[b] = itm_head_from_seed(mapped[w], mapped[b])
            if kind == "bert":  # special_visual_initialize: the visual tables start as the text ones
                emb = "encoder.visual_bert.embeddings."
                for text, visual in (("token_type", "visual_token_type"), ("position", "visual_position")):
                    if f"{emb}{text}_embeddings.weight" in mapped:
                        mapped[f"{emb}{visual}_embeddings.weight"] = mapped[f"{emb}{text}_embeddings.weight"].clone()
            return mapped

        report = load_mapped_state_dict(
            self,
            read_state_dict(weights_file(model_dir), key="model.encoder.text_encoder.pretrained"),
            map_visual_bert_key,
            what=f"{kind} weights from {model_dir}",
            expected_unused=VISUAL_BERT_EXPECTED_UNUSED,
            transforms=convert,
        )
        self._pretrained = set(report["loaded"])
        return report

    def pretrained_parameter_names(self) -> set[str]:
        return set(self._pretrained) & {name for name, _ in self.named_parameters()}
