"""VG-BERT's corpora from pixels (spec: vg_bert.md): COCO captions (stage 2 and transfer retrieval) and Visual Genome
objects + relations (stage 3), in the seed's JSON layouts (`vl.data.formats.vg_bert`), images decoded and transformed
in DataLoader workers (`transform: vg_bert` = Resize(256) + CenterCrop(224), ImageNet mean / std; the seed's VG loader
uses Resize(224) + CenterCrop(224): `transform_options: {size: 224}`).

Without `root`, the embedded corpus is written in these layouts on first use (`vl.data.scenes.writers.vg_bert`).

- `data=vg_bert_coco` (`VGBertCocoDataModule`): `json` per split (`{split}` replaced); one example per image; each
  `__getitem__` picks one line of its caption file at random (from (seed, epoch, index): resumed runs draw the same);
  in val / test too by default (`eval_caption: random`: the seed draws a line on every call, its val loader
  included; here each validation draws by the fit's epoch, a separate test by epoch 0); `eval_caption: fixed`: one
  line per image in every evaluation (vl's earlier rule: a val loss without the draw's noise). Tokenised as
  `[CLS] caption [SEP]`, padded / truncated to `max_text_len`
  (32; `text_truncation: seed`, the default, cuts `[CLS] caption [SEP]` at that length as the seed does, so an
  over-long caption loses its [SEP]; `tokenizer`: HF truncation keeps it). Baselines: chance R@k = k / N of the split.
- `data=vg_bert_vg` (`VGBertVGDataModule`): at most `max_objects` (32) objects of `max_object_tokens` (10) tokens
  (an object phrase cut as the captions are);
  batch keys object_ids / object_token_mask (B, 32, 10), object_mask (B, 32), object_target (B, 32) (0 for padding),
  relation_target (B, 32, 32) (0 = none / padding). Baselines: the majority relation (fitted on train) and the
  majority object class, as top-1 accuracies on the split.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vl.data.collate import check_text_truncation
from vl.data.formats.vg_bert import load_coco_json, load_vg_json
from vl.data.image_base import ImageDataModule
from vl.data.images import PixelLoader, build_transform, stack_pixels
from vl.data.samplers import global_seed, split_key
from vl.data.scenes import SceneSettings, ensure_corpus
from vl.data.scenes.writers.images import ensure_image_corpus
from vl.data.scenes.writers.vg_bert import ensure_vg_bert_corpus
from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["VGBertCocoDataModule", "VGBertVGDataModule", "CocoCaptions", "VGObjects", "VGCollator", "CaptionCollator"]


class CocoCaptions(Dataset):
    """COCO JSON records -> `{"text", "pixels", "index", "epoch"}` (one random caption line per call)."""

    def __init__(self, records: list[dict[str, Any]], pixels: PixelLoader, seed: int, fixed_line: bool) -> None:
        self.records, self.pixels, self.seed, self.fixed_line = records, pixels, seed, fixed_line

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        epoch, index = split_key(key)
        rec = self.records[index]
        rng = np.random.default_rng([self.seed, 0 if self.fixed_line else epoch, index])
        text = rec["captions"][int(rng.integers(len(rec["captions"])))]
        pixels = self.pixels(rec["image"])
        if pixels is None:
            return None
        return {"text": text, "pixels": pixels, "index": index, "epoch": epoch}


def encode_padded(tokenizer: Any, texts: list[str], length: int, truncation: str) -> dict[str, torch.Tensor]:
    """`[CLS] text [SEP]` rows padded to `length`; over it, "seed" (the seed's loaders: the tokenised `[CLS] text [SEP]`
    cut to `length`, [SEP] lost) or "tokenizer" (HF truncation: [SEP] kept)."""
    cut = 1 if truncation == "seed" else 0  # tokenised one longer, then cut: the seed's cut
    enc = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=length + cut,
        return_tensors="pt",
        return_token_type_ids=True,
    )
    return {key: value[:, :length] for key, value in enc.items()} if cut else dict(enc)


class CaptionCollator:
    """Examples -> input_ids / attention_mask / token_type_ids (B, max_text_len, padded to it as the seed),
    pixel_values (B, 3, H, W), index, images_skipped."""

    def __init__(self, tokenizer: Any, max_text_len: int = 32, truncation: str = "seed") -> None:
        self.tokenizer, self.max_text_len, self.truncation = tokenizer, max_text_len, truncation

    def __call__(self, examples: list[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [ex for ex in examples if ex is not None]
        if not kept:
            raise DataError(f"every image of a batch of {len(examples)} failed to load (on_bad_image=skip)")
        enc = encode_padded(self.tokenizer, [ex["text"] for ex in kept], self.max_text_len, self.truncation)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"],
            "pixel_values": stack_pixels([ex["pixels"] for ex in kept]),
            "index": torch.tensor([ex["index"] for ex in kept]),
            "images_skipped": len(examples) - len(kept),
        }


class VGObjects(Dataset):
    """VG JSON records -> `{"pixels", "object_ids", "object_token_mask", "object_mask", "object_target",
    "relation_target", "index"}` (objects beyond `max_objects` dropped, as the seed)."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        pixels: PixelLoader,
        tokenizer: Any,
        max_objects: int,
        max_tokens: int,
        truncation: str = "seed",
    ) -> None:
        self.records, self.pixels, self.tokenizer = records, pixels, tokenizer
        self.max_objects, self.max_tokens, self.truncation = max_objects, max_tokens, truncation

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        epoch, index = split_key(key)
        rec = self.records[index]
        pixels = self.pixels(rec["image"])
        if pixels is None:
            return None
        n = min(len(rec["objects"]), self.max_objects)
        m, t = self.max_objects, self.max_tokens
        ids = torch.zeros(m, t, dtype=torch.long)
        token_mask = torch.zeros(m, t, dtype=torch.long)
        if n:
            enc = encode_padded(self.tokenizer, list(rec["objects"][:n]), t, self.truncation)
            ids[:n], token_mask[:n] = enc["input_ids"], enc["attention_mask"]
        object_mask = torch.zeros(m, dtype=torch.long)
        object_mask[:n] = 1
        target = torch.zeros(m, dtype=torch.long)
        target[:n] = torch.tensor(rec["classes"][:n], dtype=torch.long)
        relation = torch.zeros(m, m, dtype=torch.long)
        if n:
            relation[:n, :n] = torch.tensor(rec["relation"], dtype=torch.long)[:n, :n]
        return {
            "pixels": pixels,
            "object_ids": ids,
            "object_token_mask": token_mask,
            "object_mask": object_mask,
            "object_target": target,
            "relation_target": relation,
            "index": index,
        }


class VGCollator:
    """Stacks `VGObjects` examples (None = a skipped image, counted in `images_skipped`); `input_ids` /
    `attention_mask` (B, N*L) are the object phrases flattened (the batch's text tokens, for the shared callbacks)."""

    KEYS = ("object_ids", "object_token_mask", "object_mask", "object_target", "relation_target")

    def __call__(self, examples: list[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [ex for ex in examples if ex is not None]
        if not kept:
            raise DataError(f"every image of a batch of {len(examples)} failed to load (on_bad_image=skip)")
        batch: dict[str, Any] = {k: torch.stack([ex[k] for ex in kept]) for k in self.KEYS}
        batch["pixel_values"] = stack_pixels([ex["pixels"] for ex in kept])
        batch["index"] = torch.tensor([ex["index"] for ex in kept])
        # the batch's text tokens, flattened (what the shared callbacks count: batch size, tokens)
        batch["input_ids"] = batch["object_ids"].flatten(1)
        batch["attention_mask"] = batch["object_token_mask"].flatten(1)
        batch["images_skipped"] = len(examples) - len(kept)
        return batch


class _VGBertData(ImageDataModule):
    """Shared: the embedded corpus root (images + the VG-BERT JSONs), the VG-BERT transform, no aspect grouping."""

    def __init__(
        self,
        *,
        json: str,
        transform: str = "vg_bert",
        group_by_aspect: bool = False,
        train_transform_options: dict[str, Any] | None = None,
        text_truncation: str = "seed",
        **kwargs: Any,
    ) -> None:
        """`train_transform_options`: the training split's transform options, when they differ from
        `transform_options` (the seed's transfer training loader: Resize(224) + CenterCrop(224); its evaluation
        256 / 224); None or empty: `transform_options` for every split. `text_truncation`
        (`vl.data.collate.TEXT_TRUNCATION`): "seed" (default): captions and object phrases cut as the seed's loaders
        cut `[CLS] text [SEP]`, losing [SEP] when over-long; "tokenizer": HF truncation, [SEP] kept."""
        super().__init__(transform=transform, group_by_aspect=group_by_aspect, **kwargs)
        self.text_truncation = check_text_truncation(text_truncation)
        self.json = json
        self.train_transform = (
            build_transform(transform, **dict(train_transform_options)) if train_transform_options else None
        )

    @property
    def root(self) -> Path:
        if self._root is None and not self.root_arg:
            settings = SceneSettings(**self.corpus)
            pixels = ensure_image_corpus(ensure_corpus(Path(self.cache_dir), settings), settings)
            ensure_vg_bert_corpus(pixels, settings)
            self._root = pixels
        return super().root

    def required_files(self) -> list[Path]:
        return [self.path(self.json, split) for split in ("train", "val", "test")]

    def check_images(self, split: str, records: list[dict[str, Any]]) -> None:
        """Every record's image file exists (a stat each, in `prepare_data`, before any compute; a wrong
        `image_base_path` failed at the first decode, mid-fit). `on_bad_image=error`: the first missing one is a
        DataError naming the JSON, the record and the path. `=skip` keeps its promise (a missing image is skipped
        and counted when read): the missing ones are logged once here, and a split with none of its images is a
        DataError (nothing to train or score on: a wrong path, not bad images)."""
        path = self.path(self.json, split)
        missing = [r for r in records if not Path(r["image"]).is_file()]
        if not missing:
            return
        first = f"data[{missing[0]['record']}]: image file {missing[0]['image']} not found"
        if self.on_bad_image == "error":
            raise DataError(f"{path}: {first} (its 'image' under 'image_base_path')")
        if len(missing) == len(records):
            raise DataError(
                f"{path}: none of its {len(records)} image files exists (first: {first}); check 'image_base_path'"
            )
        log.warning(
            "%s: %d of %d image files not found, skipped when read (first: %s)", path, len(missing), len(records), first
        )

    def pixels(self, split: str) -> PixelLoader:
        transform = self.train_transform if split == "train" and self.train_transform is not None else self.transform
        return PixelLoader(transform, self.on_bad_image)

    @property
    def seed(self) -> int:
        return global_seed()


class VGBertCocoDataModule(_VGBertData):
    """`data=vg_bert_coco`: COCO-layout captions + images (module docstring)."""

    def __init__(self, *, json: str = "vg_bert/coco_{split}.json", eval_caption: str = "random", **kwargs: Any) -> None:
        """`eval_caption`: "random" (the seed's: val / test draw a caption line per evaluation) or "fixed" (the same
        line every evaluation)."""
        if eval_caption not in ("random", "fixed"):
            raise ConfigError(f"data.eval_caption: '{eval_caption}' is not one of 'random', 'fixed'")
        super().__init__(json=json, **kwargs)
        self.eval_caption = eval_caption
        self.eval_epoch_keys = eval_caption == "random"
        self._records: dict[str, list[dict[str, Any]]] = {}

    def prepare_data(self) -> None:
        super().prepare_data()
        for split in ("train", "val", "test"):  # every record, caption file and image file checked before any compute
            self.check_images(split, self.records(split))

    def records(self, split: str) -> list[dict[str, Any]]:
        if split not in self._records:
            self._records[split] = load_coco_json(self.path(self.json, split))
        return self._records[split]

    def build_dataset(self, split: str) -> CocoCaptions:
        fixed = split != "train" and self.eval_caption == "fixed"
        return CocoCaptions(self.records(split), self.pixels(split), self.seed, fixed_line=fixed)

    def collator(self, split: str) -> CaptionCollator:
        return CaptionCollator(self.tokenizer, self.max_text_len, self.text_truncation)

    @property
    def info(self) -> dict[str, Any]:
        return {"pixels": True}

    def baselines(self, split: str = "test") -> dict[str, float]:
        n = len(self.records(split))
        return {f"{split}/r{k}_{d}_chance": min(1.0, k / n) for k in (1, 5, 10) for d in ("i2t", "t2i", "mean")}


class VGBertVGDataModule(_VGBertData):
    """`data=vg_bert_vg`: Visual-Genome-layout objects + relations + images (module docstring)."""

    def __init__(
        self,
        *,
        json: str = "vg_bert/vg_{split}.json",
        num_object_classes: int = 56,
        num_relations: int = 115,
        max_objects: int = 32,
        max_object_tokens: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(json=json, **kwargs)
        self.num_object_classes, self.num_relations = num_object_classes, num_relations
        self.max_objects, self.max_object_tokens = max_objects, max_object_tokens
        self._records: dict[str, list[dict[str, Any]]] = {}

    def prepare_data(self) -> None:
        super().prepare_data()
        for split in ("train", "val", "test"):  # every record and image file checked before any compute
            self.check_images(split, self.records(split))

    def records(self, split: str) -> list[dict[str, Any]]:
        if split not in self._records:
            self._records[split] = load_vg_json(
                self.path(self.json, split),
                num_object_classes=self.num_object_classes,
                num_relations=self.num_relations,
            )
        return self._records[split]

    def build_dataset(self, split: str) -> VGObjects:
        return VGObjects(
            self.records(split),
            self.pixels(split),
            self.tokenizer,
            self.max_objects,
            self.max_object_tokens,
            self.text_truncation,
        )

    def collator(self, split: str) -> VGCollator:
        return VGCollator()

    @property
    def info(self) -> dict[str, Any]:
        return {"pixels": True, "num_object_classes": self.num_object_classes, "num_relations": self.num_relations}

    def _relations(self, split: str) -> list[int]:
        m = self.max_objects
        return [r for rec in self.records(split) for row in rec["relation"][:m] for r in row[:m] if r > 0]

    def baselines(self, split: str = "test") -> dict[str, float]:
        """Top-1 accuracy of always answering the most frequent train relation / object class."""
        out: dict[str, float] = {}
        train_rel = Counter(self._relations("train"))
        rel = self._relations(split)
        if train_rel and rel:
            top = train_rel.most_common(1)[0][0]
            out[f"{split}/rel_acc_majority"] = sum(r == top for r in rel) / len(rel)
        classes = [c for rec in self.records("train") for c in rec["classes"][: self.max_objects] if c > 0]
        split_classes = [c for rec in self.records(split) for c in rec["classes"][: self.max_objects] if c > 0]
        if classes and split_classes:
            top = Counter(classes).most_common(1)[0][0]
            out[f"{split}/obj_acc1_majority"] = sum(c == top for c in split_classes) / len(split_classes)
        return out
