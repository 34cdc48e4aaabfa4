"""The modified ResNet of OpenAI CLIP (RN50, RN50x4, and tiny CPU sizes), written from the CLIP paper / public code
because `open-clip-torch` cannot be used here (it imports torchvision, whose torch-2.13 wheels on PyPI are CUDA builds
that do not load with the CPU torch build).

- Stem: three 3x3 convs (stride 2, 1, 1; widths w/2, w/2, w) with BN + ReLU, then a 2x2 average pool.
- Bottlenecks (expansion 4) are anti-aliased: a stride-s block average-pools (s x s) after its 3x3 conv instead of
  striding the conv, and its downsample branch is AvgPool(s) -> 1x1 conv -> BN (keys `downsample.0/1`).
- `attnpool` (the attention pool): built only with `attention_pool=True`; CLIP-ViL's `skip_last_layer` uses the C5
  grid (w x 32 channels: 2048 for RN50, 2560 for RN50x4) at stride 32, so by default it is not built (an unused
  parameter would break DDP) and its weights in a loaded file are reported as not used.

State-dict keys are those of CLIP's `visual` module (`conv1.weight`, `layer1.0.downsample.0.weight`,
`attnpool.q_proj.weight`, ...): `load_clip_visual` reads an OpenAI or open_clip state dict (with or without the
`visual.` prefix; torch `weights_only` or safetensors) and logs a key report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vl.errors import ConfigError
from vl.pretrained import log_key_report

log = logging.getLogger(__name__)

#: published sizes (CLIP's `build_model` values): layers, width, attention heads, output dim, input resolution
CLIP_RESNETS: dict[str, dict[str, Any]] = {
    "RN50": {"layers": (3, 4, 6, 3), "width": 64, "heads": 32, "output_dim": 1024, "image_size": 224},
    "RN50x4": {"layers": (4, 6, 10, 6), "width": 80, "heads": 40, "output_dim": 640, "image_size": 288},
}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's attention pool: the mean token (plus learned positions) attends over the grid; not used by CLIP-ViL."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int | None = None) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x[:1],
            key=x,
            value=x,
            embed_dim_to_check=x.shape[-1],
            num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return out.squeeze(0)


class ModifiedResNet(nn.Module):
    """`forward(images (B,3,H,W), skip_last_layer=True)` -> the C5 grid (B, 32w, H/32, W/32); with
    `skip_last_layer=False` (needs `attention_pool=True`) the pooled embedding (B, output_dim)."""

    def __init__(
        self,
        *,
        layers: Sequence[int] = (3, 4, 6, 3),
        width: int = 64,
        heads: int = 32,
        output_dim: int = 1024,
        image_size: int = 224,
        attention_pool: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or width % 2:
            raise ConfigError(f"clip resnet: need 4 stages and an even width, got layers={layers}, width={width}")
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.out_channels = width * 32
        self.stride = 32
        self.attnpool = (
            AttentionPool2d(image_size // 32, self.out_channels, heads, output_dim) if attention_pool else None
        )

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        mods = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        mods += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x: torch.Tensor, skip_last_layer: bool = True) -> torch.Tensor:
        x = self.stem(x.to(self.conv1.weight.dtype))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if skip_last_layer:
            return x
        if self.attnpool is None:
            raise ConfigError("clip resnet: skip_last_layer=False needs attention_pool=True")
        return self.attnpool(x)


def build_clip_resnet(name: str | None = None, **sizes: Any) -> ModifiedResNet:
    """`name` "RN50" / "RN50x4" (published sizes) or None (the given `sizes`, e.g. a tiny CPU variant; a size left
    None keeps RN50's value)."""
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if name is not None:
        if name not in CLIP_RESNETS:
            raise ConfigError(f"model.encoder.backbone.name: '{name}' is not one of {sorted(CLIP_RESNETS)}")
        sizes = {**CLIP_RESNETS[name], **sizes}
    return ModifiedResNet(**sizes)


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch file (`weights_only`; a `{"state_dict": ...}` wrapper is
    unwrapped). A TorchScript archive (OpenAI's released `RN50.pt`) is refused: save its `state_dict()` first."""
    path = Path(path).expanduser()
    from vl.checkpoint import load_safetensors, load_torch_file

    if path.suffix == ".safetensors":
        return load_safetensors(path, what)  # damage named in one line

    try:
        state = load_torch_file(path, what)
    except ConfigError as e:
        if "constants.pkl" in str(e) or "TorchScript" in str(e):
            raise ConfigError(
                f"{what}: '{path}' is a TorchScript archive; save `torch.jit.load(f).state_dict()` and load that"
            ) from None
        raise
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{what}: '{path}' holds no state dict of tensors")
    return state


def load_clip_visual(model: ModifiedResNet, path: str | Path, what: str = "model.encoder.backbone_weights") -> dict:
    """Load CLIP ResNet weights: a whole CLIP state dict (keys `visual.*`; the text tower is ignored), an open_clip
    one (`visual.*` too) or the visual module's own. Shapes must match. Returns the key report
    `{"loaded", "missing", "unused"}` (also logged); the attention pool's keys are unused unless it is built."""
    state = read_state_dict(path, what)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ConfigError(
            f"{what}: '{path}': {bad[0]} has shape {tuple(state[bad[0]].shape)}, the backbone expects "
            f"{tuple(own[bad[0]].shape)} (another ResNet size?)"
        )
    usable = {k: v for k, v in state.items() if k in own}
    result = model.load_state_dict(usable, strict=False)
    unused = sorted(set(state) - set(own))
    log_key_report(f"CLIP ResNet weights from {path}", result.missing_keys, unused)
    return {"loaded": sorted(usable), "missing": sorted(result.missing_keys), "unused": unused}
