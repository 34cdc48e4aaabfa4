"""VG-BERT's visual stream (spec: vg_bert.md), written without torchvision.

- `VGG16Features`: torchvision's `vgg16().features` (configuration "D": 3x3 convs with padding 1 + ReLU, 2x2 max
  pools) **without the last max pool**: a 224 x 224 image gives a 14 x 14 x 512 map. Its state-dict keys are
  torchvision's (`features.0.weight` ... `features.28.bias`, indices 0..29; index 30, the dropped pool, has none), so
  a local torchvision / ImageNet state dict (`vgg16-397923af.pth` or a `.safetensors`) loads with
  `load_vgg_features` (weights-only; key report; a missing or mis-shaped conv weight is an error). `widths` other
  than VGG16's are for CPU-size models only (no released weights fit them).
- `SpatialSelfAttention`: one BERT-style self-attention block over the flattened map (12 heads, a learned position
  embedding per cell (196 at 224 px), Q/K/V, dense, dropout, LayerNorm(residual) (post-LN), FFN hidden -> 3072 ReLU ->
  hidden, dropout, LayerNorm(residual)); the seed's `SpatialSelfAttention` with `--use-position learn`.
- `VGGAttention` (`VGG16_Attention`): features -> `embedder` Conv1x1 512 -> 768 -> attention; output (B, 768, 14, 14).
- `VGGAttentionClassification` (`VGG16_Attention_classification`, stage 1 on ImageNet): the attention backbone ->
  MaxPool 2x2 -> AdaptiveAvgPool 7x7 -> Linear(768*49, 4096)-ReLU-Dropout-Linear(4096, 4096)-ReLU-Dropout-
  Linear(4096, 1000). Buildable for users who have ImageNet; vl ships no ImageNet recipe.

Why not torchvision: see `vl.data.images` (its PyPI wheels for this torch are CUDA builds that do not load here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vl.errors import ConfigError
from vl.pretrained import log_key_report

log = logging.getLogger(__name__)

__all__ = [
    "VGG16_CFG",
    "VGG16Features",
    "SpatialSelfAttention",
    "VGGAttention",
    "VGGAttentionClassification",
    "load_vgg_features",
]

#: torchvision's VGG16 ("D") layer list: conv widths and "M" (2x2 max pool)
VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG16Features(nn.Module):
    """`features`: an `nn.Sequential` laid out as torchvision's (Conv2d 3x3 pad 1, ReLU, ..., MaxPool2d 2x2), the last
    max pool removed. `cfg`: the layer list (default VGG16's); `out_channels`: the last conv's width; `stride`: 16."""

    def __init__(self, cfg: Sequence[int | str] = VGG16_CFG) -> None:
        super().__init__()
        cfg = list(cfg)
        if cfg and cfg[-1] == "M":
            cfg = cfg[:-1]  # the last max pool is dropped (14 x 14 at 224 px)
        layers: list[nn.Module] = []
        channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        for m in self.features:  # torchvision's VGG init (random-init runs start where `vgg16()` does)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.out_channels = channels
        self.stride = 2 ** sum(v == "M" for v in cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def load_vgg_features(module: VGG16Features, path: str | Path) -> dict[str, list[str]]:
    """Load the `features.*` tensors of a torchvision VGG16 state dict (`.pth` read with `weights_only=True`, or
    `.safetensors`) into `module`; other keys (`classifier.*`) are reported as unused. A conv weight the file lacks or
    holds with another shape is a `ConfigError` naming it. Returns {"loaded", "missing", "unused"}."""
    from vl.checkpoint import load_safetensors, load_torch_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.encoder.vgg_weights: '{path}' does not exist")
    if path.suffix == ".safetensors":
        state = load_safetensors(path, "model.encoder.vgg_weights")
    else:
        state = load_torch_file(str(path), "model.encoder.vgg_weights")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"model.encoder.vgg_weights: '{path}' holds no state dict ({type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or wrong:
        what = [f"{k} (missing)" for k in missing[:3]] + [
            f"{k} (shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)})" for k in wrong[:3]
        ]
        raise ConfigError(
            f"model.encoder.vgg_weights: '{path}' does not fit VGG16 features: {len(missing)} missing, "
            f"{len(wrong)} mis-shaped ({', '.join(what)})"
        )
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    unused = sorted(k for k in state if k not in own)
    log_key_report(f"VGG16 features from {path}", [], unused)
    return {"loaded": sorted(own), "missing": [], "unused": unused}


class SpatialSelfAttention(nn.Module):
    """(B, H, h, w) -> (B, H, h, w): one post-LN self-attention block over the h*w cells (row-major), learned position
    embedding per cell (`num_positions` >= h*w), ReLU FFN. Parameter names are the seed's."""

    def __init__(
        self,
        *,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        num_positions: int = 196,
        dropout: float = 0.1,
        use_position: bool = True,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"visual attention: hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_size = num_heads, hidden_size // num_heads
        self.num_positions = num_positions
        self.use_position = use_position
        if use_position:
            self.position_embeddings = nn.Embedding(num_positions, hidden_size)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size)
        self.ffn = nn.Linear(hidden_size, intermediate_size)
        self.ffn_act = nn.ReLU()
        self.ffn_output = nn.Linear(intermediate_size, hidden_size)
        self.full_layernorm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        n = x.shape[1]
        if self.use_position:
            if n > self.num_positions:
                raise ConfigError(
                    f"model.encoder.num_positions={self.num_positions}: the feature map has {h}x{w}={n} cells; "
                    "raise num_positions or lower the image size"
                )
            inp = x + self.position_embeddings.weight[:n]
        else:
            inp = x
        q, k, v = self._heads(self.query(inp)), self._heads(self.key(inp)), self._heads(self.value(inp))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        # the residual is the input without the position embedding (as the seed)
        context = self.LayerNorm(self.dropout(self.dense(context)) + x)
        hidden = self.dropout(self.ffn_output(self.ffn_act(self.ffn(context))))
        hidden = self.full_layernorm(hidden + context)
        return hidden.transpose(1, 2).reshape(b, c, h, w)


class VGGAttention(nn.Module):
    """`VGG16_Attention`: `features` (VGG16 without the last pool) -> `embedder` Conv1x1 -> `attention`."""

    def __init__(
        self,
        *,
        cfg: Sequence[int | str] = VGG16_CFG,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        num_positions: int = 196,
        dropout: float = 0.1,
        use_position: bool = True,
    ) -> None:
        super().__init__()
        self.vgg = VGG16Features(cfg)
        self.embedder = nn.Conv2d(self.vgg.out_channels, hidden_size, kernel_size=1)
        self.attention = SpatialSelfAttention(
            hidden_size=hidden_size,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            num_positions=num_positions,
            dropout=dropout,
            use_position=use_position,
        )
        self.hidden_size = hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.attention(self.embedder(self.vgg(pixel_values)))


class VGGAttentionClassification(nn.Module):
    """`VGG16_Attention_classification` (stage 1, ImageNet): the attention backbone, MaxPool 2x2, AdaptiveAvgPool
    7x7, VGG's classifier on hidden*49 -> 4096 -> 4096 -> `num_classes` (1000)."""

    def __init__(self, *, num_classes: int = 1000, classifier_width: int = 4096, **backbone: Any) -> None:
        super().__init__()
        self.backbone = VGGAttention(**backbone)
        hidden = self.backbone.hidden_size
        self.visual_maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.visual_avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(hidden * 7 * 7, classifier_width),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(classifier_width, classifier_width),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(classifier_width, num_classes),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.visual_avgpool(self.visual_maxpool(self.backbone(pixel_values)))
        return self.classifier(torch.flatten(x, 1))
