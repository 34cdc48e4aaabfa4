"""MM-BERT (`model=mm_bert`, `model=mm_bert_tiny`): VL-BERT base, single stream, made multilingual (phaedonmit/VL-BERT;
spec `mm_bert.md`).

The sequence of one example is ``[CLS] EN [SEP] DE [SEP] [IMG]x(R+1) [END]``, compacted per row (the row's valid text
tokens, then its valid regions, then [END], then padding):

- the whole-image box ``[0, 0, w-1, h-1]`` is prepended to the regions; its 2048-d feature is the mean of the region
  features, recomputed over the regions that are not masked for MVRC (``mvrc_replace``);
- every region (image box included): ``coordinate_embeddings`` of (xc, yc, w, h) / image size x 100, sin/cos with
  ``coord_dim`` 256 and base 1000 -> 4 x 512 = 2048-d, concatenated with the feature ->
  ``obj_downsample`` = Dropout(0.1)-Linear(4096 -> H)-ReLU;
- text tokens: word embedding + ``visual_ln_text``(image-box rep); rows without an image get no regions and, as the
  seed: rows of the aux text corpus (``aux_text`` True, the aux collator's batches) ``visual_ln_text``
  (``aux_text_visual_embedding``) (the seed's ``ResNetVLBERTForPretrainingMultitask``), the other text-only rows
  (Task C's parallel pairs, MT without vision) ``visual_ln_text``(0), i.e. the LayerNorm's bias alone (the seed's
  ``ResNetVLBERTForPretrainingTaskC`` / MT ``...NoVision`` feed zeros as their text visual embeddings);
- region tokens: ``object_linguistic_embeddings`` (one learned [IMG] vector; ``object_mask_word_embedding`` for MVRC-
  masked regions, whose feature is ``object_mask_visual_embedding``, init 0) + ``visual_ln_object``(region rep);
- [END]: the learned ``end_embedding``, after the regions in every row (also a text-only row, as VL-BERT's
  ``embedding``: [END] then directly follows the text, at position n+1);
- token types: all text 0 (EN and DE alike), regions and [END] 2; positions: text 0..n-1, every region n, [END] n+1;
- then BERT's embedding LayerNorm + dropout and the BERT encoder. ``visual_ln_*`` are LayerNorms with weight 0 at init
  (``visual_scale_*_init`` 0: the visual contribution starts at 0).

`MMBertSystem` adds what is special to the system: the "hybrid" init (encoder and word embeddings from an M-BERT dir,
the listed visual parts from a VL-BERT checkpoint, every missing / unexpected key logged), lr = base lr x total batch
size (``lr_per_example``), and retrieval scores from the 1-logit ITM head; its test stage (MT decoding and BLEU, the
exhaustive retrieval test) is `vl.models.mm_bert_test_stage.MMBertTestStage`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vl.batch import EncoderOutput, region_feature_dim
from vl.heads.mm_bert import BinaryImageTextMatching  # noqa: F401  (registers the MM-BERT heads)
from vl.models.bert_backbone import build_bert
from vl.models.checkpoints import load_hybrid_init
from vl.models.mm_bert_test_stage import MMBertTestStage
from vl.models.system import VLSystem

log = logging.getLogger(__name__)

#: token type of text (EN and DE alike) and of regions / [END]
TEXT_TYPE, OBJECT_TYPE = 0, 2


def coordinate_embeddings(boxes: torch.Tensor, dim: int = 256, base: float = 1000.0) -> torch.Tensor:
    """(..., 4) normalised x1y1x2y2 (box / image size) -> (..., 4 * 2 * dim): (xc, yc, w, h) x 100, each embedded as
    [sin(p / base^(k/dim)), cos(...)] for k = 0..dim-1 (VL-BERT's `coordinate_embeddings`)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    pos = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1) * 100.0  # (..., 4)
    dim_mat = base ** (torch.arange(dim, dtype=boxes.dtype, device=boxes.device) / dim)
    angles = pos.unsqueeze(-1) / dim_mat  # (..., 4, dim)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def whole_image_box(batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
    """(B, 4) normalised box of the whole image [0, 0, w-1, h-1] / (w, h) (``visual_image_size`` (B, 2) = w, h);
    [0, 0, 1, 1] when the batch has no image sizes (`Multi30kCollator` and its `visual_batch`, the retrieval gallery's
    images, always give them)."""
    bsz = like.shape[0]
    box = torch.zeros(bsz, 4, dtype=like.dtype, device=like.device)
    size = batch.get("visual_image_size")
    if size is None:
        box[:, 2:] = 1.0
    else:
        size = size.to(like.dtype)
        box[:, 2:] = (size - 1.0) / size
    return box


class MMBertEncoder(nn.Module):
    """`forward(batch) -> EncoderOutput(text (B,T,H), visual (B,1+R,H), pooled (B,H), visual_prefix=1)`: ``visual[:,
    0]`` is the whole-image box, ``visual[:, 1:]`` the batch's regions.

    Batch keys: input_ids, attention_mask (B,T) (``[CLS] EN [SEP] DE [SEP]``; token_type_ids are ignored: all text is
    type 0); visual_feats (B,R,D), visual_boxes (B,R,4) normalised x1y1x2y2, visual_mask (B,R) (valid regions first);
    optional visual_image_size (B,2), has_image (B,) bool (False: a text-only row), aux_text (B,) bool (a row of the
    aux text corpus: its text visual embedding is the learned aux one; other text-only rows get zeros), mvrc_replace
    (B,R) bool (regions whose feature and [IMG] embedding are replaced by the mask embeddings).

    ``blank_vision`` (False; the seed's ``ResNetVLBERTForPretrainingTranslationNoVision`` and MLT's
    ``...MultitaskNoVision``, `experiment=mm_bert_translation_no_vision`, `mm_bert_mlt_no_vision`): every text token's visual embedding is the learned aux text one and every region's
    input embedding is zero (its feature and its [IMG] embedding alike, so a region is ``visual_ln_object``(0), the
    LayerNorm's bias), while the regions (whole-image box included) stay attended positions of type 2 as with vision:
    the row's number of boxes is all that is left of its image."""

    visual_input = "regions"

    def __init__(
        self,
        *,
        data_info: dict[str, Any],
        text_encoder: dict[str, Any] | None = None,
        with_pooler: bool = True,
        coord_dim: int = 256,
        coord_base: float = 1000.0,
        visual_dropout: float = 0.1,
        visual_scale_init: float = 0.0,
        blank_vision: bool = False,
    ) -> None:
        """`text_encoder`: `build_bert` arguments (type_vocab_size is 3; vocab_size = data_info["vocab_size"], the
        tokenizer's with [STOP], when given; `pretrained`: a BERT dir, widened to 3 types and that vocabulary). `with_pooler`: BERT's pooler on [CLS] (retrieval / MLT heads); False:
        pooled = the [CLS] state (pretraining). `visual_scale_init`: init of the visual LayerNorms' weight (0)."""
        super().__init__()
        visual_dim = region_feature_dim(data_info)
        options = dict(text_encoder or {})
        options.pop("add_pooling_layer", None)  # `with_pooler` decides
        vocab_size = int(data_info.get("vocab_size", options.pop("vocab_size", 30522)))
        options.pop("vocab_size", None)
        options.pop("type_vocab_size", None)  # MM-BERT has 3 token types
        self.with_pooler = with_pooler
        self.blank_vision = bool(blank_vision)
        if options.get("pretrained"):  # a BERT dir (M-BERT: prefer the hybrid init, `model.mbert_dir`)
            self.bert = build_bert(pretrained=options["pretrained"], add_pooling_layer=with_pooler)
            self._widen(vocab_size)
        else:
            self.bert = build_bert(**options, vocab_size=vocab_size, type_vocab_size=3, add_pooling_layer=with_pooler)
        hidden = self.bert.config.hidden_size
        self.hidden_size = self.pooled_size = self.text_size = self.visual_size = hidden
        self.coord_dim, self.coord_base = coord_dim, coord_base
        self.obj_downsample = nn.Sequential(
            nn.Dropout(visual_dropout), nn.Linear(visual_dim + 4 * 2 * coord_dim, hidden), nn.ReLU()
        )
        eps = self.bert.config.layer_norm_eps
        self.visual_ln_text = nn.LayerNorm(hidden, eps=eps)
        self.visual_ln_object = nn.LayerNorm(hidden, eps=eps)
        nn.init.constant_(self.visual_ln_text.weight, visual_scale_init)
        nn.init.constant_(self.visual_ln_object.weight, visual_scale_init)
        std = self.bert.config.initializer_range
        self.object_linguistic_embeddings = nn.Embedding(1, hidden)
        self.object_mask_word_embedding = nn.Embedding(1, hidden)
        self.end_embedding = nn.Embedding(1, hidden)
        self.aux_text_visual_embedding = nn.Embedding(1, hidden)
        for emb in (self.object_linguistic_embeddings, self.object_mask_word_embedding, self.end_embedding):
            nn.init.normal_(emb.weight, std=std)
        nn.init.normal_(self.aux_text_visual_embedding.weight, std=std)
        self.object_mask_visual_embedding = nn.Embedding(1, visual_dim)
        nn.init.zeros_(self.object_mask_visual_embedding.weight)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def _widen(self, vocab_size: int) -> None:
        """A loaded BERT gets MM-BERT's 3 token types (the new rows copy type 0) and at least `vocab_size` words (new
        rows, e.g. [STOP], keep BERT's init)."""
        emb = self.bert.embeddings
        if emb.token_type_embeddings.num_embeddings < 3:
            old = emb.token_type_embeddings.weight.data
            types = nn.Embedding(3, old.shape[1])
            types.weight.data[: old.shape[0]] = old
            types.weight.data[old.shape[0] :] = old[0]
            emb.token_type_embeddings = types
            self.bert.config.type_vocab_size = 3
        if emb.word_embeddings.num_embeddings < vocab_size:
            self.bert.resize_token_embeddings(vocab_size)
        self.bert.train()

    # ------------------------------------------------------------------ pieces (also used by the tests)
    def region_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (B,1+R,D) with the image box's mean feature first and MVRC-replaced features swapped for the mask
        embedding, boxes (B,1+R,4), valid (B,1+R) bool, replaced (B,1+R) bool)."""
        feats = batch["visual_feats"]
        bsz, n_regions = feats.shape[:2]
        has_image = batch.get("has_image")
        has_image = torch.ones(bsz, dtype=torch.bool, device=feats.device) if has_image is None else has_image.bool()
        valid = batch["visual_mask"].bool() & has_image[:, None]
        replace = batch.get("mvrc_replace")
        replace = torch.zeros_like(valid) if replace is None else replace.bool() & valid
        mean_mask = batch.get("image_mean_mask")  # set by the collator's joint truncation (before it)
        kept = (valid & ~replace) if mean_mask is None else (mean_mask.bool() & has_image[:, None])
        kept = kept.unsqueeze(-1).to(feats.dtype)
        image_feat = (feats * kept).sum(1) / kept.sum(1).clamp(min=1.0)  # mean of the unmasked regions
        feats = torch.where(replace.unsqueeze(-1), self.object_mask_visual_embedding.weight[0].to(feats.dtype), feats)
        feats = torch.cat([image_feat.unsqueeze(1), feats], dim=1)
        boxes = torch.cat([whole_image_box(batch, feats).unsqueeze(1), batch["visual_boxes"].to(feats.dtype)], dim=1)
        valid = torch.cat([has_image.unsqueeze(1), valid], dim=1)
        replace = torch.cat([torch.zeros_like(has_image).unsqueeze(1), replace], dim=1)
        return feats, boxes, valid, replace

    def object_reps(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B,N,D), (B,N,4) -> (B,N,H): obj_downsample(coordinate embedding ++ feature), coordinates first as in
        VL-BERT's ``fast_rcnn.py`` (so a loaded ``obj_downsample.1.weight`` reads its first 4 x 2 x coord_dim columns
        as the box embedding)."""
        coords = coordinate_embeddings(boxes, self.coord_dim, self.coord_base).to(feats.dtype)
        return self.obj_downsample(torch.cat([coords, feats], dim=-1))

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        input_ids, text_mask = batch["input_ids"], batch["attention_mask"].bool()
        bsz, text_len = input_ids.shape
        device = input_ids.device
        words = self.word_embeddings(input_ids)  # (B,T,H)
        if "visual_feats" in batch:
            feats, boxes, obj_valid, replace = self.region_inputs(batch)
            reps = self.object_reps(feats, boxes)  # (B,1+R,H)
            has_image = obj_valid[:, 0]
        else:  # a text-only batch
            reps = words.new_zeros(bsz, 1, words.shape[-1])
            obj_valid = replace = torch.zeros(bsz, 1, dtype=torch.bool, device=device)
            has_image = obj_valid[:, 0]
        # text-only rows: the aux corpus's rows the learned aux embedding, the others (Task C, MT without vision) zeros,
        # so visual_ln_text leaves its bias (the seed); torch.where keeps the aux embedding in the graph (zero gradient)
        aux_rows = batch.get("aux_text")
        aux_rows = torch.zeros_like(has_image) if aux_rows is None else aux_rows.to(device).bool()
        aux = self.aux_text_visual_embedding.weight[0].to(reps.dtype)
        if self.blank_vision:  # the seed's no-vision modules: the aux embedding for every row's text
            aux_rows = torch.ones_like(has_image)
            has_image = torch.zeros_like(has_image)
        text_only = torch.where(aux_rows[:, None], aux, torch.zeros_like(reps[:, 0]))
        text_visual = self.visual_ln_text(torch.where(has_image[:, None], reps[:, 0], text_only))
        text_emb = words + text_visual.unsqueeze(1)
        ling = torch.where(
            replace.unsqueeze(-1),
            self.object_mask_word_embedding.weight[0],
            self.object_linguistic_embeddings.weight[0],
        )
        obj_emb = ling + self.visual_ln_object(reps)  # (B,1+R,H)
        if self.blank_vision:  # zero region inputs, the positions kept (torch.where: the parts stay in the graph)
            obj_emb = torch.where(
                torch.ones((), dtype=torch.bool, device=device), self.visual_ln_object(torch.zeros_like(reps)), obj_emb
            )
        end_emb = self.end_embedding.weight[0].expand(bsz, -1).unsqueeze(1)  # (B,1,H)

        # compacted layout per row: text (n_t) | regions (n_o) | [END] | padding; as VL-BERT's `embedding`, [END]
        # follows the objects in every row, also in a text-only row (zero objects: [END] right after the text)
        n_text = text_mask.sum(1)
        n_obj = obj_valid.sum(1)
        length = int((n_text + n_obj + 1).max())
        text_pos = torch.arange(text_len, device=device).expand(bsz, -1)
        obj_slot = torch.arange(obj_valid.shape[1], device=device).expand(bsz, -1)
        obj_pos = n_text[:, None] + obj_slot
        end_pos = (n_text + n_obj).unsqueeze(1)
        pieces = [
            (text_emb, text_mask, text_pos, text_pos, TEXT_TYPE),
            (obj_emb, obj_valid, obj_pos, n_text[:, None].expand_as(obj_pos), OBJECT_TYPE),
            (end_emb, torch.ones_like(has_image).unsqueeze(1), end_pos, (n_text + 1).unsqueeze(1), OBJECT_TYPE),
        ]
        hidden = words.shape[-1]
        seq = words.new_zeros(bsz, length, hidden)
        position_ids = torch.zeros(bsz, length, dtype=torch.long, device=device)
        type_ids = torch.zeros(bsz, length, dtype=torch.long, device=device)
        attention = torch.zeros(bsz, length, dtype=torch.long, device=device)
        rows = torch.arange(bsz, device=device)
        for emb, valid, slot, position, kind in pieces:
            b = rows[:, None].expand_as(valid)[valid]
            s = slot[valid]
            seq[b, s] = emb[valid].to(seq.dtype)
            position_ids[b, s] = position[valid]
            type_ids[b, s] = kind
            attention[b, s] = 1
        out = self.bert(inputs_embeds=seq, position_ids=position_ids, token_type_ids=type_ids, attention_mask=attention)
        states = out.last_hidden_state  # (B,L,H)
        text_states = states.gather(1, text_pos.clamp(max=length - 1).unsqueeze(-1).expand(-1, -1, hidden))
        text_states = text_states * text_mask.unsqueeze(-1).to(states.dtype)
        obj_states = states.gather(1, obj_pos.clamp(max=length - 1).unsqueeze(-1).expand(-1, -1, hidden))
        obj_states = obj_states * obj_valid.unsqueeze(-1).to(states.dtype)
        pooled = out.pooler_output if self.with_pooler else states[:, 0]
        return EncoderOutput(text=text_states, visual=obj_states, pooled=pooled, visual_prefix=1)


class MMBertSystem(MMBertTestStage, VLSystem):
    """The shared system plus MM-BERT's hybrid init, batch-size-scaled lr and 1-logit retrieval scores."""

    def __init__(
        self,
        *,
        mbert_dir: str | None = None,
        vlbert_checkpoint: str | None = None,
        lr_per_example: float | None = None,
        decay_every_parameter: bool = True,
        **kwargs: Any,
    ) -> None:
        """`mbert_dir`: a local M-BERT dir (`bert-base-multilingual-cased`): encoder + word embeddings.
        `vlbert_checkpoint`: `vl-bert-base-prec.model`: the parts in `VLBERT_PARTS`. `lr_per_example`: when set, the
        lr is lr_per_example x total batch size (per device x world size x accumulation), as MM-BERT's configs.
        `decay_every_parameter`: True (the seed's): weight decay on every parameter, biases and LayerNorms included
        (VL-BERT's ``train.py`` builds one AdamW group, its ``LR_MULT`` empty); False: the shared rule (none on
        biases / norms, `VLSystem.decays`).
        The hybrid init runs before `init_from` (`initial_weights`), as the seed's downstream modules build from
        M-BERT and then load ``PARTIAL_PRETRAIN``: the checkpoint's keys win, the ones it lacks keep M-BERT's (the
        pooler: pretraining runs without it)."""
        self.decay_every_parameter = decay_every_parameter
        self.mbert_dir = mbert_dir
        self.vlbert_checkpoint = vlbert_checkpoint
        self.lr_per_example = lr_per_example
        super().__init__(**kwargs)

    def initial_weights(self) -> None:
        """The hybrid init (`hybrid_init`) when `mbert_dir` or `vlbert_checkpoint` is set; `VLSystem` calls it before
        loading `init_from`."""
        if self.mbert_dir or self.vlbert_checkpoint:
            self.hybrid_init(self.mbert_dir, self.vlbert_checkpoint)

    # ------------------------------------------------------------------ hybrid init
    def hybrid_init(self, mbert_dir: str | None, vlbert_checkpoint: str | None) -> None:
        """M-BERT's `MBERT_PARTS` (and its MLM head when the model trains MLM) from `mbert_dir`, then VL-BERT's
        `VLBERT_PARTS` from `vlbert_checkpoint` (`vl.models.checkpoints.load_hybrid_init`); every missing / unexpected
        key is logged. A source of which no tensor loads is a ConfigError."""
        load_hybrid_init(self, mbert_dir, vlbert_checkpoint, mlm_head="mlm" in self.objectives)

    # ------------------------------------------------------------------ optimisation
    def total_batch_size(self) -> int:
        """Examples per optimizer step: per-device batch (all loaders of a combined loader) x world size x
        accumulation."""
        dm = self._datamodule()
        per_device = int(getattr(dm, "examples_per_device_step", getattr(dm, "batch_size_per_device", 1)))
        return per_device * int(self.trainer.world_size) * int(self.trainer.accumulate_grad_batches)

    def decays(self, name: str, param: nn.Parameter) -> bool:
        return True if self.decay_every_parameter else super().decays(name, param)

    def configure_optimizers(self) -> Any:
        if self.lr_per_example is not None:
            total = self.total_batch_size()
            self.optimizer_cfg = {**self.optimizer_cfg, "lr": float(self.lr_per_example) * total}
            log.info("lr = %g x total batch %d = %g", self.lr_per_example, total, self.optimizer_cfg["lr"])
        return super().configure_optimizers()

    # ------------------------------------------------------------------ retrieval
    def pair_scorer(self) -> Any:
        if "itm_bce" in self.objectives:
            return self.objectives["itm_bce"].score
        return super().pair_scorer()

    def with_empty_regions(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A training batch without any image (e.g. only Task C text pairs, or the no-vision MT variant) gets zero
        regions per row (``has_image`` False; with MVRC, zero chosen regions), so the step runs the same modules as an
        image batch: ``obj_downsample``, ``object_mask_visual_embedding`` and the MVRC head get zero gradients instead
        of none. The model's outputs are unchanged (no region is valid; the text's visual embedding is the one of a
        text-only row).

        Why: under DDP (``find_unused_parameters`` False) a rank whose step left those parameters unused never launches
        their gradient all-reduce while the other ranks do, and the ranks wait for each other until the process-group
        timeout (a 2-process gloo fit of ``mm_bert_pretrain_tiny`` hung). A side effect outside DDP: an optimizer step
        made only of text-only batches applies AdamW's weight decay to those parameters (their gradient is 0, not
        None)."""
        if "visual_feats" in batch or not hasattr(self.encoder, "object_mask_visual_embedding"):
            return batch
        ids = batch["input_ids"]
        bsz, device = ids.shape[0], ids.device
        dim = self.encoder.object_mask_visual_embedding.weight.shape[1]
        empty = {
            "visual_feats": torch.zeros(bsz, 0, dim, device=device),
            "visual_boxes": torch.zeros(bsz, 0, 4, device=device),
            "visual_mask": torch.zeros(bsz, 0, dtype=torch.long, device=device),
            "has_image": torch.zeros(bsz, dtype=torch.bool, device=device),
            "visual_image_size": torch.ones(bsz, 2, device=device),
        }
        if "mvrc" in self.objectives:
            classes = self.objectives["mvrc"].head[-1].out_features
            empty["region_cls_prob"] = torch.zeros(bsz, 0, classes, device=device)
            empty["region_mask_labels"] = torch.zeros(bsz, 0, dtype=torch.bool, device=device)
            empty["mvrc_replace"] = torch.zeros(bsz, 0, dtype=torch.bool, device=device)
        return {**batch, **empty}

    def _log_loss(self, stage: str, name: str, loss: torch.Tensor, batch_size: int) -> None:
        """Inside a combined training step a part logs its terms as ``train/<term>_loss<_part>`` (``_aux`` for the aux
        text; none for the main data) and not its total: ``train/loss`` is the sum over the parts."""
        suffix = getattr(self, "_log_suffix", None)
        if stage != "train" or suffix is None:
            return super()._log_loss(stage, name, loss, batch_size)
        if name != "total":
            self.log_step_value(f"train/{name}_loss{suffix}", loss, batch_size=batch_size)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """A combined loader's batch (`{"main": ..., "aux": ...}`, Lightning `CombinedLoader`) sums its losses. A main
        batch without images runs the visual modules on zero regions (`with_empty_regions`): every step touches the
        same parameters, as DDP needs."""
        if isinstance(batch, dict) and "input_ids" not in batch:
            terms: dict[str, torch.Tensor] = {}
            total = 0.0
            examples = 0
            try:
                for part_name, part in batch.items():
                    if part is None:
                        continue
                    self._terms = {}
                    if part_name == "main":
                        part = self.with_empty_regions(part)
                    self._log_suffix = "" if part_name == "main" else f"_{part_name}"
                    total = total + self.shared_step(part, "train")
                    examples += int(part["input_ids"].shape[0])
                    terms.update({f"{k}{self._log_suffix}": v for k, v in self._terms.items()})
            finally:
                self._log_suffix = None
            self._terms = terms
            self._pending_terms.append((self.current_epoch, batch_idx, terms))
            self.log_train_loss(total, batch_size=examples)
            return total
        return super().training_step(self.with_empty_regions(batch), batch_idx)
