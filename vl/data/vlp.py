"""`data=vlp`: the CLIP-BERT pretraining corpus: JSONL `{"text", "image_id"}` + CLIP image embeddings in HDF5.

Each example's image is one CLIP embedding, fed as `clip_feats` (B, 1, D) in float16 (`feature_dtype: float16`, the
default: the seed's loader returns the HDF5's float32 row as fp16, so the model sees it rounded to half precision; the
model casts it to its projection's dtype), or unrounded with `feature_dtype: float32` (vl's earlier default). The
same embedding is also given as a one-region visual input (`visual_feats` (B,1,D), whole-image box, float32) so
region-based models can read this corpus too.
`text_only: true` is the text-only baseline corpus (BERT-CLIP-BERT-train): the same captions, no image features at
all (the HDF5 is then neither required nor opened).

Build the JSONL from the original annotation files with `python -m vl.tools.build_vlp`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vl.data.base import VLDataModule
from vl.data.collate import Collator
from vl.data.features import ClipFeatureReader
from vl.data.formats.jsonl import load_jsonl
from vl.data.samplers import split_key
from vl.errors import ConfigError, DataError

FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}
WHOLE_IMAGE_BOX = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)


class TextImageLines(Dataset):
    """One example per JSONL line: `text`, and with a reader `clip` (1, D) + `visual` (one whole-image region)."""

    def __init__(
        self, records: list[dict[str, Any]], clip: ClipFeatureReader | None, *, dtype: Any = np.float32
    ) -> None:
        self.records = records
        self.clip = clip
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        rec = self.records[index]
        example: dict[str, Any] = {"text": rec["text"], "index": index, "epoch": epoch}
        if self.clip is not None:
            feat = self.clip[str(rec["image_id"])].reshape(1, -1)
            example["clip"] = feat.astype(self.dtype)
            example["visual"] = {"features": feat, "boxes_norm": WHOLE_IMAGE_BOX}
        return example


class ClipCollator(Collator):
    """The shared Collator (tokenise, MLM-mask, pad) + `clip_feats` (B, 1, D) from the examples' `clip`."""

    extra_keys = frozenset({"clip"})

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        if "clip" in examples[0]:
            batch["clip_feats"] = torch.from_numpy(np.stack([ex["clip"] for ex in examples]))
        return batch


class VLPDataModule(VLDataModule):
    """`data=vlp`: `jsonl` per split + `features` (CLIP HDF5: `features` (N,D), `ids`).
    `mlm_skip_special_ids`: MLM never picks any id in `tokenizer.all_special_ids` ([UNK] in the text included), as
    the CLIP-BERT seed's HF `DataCollatorForLanguageModeling` (default); false: only the tokenizer's added [CLS] /
    [SEP] and padding are skipped, as the shared collator does for the other systems."""

    def __init__(
        self,
        *,
        jsonl: str = "vlp/{split}.jsonl",
        features: str = "clip_features.hdf5",
        text_only: bool = False,
        feature_dtype: str = "float16",
        mlm_skip_special_ids: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mlm_skip_special_ids = mlm_skip_special_ids
        if feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"data.feature_dtype: '{feature_dtype}' is not one of {sorted(FEATURE_DTYPES)}")
        self.jsonl_file = jsonl
        self.features_file = features
        self.text_only = text_only
        self.feature_dtype = FEATURE_DTYPES[feature_dtype]
        self._clip: ClipFeatureReader | None = None

    def required_files(self) -> list[Path]:
        files = [self.path(self.jsonl_file, split) for split in ("train", "val", "test")]
        return files if self.text_only else files + [self.path(self.features_file)]

    @property
    def clip(self) -> ClipFeatureReader | None:
        if self.text_only:
            return None
        if self._clip is None:
            self._clip = ClipFeatureReader(self.path(self.features_file))
        return self._clip

    def build_dataset(self, split: str) -> TextImageLines:
        path = self.path(self.jsonl_file, split)
        records = load_jsonl(path, required=("text",) if self.text_only else ("text", "image_id"), texts=("text",))
        clip = self.clip
        if clip is not None:
            missing = next((r["image_id"] for r in records if str(r["image_id"]) not in clip), None)
            if missing is not None:
                raise DataError(f"{clip.path}: no CLIP features for image id {missing!r} (used in {path})")
        return TextImageLines(records, clip, dtype=self.feature_dtype)

    def collator(self, split: str) -> Collator:
        return ClipCollator(
            self.tokenizer,
            max_text_len=self.max_text_len,
            max_regions=1,
            mlm="mlm" in self.objectives,
            mlm_probability=self.mlm_probability,
            mlm_skip_special_ids=self.mlm_skip_special_ids,
        )

    def visual_example(self, image: Any) -> dict[str, Any]:
        """A CLIP image: an id in the CLIP feature file or a (D,) / (1, D) embedding; nothing for text-only runs."""
        if self.text_only:
            return {}
        if image is None:
            raise ConfigError("VLPDataModule: this model reads a CLIP image; pass a feature id or a (D,) embedding")
        if isinstance(image, (np.ndarray, torch.Tensor)):
            feat = np.asarray(image, dtype=np.float32).reshape(1, -1)
        else:
            if str(image) not in self.clip:
                raise DataError(f"{self.clip.path}: no CLIP features for image id {str(image)!r}")
            feat = self.clip[str(image)].reshape(1, -1)
        return {"clip": feat.astype(self.feature_dtype), "visual": {"features": feat, "boxes_norm": WHOLE_IMAGE_BOX}}

    def inference_collator(self) -> Collator:
        return ClipCollator(self.tokenizer, max_text_len=self.max_text_len, max_regions=1)

    @property
    def info(self) -> dict[str, Any]:
        if self.clip is None:
            return {}
        return {"clip_dim": self.clip.dim, "visual_dim": self.clip.dim, "num_region_classes": 0}
