"""Text-only masked-LM wrappers of two vision-and-language models (for the visual-commonsense probes).

* `lxmert_text_only`: HF `LxmertForPreTraining` whose every cross-modality layer (`x_layers`) is swapped for
  `LxmertLanguageOnlyXLayer` (weights carried over): the language stream gets
  ``lang = visual_attention.output(zeros_like(lang), lang)`` (= LayerNorm(dense(0) + dropout + lang): a zero
  cross-attention context), then the usual self-attention (the visual side sees zeros) and the output FFN. A dummy
  visual input (``visual_feats ~ U(0,10)`` (B,1,2048), ``visual_pos ~ U(0,1)`` (B,1,4)) only satisfies the forward
  signature: it cannot reach the language stream, so the MLM logits do not depend on it.
* `visual_bert_text_only`: HF `VisualBertForPreTraining` called without `visual_embeds`; logits `prediction_logits`.

Both load from a local dir: a HF model dir (`config.json` + weights), or a `config.json` plus a DeepSpeed-style
checkpoint (`mp_rank_00_model_states.pt`, the state dict under key ``"module"``, read with `weights_only`) loaded
non-strictly with the missing/unexpected keys logged; a key that maps to no parameter (other than `EXPECTED_UNUSED`)
is a `ConfigError`. `tiny_lxmert_config` / `tiny_visual_bert_config` give random-init sizes for tests.
`LxmertTokenizer` is `BertTokenizer` (bert-base-uncased vocab): `load_text_only_tokenizer` uses the model dir's
vocab when it has one, else the packaged MiniLM vocab (the same bert-base-uncased vocab).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LxmertConfig, LxmertForPreTraining, VisualBertConfig, VisualBertForPreTraining
from transformers.models.lxmert.modeling_lxmert import LxmertXLayer

from vl.errors import ConfigError, DataError
from vl.models.checkpoints import load_mapped_state_dict
from vl.pretrained import log_key_report

log = logging.getLogger(__name__)

#: the file name DeepSpeed gives a model-parallel rank's state (state dict under "module")
DEEPSPEED_STATE = "mp_rank_00_model_states.pt"
#: checkpoint keys allowed to map to nothing (regular expressions, full match); any other unmapped key is an error
EXPECTED_UNUSED = (r"(module\.)?.*position_ids",)


# ---------------------------------------------------------------------------------------------------- loading
def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.pt`/`.bin` file: DeepSpeed's ``{"module": ...}``, Lightning's ``{"state_dict": ...}``
    or a plain state dict."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file not found")
    from vl.checkpoint import load_torch_file

    state = load_torch_file(path, "checkpoint", error=DataError)  # weights_only: a file that would run code is refused
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a (DeepSpeed) state dict, got {type(state).__name__}")
    for key in ("module", "state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            return state[key]
    return state


def _find_deepspeed_state(model_dir: Path) -> Path | None:
    hits = sorted(model_dir.rglob(DEEPSPEED_STATE))
    return hits[0] if hits else None


def _has_hf_weights(model_dir: Path) -> bool:
    return any((model_dir / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")) or any(
        model_dir.glob("model-*.safetensors")
    )


def _load(cls: type, config_cls: type, model_dir: str | Path, checkpoint: str | Path | None) -> nn.Module:
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"pretrained: '{model_dir}' is not a local model dir (expected {model_dir}/config.json)")
    checkpoint = checkpoint or (None if _has_hf_weights(model_dir) else _find_deepspeed_state(model_dir))
    if checkpoint is None:
        model, info = cls.from_pretrained(str(model_dir), output_loading_info=True)
        what = f"{cls.__name__} from {model_dir}"
        unknown = [k for k in info["unexpected_keys"] if not any(re.fullmatch(p, k) for p in EXPECTED_UNUSED)]
        if unknown:
            raise ConfigError(f"{what}: {len(unknown)} key(s) map to no parameter: {', '.join(sorted(unknown)[:10])}")
        log_key_report(what, info["missing_keys"], info["unexpected_keys"])
        return model
    model = cls(config_cls.from_json_file(model_dir / "config.json"))
    load_mapped_state_dict(
        model,
        load_state_dict_file(checkpoint),
        lambda key: key[len("module.") :] if key.startswith("module.") else key,
        what=f"{cls.__name__} from {checkpoint}",
        expected_unused=EXPECTED_UNUSED,
    )
    return model


def load_text_only_tokenizer(model_dir: str | Path | None):
    """`BertTokenizerFast` from the model dir when it has `vocab.txt`, else the packaged bert-base-uncased vocab."""
    from vl.data.collate import load_tokenizer

    if model_dir is not None and (Path(model_dir) / "vocab.txt").is_file():
        return load_tokenizer(str(model_dir))
    return load_tokenizer("minilm")


# ---------------------------------------------------------------------------------------------------- LXMERT
class LxmertLanguageOnlyXLayer(LxmertXLayer):
    """A cross-modality layer whose language stream never reads the visual stream (weights as `LxmertXLayer`)."""

    def forward(  # type: ignore[override]
        self,
        lang_feats: torch.Tensor,
        lang_attention_mask: torch.Tensor | None,
        visual_feats: torch.Tensor,
        visual_attention_mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        # the cross-attention context is zero: LayerNorm(dense(0) + dropout + lang)
        lang = self.visual_attention.output(torch.zeros_like(lang_feats), lang_feats)
        visual = torch.zeros_like(visual_feats)
        lang, visual = self.self_att(lang, lang_attention_mask, visual, visual_attention_mask)
        lang_out, visual_out = self.output_fc(lang, visual)
        if output_attentions:
            return lang_out, visual_out, None  # type: ignore[return-value]
        return lang_out, visual_out


def make_lxmert_language_only(model: LxmertForPreTraining) -> LxmertForPreTraining:
    """Replace every `x_layer` in place by `LxmertLanguageOnlyXLayer` with the same weights."""
    layers = model.lxmert.encoder.x_layers
    for i, old in enumerate(layers):
        new = LxmertLanguageOnlyXLayer(model.config)
        new.load_state_dict(old.state_dict())  # strict: identical structure
        new.to(next(old.parameters()).device).train(old.training)
        layers[i] = new
    return model


def tiny_lxmert_config(**overrides: Any) -> LxmertConfig:
    """A small random-init LXMERT config (bert-base-uncased vocab size) for tests."""
    kwargs: dict[str, Any] = dict(
        vocab_size=30522,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        l_layers=2,
        x_layers=2,
        r_layers=1,
        num_qa_labels=4,
        num_object_labels=8,
        num_attr_labels=4,
        visual_feat_dim=2048,
        visual_pos_dim=4,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return LxmertConfig(**kwargs)


class LxmertTextOnly(nn.Module):
    """`forward(input_ids, attention_mask, token_type_ids, visual_feats=None, visual_pos=None) -> (B,T,V)` MLM
    logits of the language-only LXMERT. Missing visual inputs are drawn as the dummy U(0,10)/U(0,1) tensors."""

    def __init__(self, model: LxmertForPreTraining, seed: int = 0) -> None:
        super().__init__()
        self.model = make_lxmert_language_only(model)
        self.config = model.config
        self.generator = torch.Generator().manual_seed(seed)

    def cross_layer_dropout(self, on: bool) -> None:
        """Dropout in the language-only cross-modality layers on (their training mode) or off; the rest of the model
        keeps its mode. The seed's Visual Property Norms notebook builds those layers fresh after `from_pretrained`
        (which leaves the model in eval mode) and never calls `eval()`, so its published LXMERT row ran them with
        dropout; its Memory Colors notebook calls `eval()` after the swap."""
        for layer in self.model.lxmert.encoder.x_layers:
            layer.train(on)

    def dummy_visual(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.rand(batch_size, 1, self.config.visual_feat_dim, generator=self.generator) * 10.0
        pos = torch.rand(batch_size, 1, self.config.visual_pos_dim, generator=self.generator)
        return feats, pos

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        visual_feats: torch.Tensor | None = None,
        visual_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if visual_feats is None or visual_pos is None:
            feats, pos = self.dummy_visual(input_ids.shape[0])
            visual_feats = feats if visual_feats is None else visual_feats
            visual_pos = pos if visual_pos is None else visual_pos
        device = input_ids.device
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            visual_feats=visual_feats.to(device),
            visual_pos=visual_pos.to(device),
            return_dict=True,
        )
        return out.prediction_logits


def lxmert_text_only(
    model_dir: str | Path | None = None,
    *,
    config: LxmertConfig | None = None,
    checkpoint: str | Path | None = None,
    seed: int = 0,
) -> LxmertTextOnly:
    """From a local dir (HF weights, or config.json + DeepSpeed `module` state dict), or random-init from `config`."""
    if model_dir is None:
        if config is None:
            raise ConfigError("lxmert_text_only: give a local model dir or a config")
        model = LxmertForPreTraining(config)
    else:
        model = _load(LxmertForPreTraining, LxmertConfig, model_dir, checkpoint)
    return LxmertTextOnly(model.eval(), seed=seed)


# ---------------------------------------------------------------------------------------------------- VisualBERT
def tiny_visual_bert_config(**overrides: Any) -> VisualBertConfig:
    """A small random-init VisualBERT config (bert-base-uncased vocab size) for tests."""
    kwargs: dict[str, Any] = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        visual_embedding_dim=16,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return VisualBertConfig(**kwargs)


class VisualBertTextOnly(nn.Module):
    """`forward(input_ids, attention_mask, token_type_ids) -> (B,T,V)`: `prediction_logits` without visual embeds."""

    def __init__(self, model: VisualBertForPreTraining) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
        )
        return out.prediction_logits


def visual_bert_text_only(
    model_dir: str | Path | None = None,
    *,
    config: VisualBertConfig | None = None,
    checkpoint: str | Path | None = None,
) -> VisualBertTextOnly:
    """From a local dir (HF weights, or config.json + DeepSpeed `module` state dict), or random-init from `config`."""
    if model_dir is None:
        if config is None:
            raise ConfigError("visual_bert_text_only: give a local model dir or a config")
        model = VisualBertForPreTraining(config)
    else:
        model = _load(VisualBertForPreTraining, VisualBertConfig, model_dir, checkpoint)
    return VisualBertTextOnly(model.eval())
