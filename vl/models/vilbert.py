"""Two-stream ViLBERT encoder: a BERT text stream and a region-feature vision stream joined by co-attention layers.

Read top to bottom: the image embedding (with its prepended global image token), one co-attention ("connection")
layer, the encoder that interleaves text layers, vision layers and co-attention layers, then the Lightning system.

Shapes: B batch, T text tokens, R regions, Ht text hidden, Hv vision hidden (`v_hidden`), Hb co-attention hidden
(`bi_hidden`). The vision stream has R+1 positions: index 0 is the global image token, so heads that predict per
masked region must drop it (`out.visual[:, 1:]`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer

from vl.batch import EncoderOutput, region_feature_dim
from vl.errors import ConfigError
from vl.models.bert_backbone import bert_config, build_bert
from vl.models.checkpoints import (
    VILBERT_EXPECTED_UNUSED,
    load_bert_mlm_head,
    load_mapped_state_dict,
    map_vilbert_key,
    read_state_dict,
    seed_itm_transform,
)
from vl.models.system import VLSystem

#: location of the global image token: the whole image, area 1
GLOBAL_LOC = (0.0, 0.0, 1.0, 1.0, 1.0)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) 1 = attend / 0 = padding -> (B, 1, 1, K) additive mask (0 or the dtype's minimum), the form that
    transformers' `BertLayer` (eager and SDPA attention alike) and `F.scaled_dot_product_attention` take."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation (normal(0, std) weights, zero biases, unit LayerNorms) for the non-BERT parts."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ImageEmbedding(nn.Module):
    """Regions -> vision-stream inputs, with a global image token prepended.

    `forward(feats (B,R,D), boxes (B,R,4) normalised x1y1x2y2, mask (B,R))` -> (embeddings (B,R+1,Hv), mask (B,R+1)).
    Embedding = LayerNorm(Linear(feat) + Linear(loc)) + dropout, loc = [x1, y1, x2, y2, area]. The global token's
    feature is `global_feats` (B,D) when given (the batch's `visual_global`), else the masked mean of the region
    features; its loc [0,0,1,1,1] and its mask 1.
    """

    def __init__(self, *, feat_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.feat_proj = nn.Linear(feat_dim, hidden)
        self.loc_proj = nn.Linear(5, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def with_global_token(
        feats: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor, global_feats: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepend the global token: feats (B,R+1,D), locs (B,R+1,5), mask (B,R+1)."""
        if global_feats is not None:
            mean = global_feats.to(feats.dtype).unsqueeze(1)  # (B,1,D)
        else:
            weights = mask.unsqueeze(-1).to(feats.dtype)  # (B,R,1)
            mean = (feats * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1.0)  # (B,1,D)
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        locs = torch.cat([boxes, area.unsqueeze(-1)], dim=-1).to(feats.dtype)  # (B,R,5)
        global_loc = torch.tensor(GLOBAL_LOC, dtype=feats.dtype, device=feats.device).expand(len(feats), 1, 5)
        ones = torch.ones_like(mask[:, :1])
        return torch.cat([mean, feats], 1), torch.cat([global_loc, locs], 1), torch.cat([ones, mask], 1)

    def forward(
        self, feats: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor, global_feats: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats, locs, mask = self.with_global_token(feats, boxes, mask, global_feats)
        return self.dropout(self.norm(self.feat_proj(feats) + self.loc_proj(locs))), mask


class CrossAttention(nn.Module):
    """Multi-head attention of one stream's queries over the other stream's keys/values, in the `bi_hidden` space.

    `forward(queries (B,Q,Dq), keys (B,K,Dk), key_mask (B,1,1,K) additive)` -> (B,Q,Hb).
    """

    def __init__(self, *, query_dim: int, key_dim: int, bi_hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(query_dim, bi_hidden)
        self.key = nn.Linear(key_dim, bi_hidden)
        self.value = nn.Linear(key_dim, bi_hidden)
        self.dropout = dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B,L,Hb) -> (B,heads,L,Hb/heads)."""
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(self.query(queries))
        k, v = self.split_heads(self.key(keys)), self.split_heads(self.value(keys))
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )  # (B,heads,Q,Hb/heads)
        return context.transpose(1, 2).flatten(2)


class AddNorm(nn.Module):
    """`LayerNorm(x + dropout(Linear(y)))`: projects a sub-layer's output back to the stream and adds it."""

    def __init__(self, *, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim, eps=1e-12)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.dense(y)))


class FeedForward(nn.Module):
    """A transformer FFN with residual: `LayerNorm(x + dropout(Linear(GELU(Linear(x)))))`, (B,L,H) -> (B,L,H)."""

    def __init__(self, *, hidden: int, intermediate: int, dropout: float) -> None:
        super().__init__()
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = AddNorm(in_dim=intermediate, out_dim=hidden, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(F.gelu(self.intermediate(x)), x)


class CoAttentionLayer(nn.Module):
    """One connection layer: text queries attend to vision keys/values and vice versa (`bi_heads` heads over
    `bi_hidden`); each result goes through Linear(Hb -> stream dim) + dropout + residual + LayerNorm, then through that
    stream's own FFN.

    `forward(text (B,T,Ht), vision (B,R+1,Hv), text_mask (B,1,1,T), vision_mask (B,1,1,R+1))` -> (text, vision).
    """

    def __init__(
        self,
        *,
        t_hidden: int,
        t_intermediate: int,
        v_hidden: int,
        v_intermediate: int,
        bi_hidden: int,
        bi_heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        attn = {"bi_hidden": bi_hidden, "heads": bi_heads, "dropout": dropout}
        self.text_attends_vision = CrossAttention(query_dim=t_hidden, key_dim=v_hidden, **attn)
        self.vision_attends_text = CrossAttention(query_dim=v_hidden, key_dim=t_hidden, **attn)
        self.text_out = AddNorm(in_dim=bi_hidden, out_dim=t_hidden, dropout=dropout)
        self.vision_out = AddNorm(in_dim=bi_hidden, out_dim=v_hidden, dropout=dropout)
        self.text_ffn = FeedForward(hidden=t_hidden, intermediate=t_intermediate, dropout=dropout)
        self.vision_ffn = FeedForward(hidden=v_hidden, intermediate=v_intermediate, dropout=dropout)

    def forward(
        self, text: torch.Tensor, vision: torch.Tensor, text_mask: torch.Tensor, vision_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_ctx = self.text_attends_vision(text, vision, vision_mask)  # (B,T,Hb)
        vision_ctx = self.vision_attends_text(vision, text, text_mask)  # (B,R+1,Hb)
        text = self.text_ffn(self.text_out(text_ctx, text))
        vision = self.vision_ffn(self.vision_out(vision_ctx, vision))
        return text, vision


def check_biattention_ids(v_ids: Sequence[int], t_ids: Sequence[int], *, v_layers: int, t_layers: int) -> None:
    """Raise `ConfigError` unless both lists have the same (non-zero) length, increase strictly and index an
    existing layer of their stream."""
    if len(v_ids) != len(t_ids) or not v_ids:
        raise ConfigError(
            f"model.encoder.v_biattention_id / model.encoder.t_biattention_id: need the same non-zero length (one entry per "
            f"co-attention layer), got {list(v_ids)} and {list(t_ids)}"
        )
    streams = (
        ("model.encoder.v_biattention_id", v_ids, v_layers),
        ("model.encoder.t_biattention_id", t_ids, t_layers),
    )
    for key, ids, n_layers in streams:
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise ConfigError(f"{key}: must be strictly increasing, got {list(ids)}")
        if ids[0] < 0 or ids[-1] >= n_layers:
            raise ConfigError(
                f"{key}: layer ids must lie in [0, {n_layers - 1}] (that stream has {n_layers} layers), got {list(ids)}"
            )


class VilbertEncoder(nn.Module):
    """`forward(batch) -> EncoderOutput(text (B,T,Ht), visual (B,R+1,Hv), pooled (B,Hb))`; `visual[:, 0]` is the
    global image token.

    Batch keys: input_ids, attention_mask, token_type_ids (B,T); visual_feats (B,R,D); visual_boxes (B,R,4)
    normalised x1y1x2y2; visual_mask (B,R).

    Layer placement (as `BertEncoder.forward` of vilbert_beta / vilbert-multi-task): co-attention layer k runs
    *before* text layer t_biattention_id[k] and vision layer v_biattention_id[k]: for each k, the text layers
    [t_prev, t_id) run, then the vision layers [v_prev, v_id), then co-layer k; the streams' remaining layers (vision
    first, then text) run after the last co-layer. With v_biattention_id [0..5] and t_biattention_id [6..11] the order
    is T0..T5, CO0, T6, V0, CO1, T7, V1, CO2, ..., T10, V4, CO5, V5, T11: the first co-layer reads the raw image
    embedding and the last text and vision layers run after the last co-layer.
    """

    visual_input = "regions"

    def __init__(
        self,
        *,
        data_info: dict[str, Any],
        text_encoder: dict[str, Any] | None = None,
        v_hidden: int = 1024,
        v_num_layers: int = 6,
        v_heads: int = 8,
        v_intermediate: int = 1024,
        bi_hidden: int = 1024,
        bi_heads: int = 8,
        v_biattention_id: Sequence[int] = (0, 1, 2, 3, 4, 5),
        t_biattention_id: Sequence[int] = (6, 7, 8, 9, 10, 11),
        dropout: float = 0.1,
    ) -> None:
        """`text_encoder`: `build_bert` arguments of the text stream; `v_*`: the vision stream's sizes; `bi_*`: the
        co-attention layers'; co-attention layer k runs before text layer `t_biattention_id[k]` and vision layer
        `v_biattention_id[k]` (see the class docstring); `dropout`: vision stream and co-attention layers (the text
        stream uses `text_encoder.dropout`); `data_info["visual_dim"]`: the region-feature size."""
        super().__init__()
        visual_dim = region_feature_dim(data_info)
        text_encoder = dict(text_encoder or {})
        self.pretrained = text_encoder.get("pretrained")
        for key, size, heads in (
            ("model.encoder.v_hidden", v_hidden, v_heads),
            ("model.encoder.bi_hidden", bi_hidden, bi_heads),
        ):
            if size % heads:
                raise ConfigError(f"{key}={size} is not divisible by its number of heads ({heads})")
        # Text stream: a BERT (random or pretrained) whose embeddings and layers we run ourselves; ViLBERT has its
        # own pooler, so BERT's is not built.
        self.bert = build_bert(**{**text_encoder, "add_pooling_layer": False})
        t_config = self.bert.config
        self.text_hidden = self.text_size = t_config.hidden_size
        self.visual_hidden = self.visual_size = v_hidden
        self.pooled_hidden = self.pooled_size = bi_hidden
        check_biattention_ids(
            list(v_biattention_id), list(t_biattention_id), v_layers=v_num_layers, t_layers=t_config.num_hidden_layers
        )
        self.v_biattention_id = list(v_biattention_id)
        self.t_biattention_id = list(t_biattention_id)

        # Vision stream: BERT layers of its own size.
        v_config = bert_config(
            hidden_size=v_hidden,
            num_layers=v_num_layers,
            num_heads=v_heads,
            intermediate_size=v_intermediate,
            dropout=dropout,
        )
        v_config._attn_implementation = t_config._attn_implementation or "sdpa"
        self.image_embedding = ImageEmbedding(feat_dim=visual_dim, hidden=v_hidden, dropout=dropout)
        self.vision_layers = nn.ModuleList(BertLayer(v_config) for _ in range(v_num_layers))
        self.co_layers = nn.ModuleList(
            CoAttentionLayer(
                t_hidden=self.text_hidden,
                t_intermediate=t_config.intermediate_size,
                v_hidden=v_hidden,
                v_intermediate=v_intermediate,
                bi_hidden=bi_hidden,
                bi_heads=bi_heads,
                dropout=dropout,
            )
            for _ in self.v_biattention_id
        )
        # Poolers: ReLU(Linear) on [CLS] and on the global image token, fused by an element-wise product.
        self.text_pooler = nn.Sequential(nn.Linear(self.text_hidden, bi_hidden), nn.ReLU())
        self.image_pooler = nn.Sequential(nn.Linear(v_hidden, bi_hidden), nn.ReLU())
        self.fusion_dropout = nn.Dropout(0.1)
        for part in (self.image_embedding, self.vision_layers, self.co_layers, self.text_pooler, self.image_pooler):
            part.apply(partial(init_bert_weights, std=float(text_encoder.get("initializer_range", 0.02))))

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def pretrained_parameter_names(self) -> set[str]:
        """With `text_encoder.pretrained`, the text stream's embeddings and layers (lr x `pretrained_lr_mult`; the
        seed's `bert_weight_name`, x 0.1 in its pretraining only)."""
        return {f"bert.{name}" for name, _ in self.bert.named_parameters()} if self.pretrained else set()

    @property
    def text_layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        text = self.bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])  # (B,T,Ht)
        vision, vision_mask = self.image_embedding(
            batch["visual_feats"].to(text.dtype),
            batch["visual_boxes"],
            batch["visual_mask"],
            batch.get("visual_global"),
        )  # (B,R+1,Hv), (B,R+1)
        t_mask = additive_mask(batch["attention_mask"], text.dtype)
        v_mask = additive_mask(vision_mask, vision.dtype)

        t_next = v_next = 0  # the next layer of each stream to run
        for co_layer, v_id, t_id in zip(self.co_layers, self.v_biattention_id, self.t_biattention_id):
            for layer in self.text_layers[t_next:t_id]:  # end excluded: co-layer k runs before text layer t_id
                text = layer(text, t_mask)
            for layer in self.vision_layers[v_next:v_id]:
                vision = layer(vision, v_mask)
            t_next, v_next = t_id, v_id
            text, vision = co_layer(text, vision, t_mask, v_mask)
        for layer in self.vision_layers[v_next:]:
            vision = layer(vision, v_mask)
        for layer in self.text_layers[t_next:]:
            text = layer(text, t_mask)

        pooled = self.fusion_dropout(self.text_pooler(text[:, 0]) * self.image_pooler(vision[:, 0]))  # (B,Hb)
        return EncoderOutput(text=text, visual=vision, pooled=pooled, visual_prefix=1)


#: vl names of the LayerNorm weights that vilbert_beta names `...LayerNorm.weight` (BERT's and the vision stream's
#: layers keep the name; `vl.models.checkpoints` maps the others): its weight-decay rule matches these, not the
#: co-attention outputs' norms (`biOutput.LayerNorm1` / `LayerNorm2`, vl's `vision_out.norm` / `text_out.norm`)
SEED_LAYERNORM_WEIGHT = re.compile(
    r"(.*\.LayerNorm|encoder\.image_embedding\.norm|encoder\.co_layers\.\d+\.(text|vision)_ffn\.output\.norm"
    r"|objectives\.mlm\.transform\.2|objectives\.mrc\.head\.2)\.weight"
)
WEIGHT_DECAY_GROUPS = ("seed", "seed_scratch", "vl")


class VilbertSystem(VLSystem):
    """ViLBERT two-stream model + the data's objectives (MLM on text states, ITM/VQA on the fused pooled vector).

    With `text_encoder.pretrained` set (a BERT dir), the text stream and, where the dir has `cls.predictions.*`, the MLM
    head start from BERT (as upstream, whose `BertForMultiModalPreTraining.from_pretrained` fills `cls.predictions`;
    the decoder is tied to the word embeddings). The text stream's BERT parameters (embeddings + layers, the seed's
    `bert_weight_name` list) get lr x `pretrained_lr_mult`: 0.1 in the seed's pretraining (`train_concap.py`, set by
    `experiment=vilbert_pretrain`), 1.0 = one lr for all in its fine-tuning (`train_tasks.py`; the model default). The
    MLM head stays at the base lr even when it starts from BERT (the seed does not scale `cls.*`).
    `state_dict_path` loads a released `vilbert-multi-task` / `vilbert_beta` checkpoint (`pretrained_model.bin`,
    `multi_task_model.bin`, ...) through `vl.models.checkpoints.map_vilbert_key`: the seed's alignment head
    (`cls.bi_seq_relationship`, 0 = aligned) becomes the ITM head (1 = aligned); a state dict in vl's own naming
    (e.g. a saved `VilbertSystem.state_dict()`) loads unchanged, its ITM head included; a key with no counterpart is a
    `ConfigError` unless expected-unused (`VILBERT_EXPECTED_UNUSED`, or the head of an objective this run does not
    have). The `vilbert_*` recipes train with `vl.optimizers.BertAdam`, the seed's optimiser.
    """

    def __init__(self, *, state_dict_path: str | None = None, weight_decay_groups: str = "seed", **kwargs: Any) -> None:
        """`state_dict_path`: a released checkpoint (see the class docstring). `weight_decay_groups`: which
        parameters get `model.optimizer.weight_decay`. "seed" (default): vilbert_beta's (`train_tasks.py`, and
        `train_concap.py` when it starts from BERT, the published pretraining): its `no_decay` list ("bias",
        "LayerNorm.bias", "LayerNorm.weight") is matched the wrong way round, so every bias and the weights of the
        LayerNorms it names `LayerNorm` (`SEED_LAYERNORM_WEIGHT`) decay and nothing else does. "seed_scratch":
        `train_concap.py` without `--from_pretrained` (pretraining from scratch, vilbert_beta and vilbert-multi-task
        alike): the same list matched the right way round, so everything decays but the biases and those `LayerNorm`
        weights; the co-attention outputs' norm weights (`biOutput.LayerNorm1` / `LayerNorm2`, vl's `vision_out.norm`
        / `text_out.norm`) decay. "vl": the AdamW convention, every weight matrix but no bias / norm (no 1-d parameter
        decays: close to "seed_scratch", not the seed's rule; `experiment=vilbert_pretrain_tiny` was calibrated with
        it). The rest: `VLSystem`'s."""
        if weight_decay_groups not in WEIGHT_DECAY_GROUPS:
            raise ConfigError(f"model.weight_decay_groups: '{weight_decay_groups}' is not one of {WEIGHT_DECAY_GROUPS}")
        self.weight_decay_groups = weight_decay_groups
        super().__init__(**kwargs)
        self._pretrained_head: dict[str, torch.Tensor] = {}
        pretrained = getattr(self.encoder, "pretrained", None)
        if pretrained and "mlm" in self.objectives and not self.init_from:
            self._pretrained_head = load_bert_mlm_head(self, pretrained)
        if state_dict_path:
            self.load_released_state_dict(state_dict_path)

    def decays(self, name: str, param: nn.Parameter) -> bool:
        """`weight_decay_groups` (see `__init__`): "seed": a bias or a `SEED_LAYERNORM_WEIGHT`; "seed_scratch":
        anything else; "vl": `VLSystem`'s."""
        if self.weight_decay_groups in ("seed", "seed_scratch"):
            seed_no_decay = "bias" in name or SEED_LAYERNORM_WEIGHT.fullmatch(name) is not None  # the seed's list hit
            return seed_no_decay if self.weight_decay_groups == "seed" else not seed_no_decay
        return super().decays(name, param)

    def load_released_state_dict(self, path: str) -> dict[str, list[str]]:
        """Load a released ViLBERT checkpoint (see the class docstring); returns the key report."""
        state = read_state_dict(path)
        head = "vcr" if "vcr" in self.objectives else "retrieval"
        map_key = partial(map_vilbert_key, multiple_choice_head=head)
        # heads of objectives this run does not train (e.g. the pretraining heads when fine-tuning) are not an error
        absent = [
            re.escape(key)
            for key in state
            if (new := map_key(key)) is not None
            and new.startswith("objectives.")
            and new.split(".")[1] not in self.objectives
        ]
        return load_mapped_state_dict(
            self,
            state,
            map_key,
            what=f"ViLBERT checkpoint {path}",
            expected_unused=(*VILBERT_EXPECTED_UNUSED, *absent),
            transforms=seed_itm_transform(state),
        )
