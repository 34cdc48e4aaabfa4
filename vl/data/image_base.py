"""The shared part of the corpora read from pixels (CLIP-ViL's `vl.data.clip_vil`, VG-BERT's `vl.data.vg_bert`):
`ImageSource` (an image id -> its file in the seed's `data/` layout, decoded and transformed in a worker) and
`ImageDataModule` (the image root, the transform, the bad-image policy, batches grouped by aspect ratio / canvas).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vl.data.base import VLDataModule
from vl.data.formats.lxmert_pretrain import image_path, load_width_heights
from vl.data.images import (
    AspectGroupedSampler,
    ImageCollator,
    PixelLoader,
    ResizePadNormalize,
    aspect_group,
    aspect_ratio_bins,
    build_transform,
)
from vl.data.samplers import EpochShuffleSampler
from vl.data.scenes import SceneSettings, ensure_corpus
from vl.data.scenes.writers.images import ensure_image_corpus
from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class ImageSource(PixelLoader):
    """Decodes + transforms the image of an `img_id` (in a worker); `on_bad_image`: "error" (a DataError naming the
    file) or "skip" (a warning naming the file; the example becomes None and is counted by the collator)."""

    def __init__(self, root: Path, transform: Any, on_bad_image: str = "error", image_format: str = "jpg") -> None:
        super().__init__(transform, on_bad_image)
        if image_format not in ("jpg", "png"):
            raise ConfigError(f"data.image_format: '{image_format}' is not one of 'jpg', 'png'")
        self.root, self.image_format = root, image_format

    def path(self, img_id: str) -> Path:
        return self.root / (image_path(img_id) if self.image_format == "jpg" else f"png/{img_id}.png")

    def __call__(self, img_id: str, data: bytes | None = None) -> torch.Tensor | None:  # type: ignore[override]
        return super().__call__(self.path(img_id), data)


class ImageDataModule(VLDataModule):
    """Shared part of the pixel corpora: the image root (the embedded corpus in the seed's layout when `root` is
    None), the transform, bad-image policy, batches grouped by aspect ratio, `pin_memory` / persistent workers.

    `transform`: "clip_vil" (ResizePadNormalize: `min_size`, `max_size`) or "vg_bert" (ResizeCenterCrop);
    `transform_options`: its keyword arguments. `width_heights`: the size file (filter + grouping), by default
    the seed's own `mscoco/width_heigths.json` (its spelling; `data/`-prefixed keys, [h, w] values:
    `load_width_heights`).

    Batches never mix canvases (the clip_vil transform pads a landscape image to min_size x max_size, a portrait or
    square one to max_size x min_size):
    - training (`group_by_aspect`, default on): `AspectGroupedSampler` over the groups of `groups`: the seed's
      aspect-ratio group (`aspect_ratio_group_factor` k: `aspect_group`, bins 2 ** linspace(-1, 1, 2k + 1); k = 0:
      by orientation), split by canvas where they disagree (a near-square landscape image that resizes to a square
      gets the portrait canvas; the seed would batch it with landscapes and its collate crops it into their canvas);
    - val / test (clip_vil transform, whatever `group_by_aspect`): `GroupedEvalSampler` by canvas orientation, each
      orientation's examples in file order in batches of at most `batch_size_per_device`, every example once (under
      DDP: this rank's share, then grouped), so a prediction does not depend on what shares its batch."""

    def __init__(
        self,
        *,
        transform: str = "clip_vil",
        transform_options: dict[str, Any] | None = None,
        on_bad_image: str = "error",
        image_format: str = "jpg",
        width_heights: str = "mscoco/width_heigths.json",
        group_by_aspect: bool = True,
        aspect_ratio_group_factor: int = 0,
        pin_memory: bool = True,
        **kwargs: Any,
    ) -> None:
        """`aspect_ratio_group_factor`: the seed's k (`--aspect_ratio_group_factor`): 5 in the published
        pretraining commands, 0 (its default, by orientation) for VQA; an integer >= 0."""
        # pinned memory only helps (and only exists) with an accelerator; on CPU it would just warn
        super().__init__(pin_memory=pin_memory and torch.cuda.is_available(), **kwargs)
        self.transform = build_transform(transform, **dict(transform_options or {}))
        self.on_bad_image = on_bad_image
        self.image_format = image_format
        self.width_heights_file = width_heights
        self.group_by_aspect = group_by_aspect
        self.aspect_bins = aspect_ratio_bins(aspect_ratio_group_factor)  # a bad k fails here, in one line
        self.aspect_ratio_group_factor = aspect_ratio_group_factor
        self._sizes: dict[str, tuple[int, int]] | None = None
        ImageSource(Path("."), None, on_bad_image, image_format)  # validates the two options now

    @property
    def root(self) -> Path:
        if self._root is None and not self.root_arg:
            settings = SceneSettings(**self.corpus)
            self._root = ensure_image_corpus(ensure_corpus(Path(self.cache_dir), settings), settings)
        return super().root

    @property
    def sizes(self) -> dict[str, tuple[int, int]]:
        if self._sizes is None:
            self._sizes = load_width_heights(self.path(self.width_heights_file))
        return self._sizes

    def images(self) -> ImageSource:
        return ImageSource(self.root, self.transform, self.on_bad_image, self.image_format)

    def keep_with_image(self, rows: list[dict[str, Any]], source: Path, *, every: bool = False) -> list[dict[str, Any]]:
        """The rows whose image `width_heights` lists (the seed drops the others); `every`: a row without one is a
        DataError naming it (an unlabelled test split: its submission answers every question)."""
        kept = [r for r in rows if image_path(r["img_id"]) in self.sizes]
        if every and len(kept) < len(rows):
            first = next(r for r in rows if image_path(r["img_id"]) not in self.sizes)
            raise DataError(
                f"{source}: {len(rows) - len(kept)} questions (first: {first['question_id']}, image "
                f"{image_path(first['img_id'])}) have no image listed in {self.width_heights_file}; a submission "
                "answers every question: list their images there (or name another data.splits.test)"
            )
        if not kept:
            raise DataError(
                f"{source}: none of its {len(rows)} examples has an image listed in {self.width_heights_file}"
            )
        if len(kept) < len(rows):
            log.info(
                "%s: %d of %d examples have no listed image and are dropped", source, len(rows) - len(kept), len(rows)
            )
        return kept

    def _image_keys(self, split: str) -> list[str]:
        """The size-file key (`image_path`) of each example of `split`, in order."""
        dataset = self.datasets[split]
        rows = dataset.examples if hasattr(dataset, "examples") else dataset.questions
        return [image_path(r["img_id"]) for r in rows]

    def canvas(self, size: tuple[int, int]) -> int:
        """The canvas orientation of an image of (w, h) pixels: 1 = portrait (also squares, and the near-square
        landscape images that resize to a square), 0 = landscape, as the clip_vil transform pads it; for another
        transform, by its own w <= h."""
        w, h = size
        return int(self.transform.portrait(w, h) if isinstance(self.transform, ResizePadNormalize) else w <= h)

    def _per_image(self, split: str, group: Any) -> list[int]:
        """`group(size)` of each example's image in `split`, in order; computed once per image."""
        cache: dict[str, int] = {}
        out = []
        for key in self._image_keys(split):
            if key not in cache:
                cache[key] = group(self.sizes[key])
            out.append(cache[key])
        return out

    def groups(self, split: str) -> list[int]:
        """Training groups: the seed's aspect-ratio group of each example's image (`aspect_ratio_group_factor`)
        and its canvas orientation, as one id (2 x group + canvas)."""
        return self._per_image(split, lambda size: 2 * aspect_group(*size, self.aspect_bins) + self.canvas(size))

    def eval_groups(self, split: str) -> list[int] | None:
        """Val / test batches by canvas orientation (the clip_vil transform; None for a fixed-size one)."""
        if not isinstance(self.transform, ResizePadNormalize):
            return None
        return self._per_image(split, self.canvas)

    def collator(self, split: str) -> ImageCollator:
        base = super().collator(split)
        return ImageCollator(
            base.tokenizer,
            max_text_len=base.max_text_len,
            max_regions=base.max_regions,
            mlm=base.mlm,
            mlm_probability=base.mlm_probability,
            labels=self.label_keys,
            pad_value=self.pad_value,
        )

    @property
    def pad_value(self) -> Any:
        """What a batch of different canvases is padded with (`stack_pixels`): the transform's own padding."""
        return getattr(self.transform, "batch_pad_value", None)

    def scoring_collator(self) -> ImageCollator:
        return ImageCollator(
            self.tokenizer,
            max_text_len=self.max_text_len,
            fixed_shapes=True,
            labels=self.label_keys,
            pad_value=self.pad_value,
        )

    def train_sampler(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int) -> EpochShuffleSampler:
        """Batches of one group each (`groups`, `AspectGroupedSampler`), unless `group_by_aspect` is off."""
        if not self.group_by_aspect:
            return super().train_sampler(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
        return AspectGroupedSampler(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=self.shuffle,
            seed=seed,
            groups=self.groups("train"),
            batch_size=self.batch_size_per_device,
        )
