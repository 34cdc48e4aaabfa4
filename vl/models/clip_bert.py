"""CLIP-BERT: BERT + one projected CLIP image embedding appended as an extra token after the (padded) text.

The image token = `img_projection(clip_feats)` (Linear 512 -> hidden) with **no** position and **no** token-type
embedding; it goes through the embedding LayerNorm/dropout with the text, the attention mask gets one more column of
1s, and the MLM head reads the text positions only. No pooler: `pooled` is the [CLS] state. Without `clip_feats` in
the batch (or with `use_image=False`: `model=bert`, the same class, built without `img_projection`, as it is with
text-only data) the forward is exactly BERT's.

Weights: `text_encoder.pretrained` (a local HF BERT dir, or "minilm") loads the BERT body and, where the checkpoint has
them, the `BertForMaskedLM` MLM head weights `cls.predictions.*`. `state_dict_path` loads a whole-model state dict:
a DeepSpeed `mp_rank_00_model_states.pt` (state dict under `"module"`, keys of the original `BertImageForMaskedLM`:
`bert.*` with the image projection at `bert.img_projection.*`, `cls.predictions.*`), a `BertForMaskedLM` `pytorch_model.bin`/`model.safetensors`, or a
Lightning checkpoint of this class; non-strict, with every missing/unexpected key logged. The released checkpoints
hold the MLM output bias twice (`cls.predictions.bias` and `cls.predictions.decoder.bias`: in the transformers 4.x
`BertLMPredictionHead` one tied tensor, saved under both names): the duplicate is dropped when equal (logged), and
two different tensors are a `ConfigError` naming both keys (`drop_tied_decoder_bias`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from vl.batch import EncoderOutput
from vl.errors import ConfigError
from vl.models.bert_backbone import build_bert
from vl.models.checkpoints import BERT_MLM_HEAD_KEYS, load_bert_mlm_head, load_mapped_state_dict, read_state_dict
from vl.models.system import VLSystem

log = logging.getLogger(__name__)

#: `BertForMaskedLM` / `BertImageForMaskedLM` MLM-head names -> this model's (`objectives.mlm` = MaskedLanguageModeling)
_HEAD_KEYS = BERT_MLM_HEAD_KEYS
#: tied to the word embeddings here: dropped when loading (not reported as unexpected)
_TIED_KEYS = {"cls.predictions.decoder.weight"}
WORD_EMB = "encoder.bert.embeddings.word_embeddings.weight"
#: keys of the original / `BertForMaskedLM` checkpoints with no counterpart here (regular expressions, full match)
CLIP_BERT_EXPECTED_UNUSED = (
    r"(module\.)?bert\.pooler\..*",  # CLIP-BERT has no pooler (`add_pooling_layer=False`)
    r"(module\.)?bert\.embeddings\.position_ids",  # a buffer in some transformers versions
    r"(module\.)?cls\.predictions\.decoder\.weight",  # tied to the word embeddings
    r"(module\.)?cls\.seq_relationship\..*",  # BERT's NSP head (`BertForPreTraining` files)
    r"(module\.)?objectives\.mlm\.word_embeddings\.weight",  # tied (this class's own checkpoints)
)


def drop_tied_decoder_bias(state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """`state` without `cls.predictions.decoder.bias` where `cls.predictions.bias` is also there (same optional
    `module.` prefix) and equal to it: the transformers 4.x MLM head ties `decoder.bias` to `bias`, so the seed's
    `BertImageForMaskedLM` saves one tensor under both names. Different values -> `ConfigError` naming both keys.
    A lone `decoder.bias` is kept (it maps to `objectives.mlm.bias`)."""
    state = dict(state)
    for prefix in ("", "module."):
        bias, dup = f"{prefix}cls.predictions.bias", f"{prefix}cls.predictions.decoder.bias"
        if bias in state and dup in state:
            a, b = state[bias], state[dup]
            if a.shape != b.shape or not torch.equal(a, b):
                raise ConfigError(f"{what}: '{bias}' and '{dup}' differ (they are one tied MLM output bias)")
            del state[dup]
            log.info("%s: '%s' dropped: the tied duplicate of '%s' (equal values)", what, dup, bias)
    return state


def map_original_key(key: str) -> str | None:
    """A key of the original CLIP-BERT / HF `BertForMaskedLM` state dict -> this system's key (None: tied, drop).
    Keys already in this system's naming (`encoder.*`, `objectives.*`) pass unchanged."""
    if key.startswith("module."):
        key = key[len("module.") :]
    if key in _TIED_KEYS:
        return None
    if key in _HEAD_KEYS:
        return _HEAD_KEYS[key]
    if key.startswith("bert.img_projection."):  # the original keeps the projection inside `BertImageModel`
        return f"encoder.{key[len('bert.') :]}"
    if key.startswith("bert."):
        return f"encoder.{key}"
    if key.startswith("img_projection."):
        return f"encoder.{key}"
    return key


class ClipBertEncoder(nn.Module):
    """`forward(batch) -> EncoderOutput(text (B,T,H), visual (B,1,H) or None, pooled (B,H) = [CLS] state)`.

    Batch keys: input_ids, attention_mask (B,T), optional token_type_ids (B,T); optional clip_feats (B,1,D) or (B,D)
    (any float dtype; cast to the projection's dtype). No clip_feats, or `use_image=False` -> plain BERT.
    """

    def __init__(
        self,
        *,
        data_info: dict[str, Any],
        text_encoder: dict[str, Any] | None = None,
        image_dim: int | None = None,
        use_image: bool = True,
    ) -> None:
        """`text_encoder`: `build_bert` arguments (no pooler is built); `image_dim`: the CLIP embedding size (None:
        the data's, `data_info["clip_dim"]`, else 512); `use_image=False`: ignore `clip_feats` (the BERT
        baselines, `model=bert`). `img_projection` is initialised as the seed's (HF `BertPreTrainedModel` init):
        weight ~ N(0, `text_encoder.initializer_range`, 0.02 by default), bias 0."""
        super().__init__()
        data_dim = data_info.get("clip_dim")
        if image_dim is not None and data_dim is not None and int(image_dim) != int(data_dim):
            raise ConfigError(f"model.encoder.image_dim={image_dim} but the data's CLIP features are {data_dim}-d")
        image_dim = int(image_dim or data_dim or 512)
        text_encoder = dict(text_encoder or {})
        self.pretrained = text_encoder.get("pretrained")
        # text-only data or model=bert: the image is never read, and no image projection is built
        self.use_image = use_image and data_dim is not None
        self.visual_input = "global" if self.use_image else None
        self.bert = build_bert(**{**text_encoder, "add_pooling_layer": False})
        hidden = self.bert.config.hidden_size
        self.hidden_size = self.pooled_size = self.text_size = self.visual_size = hidden
        self.image_dim = image_dim
        if self.use_image:  # built only where used: an unused parameter breaks DDP
            self.img_projection = nn.Linear(image_dim, hidden)
            # the seed's HF `_init_weights` (post_init): weight ~ N(0, initializer_range), bias 0
            nn.init.normal_(self.img_projection.weight, mean=0.0, std=self.bert.config.initializer_range)
            nn.init.zeros_(self.img_projection.bias)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def pretrained_parameter_names(self) -> set[str]:
        return {f"bert.{name}" for name, _ in self.bert.named_parameters()} if self.pretrained else set()

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (embeddings after LayerNorm+dropout (B,T[+1],H), attention mask (B,T[+1]))."""
        emb = self.bert.embeddings
        input_ids = batch["input_ids"]
        bsz, text_len = input_ids.shape
        token_type = batch.get("token_type_ids")
        if token_type is None:
            token_type = torch.zeros_like(input_ids)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        positions = torch.arange(text_len, device=input_ids.device).unsqueeze(0)
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type) + emb.position_embeddings(positions)
        clip = batch.get("clip_feats") if self.use_image else None
        if clip is not None:
            if clip.dim() == 2:
                clip = clip.unsqueeze(1)
            if clip.shape[1] != 1 or clip.shape[2] != self.image_dim:
                raise ValueError(f"clip_feats: expected (B, 1, {self.image_dim}), got {tuple(clip.shape)}")
            image = self.img_projection(clip.to(self.img_projection.weight.dtype))  # no position, no type embedding
            x = torch.cat([x, image.to(x.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones(bsz, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        return emb.dropout(emb.LayerNorm(x)), mask

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        text_len = batch["input_ids"].shape[1]
        hidden, mask = self.embed(batch)
        attn = create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden, attention_mask=mask)
        states = self.bert.encoder(hidden, attention_mask=attn).last_hidden_state
        visual = states[:, text_len:] if states.shape[1] > text_len else None
        return EncoderOutput(text=states[:, :text_len], visual=visual, pooled=states[:, 0])


class ClipBertSystem(VLSystem):
    """CLIP-BERT (`model=clip_bert`) and the BERT baselines (`model=bert`: the same encoder on text-only data). What
    is special: released weights load into encoder and MLM head (`state_dict_path`; the MLM head `cls.predictions.*`
    of `text_encoder.pretrained`), and those head weights train at the pretrained lr too."""

    def __init__(self, *, state_dict_path: str | None = None, **kwargs: Any) -> None:
        """`state_dict_path`: a whole-model state dict (see the module docstring); the rest: `VLSystem`'s."""
        super().__init__(**kwargs)
        self._pretrained_head: dict[str, torch.Tensor] = {}
        pretrained = getattr(self.encoder, "pretrained", None)
        if pretrained and "mlm" in self.objectives and not self.init_from:
            self.load_pretrained_mlm_head(pretrained)
        if state_dict_path:
            self.load_original_state_dict(state_dict_path)

    def unbuilt_prefixes(self) -> tuple[str, ...]:
        return () if self.encoder.use_image else ("encoder.img_projection.",)

    def pretrained_parameter_names(self) -> set[str]:
        return super().pretrained_parameter_names() | set(self._pretrained_head)

    # ------------------------------------------------------------------ loading
    def load_pretrained_mlm_head(self, pretrained: str) -> None:
        """`cls.predictions.*` of a `BertForMaskedLM` checkpoint in the pretrained dir -> the MLM head (logged)."""
        self._pretrained_head = load_bert_mlm_head(self, pretrained)

    def load_original_state_dict(self, path: str) -> None:
        """Load a whole-model state dict (see the module docstring) through `map_original_key`: a key that maps to no
        parameter is a `ConfigError` unless it is in `CLIP_BERT_EXPECTED_UNUSED`; missing/unused keys are logged. The
        tied duplicate `cls.predictions.decoder.bias` is dropped first (`drop_tied_decoder_bias`)."""

        def tie(mapped: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if WORD_EMB in mapped and "objectives.mlm.word_embeddings.weight" in self.state_dict():
                mapped["objectives.mlm.word_embeddings.weight"] = mapped[WORD_EMB]  # the tied decoder
            return mapped

        what = f"state dict from {path}"
        load_mapped_state_dict(
            self,
            drop_tied_decoder_bias(read_state_dict(path), what),
            map_original_key,
            what=what,
            expected_unused=CLIP_BERT_EXPECTED_UNUSED,
            transforms=tie,
        )
