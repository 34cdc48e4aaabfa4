"""A user's visual input of any kind, as `data=custom` reads it (`vl.data.custom`): region features (LMDB, region HDF5,
per-image FRCNN JSON), a CLIP HDF5 (`features` (N, D) + `ids`) or a directory of image files, told apart by `kind_of`;
`VisualSource` gives an image id's example fields and checks it before training; the collators and adapters let the
shared datasets (`CaptionPairs`, `RetrievalTrain`, galleries) and models (CLIP-BERT, pixel models) read any of them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vl.data.collate import Collator
from vl.data.features import ClipFeatureReader, open_region_features
from vl.data.images import ImageCollator, PixelLoader, stack_pixels
from vl.data.region_batch import pad_regions
from vl.data.vlp import WHOLE_IMAGE_BOX, ClipCollator
from vl.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "VISUAL_KINDS",
    "ClipRegionCollator",
    "Expanded",
    "PixelChoiceCollator",
    "VisualAsReader",
    "VisualSource",
    "clip_fields",
    "kind_of",
    "source_collator",
]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VISUAL_KINDS = ("auto", "regions", "clip", "images")


def kind_of(path: Path) -> str:
    """What a feature path is: "regions" (LMDB dir / region HDF5 / FRCNN JSON), "clip" (CLIP HDF5: `features`
    (N, D) + `ids`, no per-image `offsets`) or "images" (a directory of image files)."""
    if path.is_dir():
        if (path / "data.mdb").is_file() or path.suffix.lower() == ".lmdb":
            return "regions"
        names = [e.name.lower() for e in os.scandir(path)]
        if any(n.endswith(".json") for n in names):
            return "regions"
        if any(n.endswith(IMAGE_SUFFIXES) for n in names):
            return "images"
        raise DataError(f"{path}: directory is neither an LMDB, per-image .json features nor image files")
    if path.is_file() and path.suffix.lower() in (".h5", ".hdf5", ".hdf"):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if "offsets" not in f and "features" in f and "ids" in f:
                    return "clip"
        except OSError as e:
            raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    return "regions"


class VisualSource:
    """The example fields of an image id, whatever the visual input is:

    - "regions": `{"visual": reader dict}` (region LMDB / HDF5 / FRCNN JSON);
    - "clip": `{"clip": (1, D), "visual": one whole-image region}` (CLIP HDF5; the `data=vlp` fields, so CLIP-BERT
      reads `clip_feats` and region models read the vector as one region);
    - "images": `{"pixels": (3, H, W)}` (an image directory: `<id>` or `<id>.jpg|.jpeg|.png`, decoded by
      `vl.data.images.PixelLoader` with the chosen transform; None when skipped under `on_bad_image=skip`)."""

    def __init__(self, path: Path, kind: str, *, pixels: PixelLoader | None = None) -> None:
        self.path, self.kind, self.pixels = path, kind, pixels
        self._reader: Any = None

    @property
    def reader(self) -> Any:
        if self._reader is None:
            if self.kind == "regions":
                self._reader = open_region_features(self.path)
            elif self.kind == "clip":
                self._reader = ClipFeatureReader(self.path)
        return self._reader

    def image_file(self, sid: str) -> Path | None:
        """The file of an image id in the image directory (None when there is none)."""
        for name in (sid, *(sid + suffix for suffix in IMAGE_SUFFIXES)):
            candidate = self.path / name
            if candidate.suffix.lower() in IMAGE_SUFFIXES and candidate.is_file():
                return candidate
        return None

    def problem(self, sid: str) -> str | None:
        """Why the image id cannot be read (checked for every line before training), or None."""
        if self.kind != "images":
            if sid not in self.reader:
                return f"image id {sid!r} has no features in {self.path}"
            self.reader[sid]  # decoded once: a damaged or non-finite record fails now, not mid-training
            return None
        file = self.image_file(sid)
        if file is None:
            return f"image id {sid!r} has no image file in {self.path} (tried {sid}, {sid}.jpg|.jpeg|.png)"
        from PIL import Image, UnidentifiedImageError

        try:  # the header only: a file that is not an image fails here, before training
            with Image.open(file) as img:
                img.size  # noqa: B018
        except (UnidentifiedImageError, OSError) as e:
            return f"image id {sid!r}: {file} is not a readable image ({type(e).__name__})"
        return None

    def dim(self, sid: str) -> int | None:
        """The feature dimension of an image (None for pixels)."""
        if self.kind == "regions":
            return int(self.reader[sid]["features"].shape[1])
        if self.kind == "clip":
            return int(self.reader.dim)
        return None

    def fields(self, image: Any) -> dict[str, Any] | None:
        """The example fields of an image id (an image file path too, for "images"); None: an image skipped."""
        if self.kind == "regions":
            return {"visual": self.reader[str(image)]}
        if self.kind == "clip":
            return clip_fields(self.reader[str(image)])
        assert self.pixels is not None
        given = Path(str(image))  # an image file path (inference), else an id in the directory
        file = given if given.suffix.lower() in IMAGE_SUFFIXES and given.is_file() else self.image_file(str(image))
        if file is None:
            raise DataError(f"{self.path}: no image file for image id {str(image)!r}")
        pixels = self.pixels(file)
        return None if pixels is None else {"pixels": pixels}


class ClipRegionCollator(ClipCollator):
    """CLIP-file input: `ClipCollator` whose `clip_feats` (B, 1, D) also come from the one whole-image region when
    the examples carry only `visual` (retrieval's multiple-choice rows, the ranking gallery's images), so CLIP-BERT
    sees the image there too. `visual_batch(visuals)`: a gallery's image keys (`vl.models.ranking.gallery_scorer`)."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(examples)
        if "clip_feats" not in batch and "visual_feats" in batch:
            batch["clip_feats"] = batch["visual_feats"][:, :1].clone()
        return batch

    def visual_batch(self, visuals: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = pad_regions(visuals, self.max_regions, fixed=self.fixed_shapes)
        out["clip_feats"] = out["visual_feats"][:, :1].clone()
        return out


class PixelChoiceCollator(ImageCollator):
    """Image-directory input: `ImageCollator`, plus retrieval's multiple-choice examples whose choices carry the
    image's fields (`{"pixels"}`) as their `visual` (B*K*C rows, block-major, + `mc_labels`), and `visual_batch`
    for the ranking gallery (`pixel_values` of the gallery images)."""

    def __call__(self, examples: list[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [ex for ex in examples if ex is not None]
        if kept and "choices" not in kept[0] and "pixels" not in kept[0]:  # texts alone (the gallery's queries)
            return Collator.__call__(self, kept)
        if not kept or "choices" not in kept[0]:
            return super().__call__(examples)
        rows = [
            {
                "text": c["text"],
                "pixels": c["visual"]["pixels"],
                "index": ex.get("index", 0),
                "epoch": ex.get("epoch", 0),
            }
            for ex in kept
            for c in ex["choices"]
        ]
        batch = super().__call__(rows)
        batch["mc_labels"] = torch.tensor([list(ex["mc_labels"]) for ex in kept], dtype=torch.long)
        batch["index"] = torch.tensor([ex.get("index", 0) for ex in kept])
        return batch

    def visual_batch(self, visuals: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": stack_pixels([v["pixels"] for v in visuals], self.pad_value)}


def clip_fields(feat: np.ndarray) -> dict[str, Any]:
    feat = np.asarray(feat, dtype=np.float32).reshape(1, -1)
    return {"clip": feat, "visual": {"features": feat, "boxes_norm": WHOLE_IMAGE_BOX, "num_boxes": 1}}


class VisualAsReader:
    """`reader[id]` -> the example fields (for `CaptionPairs` / `RetrievalTrain` / galleries, which read
    `reader[id]` as the example's `visual`): `Expanded` then spreads them into the example. `visual_only`: the
    region dict alone (retrieval's choices and galleries pair images with texts as region dicts)."""

    def __init__(self, source: VisualSource, *, visual_only: bool = False) -> None:
        self.source, self.visual_only = source, visual_only

    def __getitem__(self, image_id: Any) -> Any:
        fields = self.source.fields(image_id)
        if fields is None:
            raise DataError(
                f"{self.source.path}: image id {str(image_id)!r} could not be decoded (retrieval skips none)"
            )
        return fields.get("visual", fields) if self.visual_only else fields

    def __contains__(self, image_id: Any) -> bool:
        return self.source.problem(str(image_id)) is None


class Expanded(Dataset):
    """A dataset whose examples hold the source's fields under `visual` -> those fields in the example itself."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> dict[str, Any] | None:
        example = self.inner[key]
        fields = example.pop("visual")
        return None if fields is None else {**example, **fields}


def source_collator(kind: str, base: Collator, pad_value: Any = None) -> Collator:
    """`base` (a region collator) with its options, for a `VisualSource` of `kind`: `ClipRegionCollator` for a CLIP
    file, `PixelChoiceCollator` for an image directory (`pad_value`: its transform's `batch_pad_value`, what a batch
    of different canvases is padded with), `base` itself for region features."""
    if kind == "regions":
        return base
    options = {
        "max_text_len": base.max_text_len,
        "max_regions": base.max_regions,
        "mlm": base.mlm,
        "mlm_probability": base.mlm_probability,
        "region_masking": base.region_masking,
        "fixed_shapes": base.fixed_shapes,
        "labels": base.labels,
    }
    if kind == "clip":
        return ClipRegionCollator(base.tokenizer, **options)
    return PixelChoiceCollator(base.tokenizer, **options, pad_value=pad_value)
