"""Images as input, for any model that reads pixels (CLIP-ViL, VG-BERT): decoding with a file-naming error or a
counted skip, the published transforms, aspect-ratio grouping, and a collator that stacks pixels.

Everything here runs in DataLoader workers (a dataset's `__getitem__` decodes and transforms; the collator stacks),
never in the training step.

- `load_rgb(path)`: PIL decode (JPEG, PNG, ...) -> RGB; a missing or corrupt file -> `DataError("<file>: ...")`.
- `ResizePadNormalize` (CLIP-ViL, the seed's `Resize` + `PadToGivenSize` + `ToTensor` + `Normalize`): shorter side
  -> `min_size` unless the longer side would pass `max_size`, then the shorter side -> round(max_size * short / long)
  (`clip_vil_resized_size`, the seed's maskrcnn-style `get_size`); PIL bilinear (torchvision `F.resize`'s default on
  PIL images); black-padded, centred (left/top get the odd pixel), to `max_size` wide x `min_size` high when the
  resized w > h, else `min_size` wide x `max_size` high (a square image is portrait); then CLIP mean/std, so the
  padding is (0 - mean) / std, not 0.
- `ResizeCenterCrop` (VG-BERT): shorter side -> 256 (bilinear), centre crop 224, ImageNet mean/std.
- `aspect_ratio_bins` / `aspect_group`: the seed's aspect-ratio groups (torchvision's detection reference
  `create_aspect_ratio_groups(k)`, `data.aspect_ratio_group_factor`): bin edges 2 ** linspace(-1, 1, 2k + 1) ([1.0]
  for k = 0), group = bisect_right(edges, height / width).
- `AspectGroupedSampler`: `EpochShuffleSampler` whose batches each hold one group (the caller's: CLIP-ViL's aspect
  group x canvas orientation), formed as the seed's `GroupedBatchSampler` (`grouped_batches`): full batches in the
  shuffled order, then the largest leftover buffers completed with repeats of their group's examples, len // batch
  batches in all; resumable like its parent.
- `ImageCollator`: the shared `Collator` plus `pixel_values` (B, 3, H, W) (`stack_pixels`); examples that are None
  (an image skipped under `on_bad_image="skip"`) are dropped and counted in `images_skipped`. A batch whose images
  have different canvases (only where batches are not grouped: streaming training, `data.group_by_aspect=false`,
  `data=custom`, a user's sampler) is padded bottom / right to the largest with the transform's own padding value
  (`batch_pad_value`: black after normalisation for the padded clip_vil transform) and logged once per process:
  its images then get more (padding) grid cells than in a grouped batch. Without fixed canvases (the unpadded
  clip_vil transform) the padding is 0, as the seed's `to_image_list`, and nothing is logged.

Why not torchvision: its PyPI wheels for torch 2.13 (0.28.*) are CUDA builds, whose ops library does not load with the
CPU torch build these machines install (`import torchvision` fails: "operator torchvision::nms does not exist"); the
CPU build comes only from PyTorch's own index, which these machines cannot reach. PIL (already a dependency) decodes
and resizes instead; the transforms follow torchvision's size rules.
"""

from __future__ import annotations

import bisect
import io
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vl.data.collate import Collator
from vl.data.samplers import EpochShuffleSampler
from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_rgb",
    "resized_size",
    "clip_vil_resized_size",
    "ResizePadNormalize",
    "ResizeCenterCrop",
    "build_transform",
    "aspect_ratio_bins",
    "aspect_group",
    "AspectGroupedSampler",
    "grouped_batches",
    "grouped_order",
    "stack_pixels",
    "ImageCollator",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(path: str | Path, data: bytes | None = None) -> Any:
    """Decode an image file to a PIL RGB image; `DataError` naming the file when it is missing or cannot be read.
    `data`: the file's bytes (e.g. read from a streaming shard), decoded instead of the file `path` names."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if data is None and not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


class PixelLoader:
    """Decodes + transforms one image file (in a DataLoader worker); `on_bad_image`: "error" (the DataError naming
    the file) or "skip" (a warning naming the file; None, counted in `skipped`)."""

    def __init__(self, transform: Any, on_bad_image: str = "error") -> None:
        if on_bad_image not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_image: '{on_bad_image}' is not one of 'error', 'skip'")
        self.transform, self.on_bad_image, self.skipped = transform, on_bad_image, 0

    def __call__(self, path: str | Path, data: bytes | None = None) -> torch.Tensor | None:
        try:
            return self.transform(load_rgb(path, data))
        except DataError as e:
            if self.on_bad_image == "error":
                raise
            self.skipped += 1
            log.warning("skipped image (%d so far in this process): %s", self.skipped, e)
            return None


def resized_size(width: int, height: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to `min_size` with the longer side capped at `max_size` (torchvision's
    `Resize(min_size, max_size=max_size)` rule, integer arithmetic included)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = min_size, int(min_size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _to_tensor(img: Any, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return (arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def clip_vil_resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(w, h) after the seed's `Resize(min_size, max_size).get_size`: the shorter side -> `min_size`, unless the longer
    side would then pass `max_size`: the shorter side -> int(round(max_size * short / long)) instead; the longer side
    -> int(short' * long / short); an image whose shorter side already has that size is kept as it is."""
    size = min_size
    short, long = float(min(width, height)), float(max(width, height))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


class ResizePadNormalize:
    """CLIP-ViL's input: PIL RGB -> (3, H, W) float, H x W = min_size x max_size (resized w > h) or max_size x
    min_size (resized w <= h), the seed's order: resize (bilinear), zero-pad centred, then normalise (the padding
    becomes (0 - mean) / std). A resized side past the canvas (the size rule's rounding, e.g. 641 for 640) is cropped
    as the seed's negative padding does (left/top lose floor(excess / 2), right/bottom the rest).

    `pad=False`: no padding (the seed without `--add_zero_padding`; the collator then pads bottom/right with 0 after
    normalisation, as the seed's `to_image_list`)."""

    def __init__(
        self,
        min_size: int = 384,
        max_size: int = 640,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        pad: bool = True,
    ) -> None:
        if min_size < 1 or max_size < min_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size, self.mean, self.std, self.pad = min_size, max_size, mean, std, pad

    def portrait(self, width: int, height: int) -> bool:
        """Whether an image of `width` x `height` gets the portrait canvas (`max_size` high): its resized w <= h. A
        near-square landscape image (e.g. 500 x 499 -> 384 x 384) gets it too."""
        w, h = clip_vil_resized_size(width, height, self.min_size, self.max_size)
        return w <= h

    @property
    def batch_pad_value(self) -> tuple[float, ...] | None:
        """What a batch of different canvases is padded with: the transform's own padding, black after normalisation
        ((0 - mean) / std per channel); None without padding (`pad=False`: sizes vary by design, `stack_pixels` pads
        with 0 as the seed's `to_image_list`)."""
        return tuple(-m / s for m, s in zip(self.mean, self.std)) if self.pad else None

    def __call__(self, img: Any) -> torch.Tensor:
        from PIL import Image

        w, h = clip_vil_resized_size(img.width, img.height, self.min_size, self.max_size)
        if (w, h) != (img.width, img.height):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        if not self.pad:
            return _to_tensor(img, self.mean, self.std)
        out_w, out_h = (self.min_size, self.max_size) if w <= h else (self.max_size, self.min_size)
        left, top = (out_w - w + 1) // 2, (out_h - h + 1) // 2  # ceil of half the padding (negative: a crop)
        canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
        src = np.asarray(img)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + h, out_h), min(left + w, out_w)
        canvas[y0:y1, x0:x1] = src[y0 - top : y1 - top, x0 - left : x1 - left]
        return _to_tensor(canvas, self.mean, self.std)


class ResizeCenterCrop:
    """VG-BERT's input: Resize(256) (shorter side) + CenterCrop(224), ImageNet mean/std."""

    def __init__(
        self,
        size: int = 256,
        crop: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size, self.crop, self.mean, self.std = size, crop, mean, std

    def __call__(self, img: Any) -> torch.Tensor:
        from PIL import Image

        w, h = resized_size(img.width, img.height, self.size, None)
        img = img.resize((w, h), Image.Resampling.BILINEAR)
        left, top = int(round((w - self.crop) / 2.0)), int(round((h - self.crop) / 2.0))
        return _to_tensor(img.crop((left, top, left + self.crop, top + self.crop)), self.mean, self.std)


def build_transform(name: str, **options: Any) -> Any:
    """`"clip_vil"` -> ResizePadNormalize(**options); `"vg_bert"` -> ResizeCenterCrop(**options)."""
    if name == "clip_vil":
        return ResizePadNormalize(**options)
    if name == "vg_bert":
        return ResizeCenterCrop(**options)
    from vl.errors import ConfigError

    raise ConfigError(f"data.transform: '{name}' is not one of 'clip_vil', 'vg_bert'")


def aspect_ratio_bins(k: int) -> list[float]:
    """The seed's aspect-ratio bin edges (torchvision detection reference, `create_aspect_ratio_groups(k)`):
    2 ** linspace(-1, 1, 2k + 1), or [1.0] for k = 0; `ConfigError` for k < 0."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"data.aspect_ratio_group_factor: {k!r} must be an integer >= 0 (0: by orientation)")
    return (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]


def aspect_group(width: int, height: int, bins: Sequence[float]) -> int:
    """The seed's group of a `width` x `height` image: bisect_right(bins (sorted), height / width). Its ratio is
    `width / height` of `get_height_and_width`, which returns the size file's pair, (rows, columns), reversed: the
    image's height over its width; 1.0 is an edge for k < 49 (a square is in the first group above it)."""
    return bisect.bisect_right(bins, float(height) / float(width))


def grouped_batches(order: Sequence[int], groups: Sequence[int], batch_size: int) -> list[list[int]]:
    """The seed's `GroupedBatchSampler` over `order` (one rank's epoch order): indices are dealt into per-group
    buffers; a buffer that reaches `batch_size` is a batch (and its group's buffer starts again, last in the buffers'
    order, as the seed's defaultdict re-creates it). Then, for len(order) // batch_size batches in all, the leftover
    buffers, largest first (ties: buffer order), are completed with their group's examples of this epoch from its
    first, repeated as needed; the other leftovers are not seen this epoch. Every batch holds one group. vl's one
    difference: fewer examples than `batch_size` give one batch (the seed gives none), so no epoch is empty."""
    buffers: dict[int, list[int]] = {}
    seen: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for index in order:
        group = int(groups[index])
        buffers.setdefault(group, []).append(int(index))
        seen.setdefault(group, []).append(int(index))
        if len(buffers[group]) == batch_size:
            batches.append(buffers.pop(group))
            buffers[group] = []
    wanted = max(1, len(order) // batch_size) if len(order) else 0
    for group, buffer in sorted(buffers.items(), key=lambda item: len(item[1]), reverse=True):
        if len(batches) >= wanted:
            break
        missing = batch_size - len(buffer)
        pool = seen[group] * math.ceil(missing / len(seen[group]))
        batches.append(buffer + pool[:missing])
    return batches


def grouped_order(order: Sequence[int], groups: Sequence[int], batch_size: int) -> list[int]:
    """`grouped_batches` flattened: consecutive runs of `batch_size` are the batches (a DataLoader's batching)."""
    return [index for batch in grouped_batches(order, groups, batch_size) for index in batch]


class AspectGroupedSampler(EpochShuffleSampler):
    """`EpochShuffleSampler` (yields `(epoch, index)`; shuffles per epoch; resumable mid-epoch) with batches of one
    group each, `groups[index]` (e.g. aspect group x canvas orientation), formed by `grouped_batches` from this
    rank's shuffled shard; `batch_size`: the per-device batch size. An epoch is len(shard) // batch_size (at least
    one) full batches: `len()` counts their examples, so the DataLoader (same batch size, no `drop_last`) cuts
    exactly those batches, and a saved position (batches x batch size) skips whole batches of the same order."""

    def __init__(self, *args: Any, groups: Sequence[int], batch_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = list(groups)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return max(1, self.num_samples // self.batch_size) * self.batch_size if self.num_samples else 0

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        skip = self.resume_at[1] if self.resume_at is not None and self.resume_at[0] == epoch else 0
        self.resume_at = None
        order = list(super(EpochShuffleSampler, self).__iter__())  # DistributedSampler's shuffled shard
        for position, index in enumerate(grouped_order(order, self.groups, self.batch_size)):
            if position >= skip:
                yield (epoch, index)


_MIXED_LOGGED = False


def stack_pixels(pixels: Sequence[torch.Tensor], pad_value: float | Sequence[float] | None = None) -> torch.Tensor:
    """(3, H_i, W_i) tensors -> (B, 3, max H, max W), padded bottom / right with `pad_value` (a number or one per
    channel; None: 0, for images without fixed canvases). A collator whose transform pads to fixed canvases passes
    its `batch_pad_value`, and a batch that then needs padding (images of different canvases) is logged once per
    process."""
    h = max(p.shape[1] for p in pixels)
    w = max(p.shape[2] for p in pixels)
    if all(p.shape[1] == h and p.shape[2] == w for p in pixels):
        return torch.stack(list(pixels))
    if pad_value is not None:
        global _MIXED_LOGGED
        if not _MIXED_LOGGED:
            _MIXED_LOGGED = True
            log.warning(
                "a batch mixes image canvases %s: padded to %d x %d with the transform's own padding value; its images "
                "get more (padding) grid cells than in a batch of one canvas (logged once per process)",
                sorted({tuple(p.shape[1:]) for p in pixels}),
                h,
                w,
            )
    channels = pixels[0].shape[0]
    fill = torch.as_tensor(0.0 if pad_value is None else pad_value, dtype=pixels[0].dtype)
    out = fill.reshape(1, -1, 1, 1).expand(len(pixels), channels, h, w).clone()
    for i, p in enumerate(pixels):
        out[i, :, : p.shape[1], : p.shape[2]] = p
    return out


class ImageCollator(Collator):
    """The shared collator plus `pixels` ((3, H, W) per example) -> `pixel_values` (B, 3, H, W); `pad_value`: the
    transform's `batch_pad_value` (None: 0, see `stack_pixels`)."""

    extra_keys = frozenset({"pixels"})

    def __init__(self, *args: Any, pad_value: float | Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pad_value = pad_value

    def __call__(self, examples: list[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [ex for ex in examples if ex is not None]
        if not kept:
            raise DataError(f"every image of a batch of {len(examples)} failed to load (on_bad_image=skip)")
        pixels = [ex["pixels"] for ex in kept]
        batch = super().__call__([{k: v for k, v in ex.items() if k != "pixels"} for ex in kept])
        batch["pixel_values"] = stack_pixels(pixels, self.pad_value)
        batch["images_skipped"] = len(examples) - len(kept)
        return batch
