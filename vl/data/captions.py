"""Image-caption pairs for pretraining (MLM + ITM): COCO-style captions JSON + region-feature LMDB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vl.data.base import VLDataModule
from vl.data.features import RegionReader
from vl.data.formats.coco import load_coco_captions
from vl.data.samplers import global_seed, split_key
from vl.errors import DataError


def load_caption_tsv(path: Path) -> list[dict[str, Any]]:
    """Conceptual-Captions-style TSV, one `caption<TAB>image_id` a line -> [{"id", "image_id", "caption"}]."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise DataError(f"{path}:{lineno}: expected 'caption<TAB>image_id', got {len(fields)} field(s)")
        # the id as written: "007" and "img055" are feature keys as they stand (int("007") would look up "7")
        out.append({"id": lineno, "image_id": fields[1].strip(), "caption": fields[0]})
    return out


def load_captions(path: Path) -> list[dict[str, Any]]:
    """Caption annotations from a COCO captions JSON or a Conceptual-Captions-style TSV (by suffix)."""
    if path.suffix == ".tsv":
        return load_caption_tsv(path)
    return load_coco_captions(path)[1]


class CaptionPairs(Dataset):
    """One example per caption. With `itm`, half the captions are swapped for a caption of another image
    (`itm_label` 0), drawn from (seed, epoch, index): reproducible, and fixed on eval splits (epoch 0)."""

    def __init__(
        self,
        captions: list[dict[str, Any]],
        regions: RegionReader,
        *,
        itm: bool,
        seed: int = 0,
    ) -> None:
        self.captions = captions
        self.regions = regions
        self.itm = itm
        self.seed = seed

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        return self.finish(self.record(index), epoch)

    def record(self, index: int) -> dict[str, Any]:
        """The stored part of example `index` (`vl.data.streaming`): the caption and its image's regions."""
        ann = self.captions[index]
        return {
            "text": ann["caption"],
            "image_id": ann["image_id"],
            "index": index,
            "visual": self.regions[str(ann["image_id"])],
        }

    def finish(self, record: dict[str, Any], epoch: int) -> dict[str, Any]:
        """A record -> the example at `epoch`: with `itm`, the caption swapped for a negative (from (seed, epoch,
        index)) half of the time."""
        example = dict(record)
        example["epoch"] = epoch
        if self.itm:
            index = int(record["index"])
            rng = np.random.default_rng((self.seed, epoch, index))
            coin, other = rng.random(), int(rng.integers(len(self.captions)))
            example["itm_label"] = 1
            if coin < 0.5:
                while self.captions[other]["image_id"] == record["image_id"]:
                    other = (other + 1) % len(self.captions)
                example["text"] = self.captions[other]["caption"]
                example["itm_label"] = 0
        return example

    def stream_context(self) -> dict[str, Any]:
        """What `finish` draws ITM negatives from: every caption with its image id."""
        return {"captions": [{"caption": a["caption"], "image_id": a["image_id"]} for a in self.captions]}


class CaptionsDataModule(VLDataModule):
    """`data=captions`: `captions` per split (COCO captions JSON, or a Conceptual-Captions-style TSV
    `caption<TAB>image_id`: `data.captions=cc/{split}.tsv`) + `features` (region LMDB / HDF5 / FRCNN JSON)."""

    # image ids stay as the files give them (COCO ints, TSV strings such as "img055"): a list of strings in the batch
    label_keys = {"itm_label": ("itm_labels", "long"), "image_id": ("image_id", "str")}

    def __init__(
        self,
        *,
        captions: str = "annotations/captions_{split}.json",
        features: str = "regions.lmdb",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.captions_file = captions
        self.features_file = features

    def required_files(self) -> list[Path]:
        files = [self.path(self.captions_file, split) for split in ("train", "val", "test")]
        return files + [self.path(self.features_file)]

    def build_dataset(self, split: str) -> CaptionPairs:
        path = self.path(self.captions_file, split)
        annotations = load_captions(path)
        missing = next((a["image_id"] for a in annotations if str(a["image_id"]) not in self.regions), None)
        if missing is not None:
            raise DataError(f"{self.regions.path}: no region features for image id {missing} (used in {path})")
        if "itm" in self.objectives and len({str(a["image_id"]) for a in annotations}) < 2:  # no negative to draw
            raise DataError(f"{path}: split '{split}' needs captions of 2+ images for ITM negatives")
        return CaptionPairs(annotations, self.regions, itm="itm" in self.objectives, seed=global_seed())

    def stream_finisher(self, split: str, context: dict[str, Any]) -> CaptionPairs:
        captions = context.get("captions")
        if not isinstance(captions, list) or not captions:
            raise DataError(f"{self.streaming_dir}: the shard side file has no caption list for split {split}")
        return CaptionPairs(captions, None, itm="itm" in self.objectives, seed=global_seed())  # type: ignore[arg-type]

    @property
    def info(self) -> dict[str, Any]:
        first = self.regions[self.regions.ids()[0]]
        cls_prob = first.get("cls_prob")
        return {
            "visual_dim": int(first["features"].shape[1]),
            "num_region_classes": int(cls_prob.shape[1]) if cls_prob is not None else 0,
        }
