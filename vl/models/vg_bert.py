"""VG-BERT (`model=vg_bert`, `model=vg_bert_tiny`; spec: vg_bert.md): a VGG16 + spatial self-attention visual stream
and a BERT language stream, trained by cross-modal contrastive grounding (stage 2), relational grounding (stage 3)
and transferred to retrieval with projection heads.

Encoder (`VGBertEncoder`, `stage`: "grounding" | "relational" | "transfer"):
  - visual stream `VGGAttention` (`vl.models.vgg`): VGG16 features without the last pool (14 x 14 x 512 at 224 px) ->
    Conv1x1 512 -> 768 -> one spatial self-attention block (12 heads, learned 196-cell position embedding, ReLU FFN
    3072, post-LN) -> (B, 768, 14, 14), flattened row-major to (B, 196, 768). `vgg_weights`: a local torchvision
    VGG16 state dict (key report); random init otherwise.
  - language stream: BERT (`text_encoder`; hidden and attention dropout = `dropout_rate`, 0.3 in stage 2), segment
    ids **all 1** for every text input (`segment_id`), whatever the collator made.
  - "grounding" (stage 2, `TwoStreamPretrain`): visual -> `image_projection_head` Conv1x1 768 -> 768; text = last
    hidden states -> `language_projection_head` Linear 768 -> 768. EncoderOutput(text (B, T, H), visual (B, P, H)).
  - "relational" (stage 3): each object phrase `[CLS] phrase [SEP]` (<= 10 tokens, <= 32 objects; batch keys
    object_ids / object_token_mask (B, N, L), object_mask (B, N)) -> BERT -> hidden x token mask -> **mean over all L
    positions** (divides by L = 10, not by the token count, as the seed's `Bert_object`; `object_pool: tokens`
    divides by the token count instead) -> x object mask. Then `cross_attention` (8 heads x 96): the objects'
    queries (Linear without bias) attend over the 196 visual keys (Linear without bias) and values -> the object
    states (B, N, 768) = EncoderOutput.text. The seed adds its object mask along the *query* axis of the scores,
    which leaves every softmax over the visual keys unchanged; vl applies none (the same numbers). BERT runs only on
    real objects (padded phrases are multiplied by 0 in the seed: the same result).
  - "transfer": caption -> BERT -> `cross_attention.query_language` (text); visual -> `cross_attention.key_visual`
    (visual); the projection heads are the `vg_transfer` head's.
  - Freezing (parameter groups: `requires_grad`; logged as trainable / frozen counts): the VGG convs
    (`freeze_vgg`, default true); BERT except its last `learnable_layers` layers (8 in stage 2, 2 in stage 3; its
    embeddings always frozen); `freeze_qk` (default true) freezes query and key of **all** BERT layers;
    `freeze_encoder` (transfer) freezes the whole encoder.

System (`VGBertSystem`): Adam (lr 5e-5, betas (0.95, 0.999), weight decay 5e-7 on every trainable parameter, as the
seed's) and the seed's step decay: lr x `lr_ratio` (0.5) every `lr_decay_epochs` (15; 30 in transfer) epochs,
counting epochs from 1 as the seed does (the first halving applies in the 15th epoch). The shared system's
`scheduler`, `head_lr` and `pretrained_lr_mult` have no place in this recipe: set, they are a `ConfigError`. Every
VG-BERT loss is a softmax over the negatives of the whole batch (stage 2, the stage-3 pair term, transfer; gathered
across ranks under DDP), so the published recipes put the whole batch on one device (`data.batch_size_per_device` =
`data.batch_size`) and a fit with gradient accumulation is refused (`setup`) unless `micro_batch_negatives: true`
(each micro-batch's own negatives: a deliberate difference). Note: the seed's DataParallel computes its loss inside
each replica, so with G GPUs its negatives were batch / G; vl follows the spec (one loss over the batch).
`init_from` also reads the seed's files (`load_init_checkpoint`: the stage-2/3 `best_model.pth`, and the stage-1
ImageNet model -> the visual stream); a file that loads nothing is a `ConfigError`. Model selection: the data
module's monitor (lowest `val/loss` in stage 2). Validation / test also rank the whole split (images <-> captions)
with the head's similarity and log `r1_i2t`, `r5_i2t`, `r10_i2t`, `r1_t2i`, ... (`r*_mean` the average of both
directions).

Two bugs of the seed's code are fixed, not copied: `TransferCrossModalRetrieval` unpacks 7 outputs from
`CrossAttention`'s 5-tuple (vl's transfer reads the query / key projections directly), and the transfer script's
`validate` calls the class `TransferCrossModalRetrieval(...)` instead of the model (vl validates the model).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from vl.batch import EncoderOutput
from vl.errors import ConfigError
from vl.heads.vg_bert import GroundingContrastive, RelationalGrounding, TransferRetrieval
from vl.models.bert_backbone import build_bert
from vl.models.checkpoints import load_vg_bert_seed, vg_bert_seed_layout
from vl.models.ranking import recall_at_k
from vl.models.system import VLSystem
from vl.models.vg_bert_retrieval import VGBertSplitRetrieval
from vl.models.vgg import VGG16_CFG, VGGAttention, load_vgg_features
from vl.optimizers import build_optimizer

log = logging.getLogger(__name__)

__all__ = [
    "VGBertEncoder",
    "VGBertSystem",
    "CrossAttention",
    "GroundingContrastive",
    "RelationalGrounding",
    "TransferRetrieval",
    "object_pool",
    "recall_at_k",
]

STAGES = ("grounding", "relational", "transfer")


def object_pool(hidden: torch.Tensor, token_mask: torch.Tensor, how: str = "all_positions") -> torch.Tensor:
    """(n, L, H), (n, L) -> (n, H): hidden x token mask, then the mean over all L positions ("all_positions", the
    seed's `torch.mean(..., dim=1)`: divides by L) or over the real tokens ("tokens")."""
    masked = hidden * token_mask.unsqueeze(-1).to(hidden.dtype)
    if how == "all_positions":
        return masked.mean(1)
    return masked.sum(1) / token_mask.sum(1, keepdim=True).clamp(min=1).to(hidden.dtype)


class CrossAttention(nn.Module):
    """Language queries (no bias) over visual keys (no bias) and values: (B, N, H), (B, P, H) -> (B, N, H)."""

    def __init__(self, *, hidden_size: int = 768, num_heads: int = 8) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"model.encoder.cross_heads={num_heads} does not divide hidden size {hidden_size}")
        self.num_heads, self.head_size = num_heads, hidden_size // num_heads
        self.key_visual = nn.Linear(hidden_size, hidden_size, bias=False)
        self.value_visual = nn.Linear(hidden_size, hidden_size)
        self.query_language = nn.Linear(hidden_size, hidden_size, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, visual: torch.Tensor, language: torch.Tensor) -> torch.Tensor:
        q, k = self._heads(self.query_language(language)), self._heads(self.key_visual(visual))
        v = self._heads(self.value_visual(visual))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(self.head_size)).softmax(-1)
        b, _, n, _ = q.shape
        return (probs @ v).transpose(1, 2).reshape(b, n, -1)


def _set_dropout(bert: nn.Module, rate: float) -> None:
    for module in bert.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
    bert.config.hidden_dropout_prob = rate
    bert.config.attention_probs_dropout_prob = rate


class VGBertEncoder(nn.Module):
    """`forward(batch) -> EncoderOutput` (module docstring); `stage` picks the modules and the output."""

    visual_input = "grid"

    def __init__(
        self,
        *,
        data_info: dict[str, Any],
        stage: str = "grounding",
        text_encoder: dict[str, Any] | None = None,
        dropout_rate: float = 0.3,
        vgg_cfg: list[Any] | None = None,
        vgg_weights: str | None = None,
        visual_heads: int = 12,
        visual_intermediate_size: int = 3072,
        num_positions: int = 196,
        visual_dropout: float | None = None,
        cross_heads: int = 8,
        segment_id: int = 1,
        object_pool: str = "all_positions",
        freeze_vgg: bool = True,
        learnable_layers: int = 8,
        freeze_qk: bool = True,
        freeze_encoder: bool = False,
    ) -> None:
        """`vgg_cfg`: the VGG layer list (default VGG16's; smaller widths for CPU-size models); `visual_dropout`:
        the attention block's dropout (default `dropout_rate`, as the seed passes one rate to both streams)."""
        super().__init__()
        if stage not in STAGES:
            raise ConfigError(f"model.encoder.stage: '{stage}' is not one of {', '.join(STAGES)}")
        if not data_info.get("pixels"):
            raise ConfigError(
                "model: VG-BERT reads images (pixel_values), but this data module provides none; use "
                "data=vg_bert_coco or data=vg_bert_vg"
            )
        objects = "num_relations" in data_info  # the VG data module (objects + relations) says so
        if (stage == "relational") != objects:
            want = (
                "data=vg_bert_vg (objects and relations)" if stage == "relational" else "data=vg_bert_coco (captions)"
            )
            raise ConfigError(f"model.encoder.stage={stage} reads {want}; this data module provides the other kind")
        if object_pool not in ("all_positions", "tokens"):
            raise ConfigError(f"model.encoder.object_pool: '{object_pool}' is not 'all_positions' or 'tokens'")
        self.stage, self.segment_id, self.object_pool = stage, segment_id, object_pool
        self.pretrained = (text_encoder or {}).get("pretrained")
        self.bert = build_bert(**{**(text_encoder or {}), "dropout": dropout_rate, "add_pooling_layer": False})
        _set_dropout(self.bert, dropout_rate)
        hidden = self.bert.config.hidden_size
        self.visual = VGGAttention(
            cfg=list(vgg_cfg) if vgg_cfg is not None else VGG16_CFG,
            hidden_size=hidden,
            num_heads=visual_heads,
            intermediate_size=visual_intermediate_size,
            num_positions=num_positions,
            dropout=dropout_rate if visual_dropout is None else visual_dropout,
        )
        self.vgg_report = load_vgg_features(self.visual.vgg, vgg_weights) if vgg_weights else None
        if stage == "grounding":
            self.image_projection_head = nn.Conv2d(hidden, hidden, kernel_size=1)
            self.language_projection_head = nn.Linear(hidden, hidden)
        else:
            self.cross_attention = CrossAttention(hidden_size=hidden, num_heads=cross_heads)
        self.hidden_size = self.pooled_size = self.text_size = self.visual_size = hidden
        self.freeze(freeze_vgg, learnable_layers, freeze_qk, freeze_encoder)

    # ------------------------------------------------------------------ freezing
    def freeze(self, freeze_vgg: bool, learnable_layers: int, freeze_qk: bool, freeze_encoder: bool) -> None:
        layers = self.bert.encoder.layer
        if not 0 <= learnable_layers <= len(layers):
            raise ConfigError(
                f"model.encoder.learnable_layers={learnable_layers}: BERT has {len(layers)} layers (0..{len(layers)})"
            )
        self.bert.requires_grad_(False)
        for layer in layers[len(layers) - learnable_layers :]:
            layer.requires_grad_(True)
        if freeze_qk:
            for layer in layers:
                layer.attention.self.query.requires_grad_(False)
                layer.attention.self.key.requires_grad_(False)
        if freeze_vgg:
            self.visual.vgg.requires_grad_(False)
        if freeze_encoder:
            self.requires_grad_(False)
        self.frozen = {"vgg": bool(freeze_vgg), "encoder": bool(freeze_encoder)}
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        self.parameter_counts = {"trainable": trainable, "frozen": frozen}
        log.info(
            "VG-BERT encoder (%s): %d trainable, %d frozen parameters (BERT: last %d of %d layers learnable, "
            "Q/K frozen: %s; VGG convs frozen: %s; whole encoder frozen: %s)",
            self.stage,
            trainable,
            frozen,
            learnable_layers,
            len(layers),
            freeze_qk,
            freeze_vgg,
            freeze_encoder,
        )

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def pretrained_parameter_names(self) -> set[str]:
        names = {f"bert.{n}" for n, _ in self.bert.named_parameters()} if self.pretrained else set()
        if self.vgg_report is not None:
            names |= {f"visual.vgg.{n}" for n in self.vgg_report["loaded"]}
        return names

    # ------------------------------------------------------------------ streams
    def visual_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, hidden, H/16, W/16)."""
        return self.visual(pixel_values)

    def language(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """BERT's last hidden states with every segment id = `segment_id` (1)."""
        segments = torch.full_like(input_ids, self.segment_id)
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=segments).last_hidden_state

    def encode_objects(
        self, object_ids: torch.Tensor, token_mask: torch.Tensor, object_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, N, L) phrases -> (B, N, H) (`Bert_object`): pooled (`object_pool`), x object mask; BERT runs on the
        real objects only."""
        b, n, length = object_ids.shape
        out = torch.zeros(b, n, self.hidden_size, device=object_ids.device, dtype=self.word_embeddings.weight.dtype)
        real = object_mask.bool()
        if bool(real.any()):
            hidden = self.language(object_ids[real], token_mask[real])
            out[real] = object_pool(hidden, token_mask[real], self.object_pool).to(out.dtype)
        return out * object_mask.unsqueeze(-1).to(out.dtype)

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        grid = self.visual_grid(batch["pixel_values"])
        if self.stage == "grounding":
            visual = self.image_projection_head(grid).flatten(2).transpose(1, 2)  # (B, P, H)
            text = self.language_projection_head(self.language(batch["input_ids"], batch["attention_mask"]))
            mask = batch["attention_mask"].unsqueeze(-1).to(text.dtype)
            return EncoderOutput(text=text, visual=visual, pooled=(text * mask).sum(1) / mask.sum(1).clamp(min=1))
        flat = grid.flatten(2).transpose(1, 2)  # (B, P, H)
        if self.stage == "relational":
            objects = self.encode_objects(batch["object_ids"], batch["object_token_mask"], batch["object_mask"])
            states = self.cross_attention(flat, objects)
            return EncoderOutput(text=states, visual=flat, pooled=states.mean(1))
        text = self.cross_attention.query_language(self.language(batch["input_ids"], batch["attention_mask"]))
        visual = self.cross_attention.key_visual(flat)
        return EncoderOutput(text=text, visual=visual, pooled=text.mean(1))


class VGBertSystem(VGBertSplitRetrieval, VLSystem):
    """The shared system with VG-BERT's optimiser / schedule and whole-split retrieval ranks (module docstring)."""

    SYSTEM_NAME = "VG-BERT"
    SEED_HEAD_INIT = "torch"  # the seed's heads are plain modules with PyTorch's default init (`model.head_init`)
    _ONE_LR = "one lr for every trainable parameter, the seed's step decay model.lr_decay_epochs / model.lr_ratio"
    UNREAD_OPTIONS = {"scheduler": _ONE_LR, "head_lr": _ONE_LR, "pretrained_lr_mult": _ONE_LR}

    #: objectives whose loss couples the examples of a batch (softmax over the batch's negatives)
    BATCH_LEVEL_OBJECTIVES = ("vg_contrastive", "vg_transfer", "vg_relational")
    #: whether `model.init_from` held cross-attention weights (set by `load_init_checkpoint`)
    _cross_attention_loaded = True

    def __init__(
        self,
        *,
        lr_decay_epochs: int = 15,
        lr_ratio: float = 0.5,
        micro_batch_negatives: bool = False,
        **kwargs: Any,
    ) -> None:
        """`lr_decay_epochs` / `lr_ratio`: lr x lr_ratio every lr_decay_epochs epochs (the seed's `--lr-decay 15
        --lr-ratio 0.5`); the optimiser is `model.optimizer` (Adam, betas (0.95, 0.999), wd 5e-7), one lr for every
        trainable parameter as the seed's: the shared system's `scheduler`, `head_lr` and `pretrained_lr_mult` are
        not VG-BERT's and are refused when set. `micro_batch_negatives`: accept gradient accumulation
        (data.batch_size_per_device x devices < data.batch_size), under which each contrastive softmax (stage 2,
        the stage-3 pair term, transfer) sees the negatives of one micro-batch only (a deliberate difference: the
        published losses are over the whole batch; default false refuses it at fit time)."""
        self.lr_decay_epochs, self.lr_ratio = int(lr_decay_epochs), float(lr_ratio)
        self.micro_batch_negatives = bool(micro_batch_negatives)
        super().__init__(**kwargs)
        self._warn_frozen_at_random(bool(kwargs.get("init_from")))
        own = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info(
            "VG-BERT system: %d trainable parameters (heads included), %d frozen",
            own,
            sum(p.numel() for p in self.parameters() if not p.requires_grad),
        )

    def _warn_frozen_at_random(self, initialised: bool) -> None:
        """Frozen weights nothing loaded stay at their random init for the whole run: the seed always starts its frozen
        parts from trained weights (ImageNet VGG16; its stage-2/3 model for transfer). One warning naming the keys."""
        frozen = getattr(self.encoder, "frozen", {})
        if initialised:
            if frozen.get("encoder") and self.encoder.stage == "transfer" and not self._cross_attention_loaded:
                log.warning(
                    "model.init_from has no cross-attention weights (a stage-2 checkpoint): the frozen "
                    "encoder.cross_attention.query_language / key_visual that transfer retrieval scores with stay at "
                    "their random initialisation; the published transfer starts from the stage-3 model"
                )
            return
        if frozen.get("encoder"):
            log.warning(
                "model.encoder.freeze_encoder=true without model.init_from: the whole encoder stays at its random "
                "initialisation (the seed's transfer starts from its stage-2/3 model); only the heads train"
            )
        elif frozen.get("vgg") and getattr(self.encoder, "vgg_report", None) is None:
            log.warning(
                "model.encoder.freeze_vgg=true without model.encoder.vgg_weights or model.init_from: the frozen VGG "
                "convs stay random (the seed starts from ImageNet VGG16 weights)"
            )

    def load_init_checkpoint(self, path: str) -> None:
        """vl checkpoints as the shared system loads them; a state dict of the seed (`vg_bert_seed_layout`: the stage-2/3
        `best_model.pth`: keys `image_model.image_model.*`, `language_model.language_model.*`, ...; or the stage-1
        ImageNet model, bare as `best_model.pth` or in `checkpoint.pth.tar`'s {"state_dict", "arch", ...}: keys
        `image_model.<i>.*` (VGG features), `embedder.*`, `attention.*`, `classifier.*`) is mapped to vl's names and
        loaded with the key report (`vl.models.checkpoints.load_vg_bert_seed`). A file none of whose tensors lands in
        this model is a `ConfigError`."""
        from vl.checkpoint import load_torch_file

        state = load_torch_file(path, "model.init_from")
        inner = state.get("state_dict", state) if isinstance(state, dict) else state
        # vl's `encoder.cross_attention.*` or the seed's `cross_attention_model.*` (stage 3 and transfer have them)
        self._cross_attention_loaded = isinstance(inner, dict) and any("cross_attention" in k for k in inner)
        own = self.state_dict()
        layout = vg_bert_seed_layout(inner) if isinstance(inner, dict) else None
        if layout is None:
            super().load_init_checkpoint(path)
            if isinstance(inner, dict) and not any(
                k in own and isinstance(v, torch.Tensor) and v.numel() == own[k].numel() for k, v in inner.items()
            ):
                raise ConfigError(
                    f"model.init_from: '{path}' loaded nothing: none of its {len(inner)} keys is a parameter of "
                    f"this {type(self).__name__} (neither a vl checkpoint of it nor a seed state dict; torchvision "
                    "VGG16 weights go to model.encoder.vgg_weights)"
                )
            return
        load_vg_bert_seed(self, inner, layout, path)

    def setup(self, stage: str) -> None:
        """At fit time: refuse gradient accumulation under a batch-level contrastive objective unless
        `micro_batch_negatives` (the loss of one optimiser step must be the softmax over the whole batch)."""
        super().setup(stage)
        if stage != "fit" or self.micro_batch_negatives:
            return
        accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)
        coupled = [name for name in self.objectives if name in self.BATCH_LEVEL_OBJECTIVES]
        if accumulate > 1 and coupled:
            dm = getattr(self.trainer, "datamodule", None)
            per_device, batch = getattr(dm, "batch_size_per_device", "?"), getattr(dm, "batch_size", "?")
            raise ConfigError(
                f"trainer.accumulate_grad_batches={accumulate} (data.batch_size={batch} / "
                f"data.batch_size_per_device={per_device} x devices): {', '.join(coupled)} would take its negatives "
                "from each micro-batch, not the whole batch; set data.batch_size_per_device=data.batch_size / devices, "
                "or model.micro_batch_negatives=true to accept micro-batch negatives"
            )

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        cfg = dict(self.optimizer_cfg)
        group = {"params": params, "weight_decay": float(cfg.get("weight_decay", 0.0)), "name": "trainable"}
        optimizer = build_optimizer(cfg, [group])
        decay, ratio = max(1, self.lr_decay_epochs), self.lr_ratio
        scheduler = LambdaLR(optimizer, lambda epoch: ratio ** ((epoch + 1) // decay))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        total = super().shared_step(batch, stage)
        if "vg_relational" in self.objectives and hasattr(self.objectives["vg_relational"], "last_parts"):
            for part, value in self.objectives["vg_relational"].last_parts.items():
                if stage == "train":
                    self.log_step_value(f"train/vg_{part}_loss", value, batch_size=batch["index"].shape[0])
                else:
                    self.log(f"{stage}/vg_{part}_loss", value, batch_size=batch["index"].shape[0], sync_dist=True)
        self.store_retrieval_embeddings(batch, stage)
        return total
