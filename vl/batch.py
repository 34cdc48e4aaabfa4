"""The vocabulary shared by collators, encoders and heads: batch keys, the label ignore index, `EncoderOutput`.

Batch keys (one vocabulary for all collators and encoders; a corpus adds its own label keys, see its DataModule):
  input_ids, attention_mask, token_type_ids   (B, T) long
  visual_feats (B, R, D) float; visual_boxes (B, R, 4) normalised x1y1x2y2; visual_mask (B, R) long
  visual_global (B, D) float, optional: the feature of ViLBERT's global image token when the corpus gives it
    (RefCOCO+: the mean of the image's detections); without it the encoder takes the regions' masked mean
  clip_feats (B, 1, D) float: one global image embedding
  index (B,) long: the example's dataset index
  mlm_labels (B, T) long, -100 = not predicted      itm_labels (B,) long, 1 = aligned
  region_mask_labels (B, R) bool, region_cls_prob (B, R, C), region_feat_targets (B, R, D): masked regions
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vl.errors import ConfigError

#: label value that no loss counts (`mlm_labels`)
IGNORE_INDEX = -100


@dataclass
class EncoderOutput:
    """What every encoder returns: text (B, T, Ht), visual (B, P+R, Hv) or None, pooled (B, Hp).

    `visual_prefix` = P extra leading visual positions that are not regions (ViLBERT's global image token): region
    heads read `visual[:, visual_prefix:]`, aligned with the batch's (B, R) region tensors.
    """

    text: torch.Tensor
    visual: torch.Tensor | None
    pooled: torch.Tensor
    visual_prefix: int = 0

    def regions(self) -> torch.Tensor:
        """(B, R, Hv): the visual states of the regions only."""
        assert self.visual is not None, "this encoder returns no visual states"
        return self.visual[:, self.visual_prefix :]


def region_feature_dim(data_info: dict[str, Any]) -> int:
    """The data's region-feature size, or a clear error when the data module provides no region features."""
    if "visual_dim" not in data_info:
        raise ConfigError(
            "model: this architecture reads region features (visual_feats), but the chosen data module provides "
            "none (text-only or CLIP-embedding data); use data=captions / data=vqa, or a text model (model=bert)"
        )
    return int(data_info["visual_dim"])
