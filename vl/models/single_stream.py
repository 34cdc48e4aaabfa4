"""A single-stream encoder in the style of VisualBERT (`model=single_stream` and the CPU default
`model=visual_bert_tiny`): BERT layers over [text tokens ; projected region tokens] (the shared
`vl.models.system.VLSystem` trains it).

Not the published VisualBERT (that is `vl.models.visual_bert`, `model=visual_bert`): the regions here also get a box
projection and their own LayerNorm, and share BERT's type / position tables, so released VisualBERT weights do not
fit it. Text tokens: BERT word + position + type-0 embeddings. Region tokens: Linear(feat) + Linear(box) projected to
the hidden size, then BERT position-0 + type-1 embeddings and the shared LayerNorm. One attention mask over both."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vl.batch import EncoderOutput, region_feature_dim
from vl.errors import ConfigError
from vl.models.bert_backbone import build_bert


class SingleStreamEncoder(nn.Module):
    """`forward(batch) -> EncoderOutput(text (B,T,H), visual (B,R,H), pooled (B,H))`.

    Batch keys: input_ids, attention_mask, token_type_ids (B,T); visual_feats (B,R,D); visual_boxes (B,R,4)
    normalised x1y1x2y2; visual_mask (B,R).
    """

    visual_input = "regions"

    def __init__(
        self,
        *,
        data_info: dict[str, Any],
        text_encoder: dict[str, Any] | None = None,
        pooling: str = "cls",
        box_dim: int = 5,
    ) -> None:
        """`text_encoder`: `build_bert` arguments (random sizes, or `pretrained`); `pooling`: "cls" (BERT pooler on
        [CLS]) or "mean" (masked mean of all states); `data_info["visual_dim"]`: the region-feature size."""
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"model.encoder.pooling: '{pooling}' is not one of 'cls', 'mean'")
        visual_dim = region_feature_dim(data_info)
        self.pooling = pooling
        self.pretrained = (text_encoder or {}).get("pretrained")
        # BERT's pooler only where it is used: an unused parameter breaks DDP ("not used in producing the loss")
        self.bert = build_bert(**{**(text_encoder or {}), "add_pooling_layer": pooling == "cls"})
        hidden = self.bert.config.hidden_size
        self.hidden_size = self.pooled_size = self.text_size = self.visual_size = hidden
        self.visual_proj = nn.Linear(visual_dim, hidden)
        self.box_proj = nn.Linear(box_dim, hidden)
        self.visual_norm = nn.LayerNorm(hidden, eps=1e-12)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def pretrained_parameter_names(self) -> set[str]:
        return {f"bert.{name}" for name, _ in self.bert.named_parameters()} if self.pretrained else set()

    def unbuilt_prefixes(self) -> tuple[str, ...]:
        """Older checkpoints hold BERT's pooler under mean pooling; it is no longer built (see `VLSystem`)."""
        return ("bert.pooler.",) if self.pooling != "cls" else ()

    @staticmethod
    def box_features(boxes: torch.Tensor) -> torch.Tensor:
        """(B,R,4) normalised x1y1x2y2 -> (B,R,5) with the relative area appended."""
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        return torch.cat([boxes, area.unsqueeze(-1)], dim=-1)

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        input_ids = batch["input_ids"]
        bsz, text_len = input_ids.shape
        text_emb = self.word_embeddings(input_ids)  # (B,T,H)
        feats = batch["visual_feats"]
        vis_emb = self.visual_norm(self.visual_proj(feats) + self.box_proj(self.box_features(batch["visual_boxes"])))
        n_regions = vis_emb.shape[1]
        inputs = torch.cat([text_emb, vis_emb], dim=1)  # (B,T+R,H)
        token_type = torch.cat(
            [batch["token_type_ids"], torch.ones(bsz, n_regions, dtype=torch.long, device=input_ids.device)], dim=1
        )
        positions = torch.arange(text_len, device=input_ids.device).expand(bsz, -1)
        position_ids = torch.cat([positions, torch.zeros_like(token_type[:, text_len:])], dim=1)
        mask = torch.cat([batch["attention_mask"], batch["visual_mask"].to(batch["attention_mask"].dtype)], dim=1)
        out = self.bert(inputs_embeds=inputs, token_type_ids=token_type, position_ids=position_ids, attention_mask=mask)
        states = out.last_hidden_state
        if self.pooling == "mean":  # masked mean over text and region states
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:  # BERT pooler: tanh(Linear(h_[CLS]))
            pooled = out.pooler_output
        return EncoderOutput(text=states[:, :text_len], visual=states[:, text_len:], pooled=pooled)
