"""Image-text retrieval fine-tuning (ViLBERT Flickr30k / COCO layout): 4-way multiple-choice training, and
text-to-image ranking galleries for val/test.

Files (``vl.data.formats.retrieval``): ``retrieval/{split}.jsonl`` ({"img_path", "sentences"}), the train
``retrieval/hard_negative.pkl`` ({"train_image_list", "train_hard_pool"}) and region features (``regions.lmdb``) keyed
by the ``img_path`` stem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vl.data.base import RetrievalQueries, VLDataModule
from vl.data.collate import check_text_truncation
from vl.data.features import RegionReader
from vl.data.formats.retrieval import (
    image_key,
    load_hard_negatives,
    load_retrieval_jsonl,
)
from vl.data.region_rules import check_global_token
from vl.data.samplers import global_seed, split_key
from vl.errors import ConfigError, DataError

#: tries at drawing a negative whose caption is not one of the true image's captions (identical texts are not negatives)
_NEGATIVE_TRIES = 16


def _seed(seed: int | None) -> int:
    return global_seed() if seed is None else int(seed)


class RetrievalTrain(Dataset):
    """One example per (image, caption) pair: 4-way multiple choice with the true pair as choice 0.

    ``__getitem__((epoch, index))`` -> ``{"choices": [4 x {"text": str, "visual": region dict}], "mc_labels": [0],
    "index", "epoch"}``; choices: 0 true pair, 1 (image, caption of a random other image), 2 (random other image,
    caption), 3 (image, caption of an image from the image's hard-negative pool row; a random other image when there
    is no pool). Every draw comes from ``np.random.default_rng((seed, epoch, index))``; negatives whose caption text
    equals one of the true image's captions are redrawn (up to a few times)."""

    def __init__(
        self,
        image_ids: list[str],
        sentences: list[list[str]],
        regions: RegionReader,
        hard_pool: np.ndarray | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        if len(image_ids) < 2:
            raise ValueError("retrieval training needs at least 2 images (negatives come from other images)")
        self.image_ids = image_ids
        self.sentences = sentences
        self.regions = regions
        self.hard_pool = hard_pool  # (N_images, K) positions into image_ids, or None
        self.seed = seed  # None: $PL_GLOBAL_SEED at item time
        self.caption_sets = [frozenset(s) for s in sentences]
        self.pairs = np.asarray([(i, j) for i, caps in enumerate(sentences) for j in range(len(caps))], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def _other_image(self, rng: np.random.Generator, image: int) -> int:
        other = int(rng.integers(len(self.image_ids) - 1))
        return other + 1 if other >= image else other

    def _other_caption(self, rng: np.random.Generator, image: int) -> str:
        """A caption of a random other image, not one of ``image``'s captions when a few tries can find one."""
        for _ in range(_NEGATIVE_TRIES):
            other = self._other_image(rng, image)
            text = self.sentences[other][int(rng.integers(len(self.sentences[other])))]
            if text not in self.caption_sets[image]:
                break
        return text

    def _other_visual_image(self, rng: np.random.Generator, image: int, caption: str) -> int:
        """A random other image that does not carry ``caption`` among its captions (when a few tries find one)."""
        for _ in range(_NEGATIVE_TRIES):
            other = self._other_image(rng, image)
            if caption not in self.caption_sets[other]:
                break
        return other

    def _hard_caption(self, rng: np.random.Generator, image: int) -> str:
        """A caption of an image in ``image``'s pool row (visited in random order: the first with a caption that is
        not one of ``image``'s); a random other image's caption when the row is empty or only holds the image."""
        row = self.hard_pool[image] if self.hard_pool is not None else np.zeros(0, np.int64)
        row = row[row != image]
        if not len(row):
            return self._other_caption(rng, image)
        order = rng.permutation(len(row))
        for h in row[order]:
            fresh = [c for c in self.sentences[int(h)] if c not in self.caption_sets[image]]
            if fresh:
                return fresh[int(rng.integers(len(fresh)))]
        h = int(row[order[0]])
        return self.sentences[h][int(rng.integers(len(self.sentences[h])))]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        image, cap = (int(x) for x in self.pairs[index])
        rng = np.random.default_rng((_seed(self.seed), epoch, index))
        caption = self.sentences[image][cap]
        random_caption = self._other_caption(rng, image)
        random_image = self._other_visual_image(rng, image, caption)
        hard_caption = self._hard_caption(rng, image)
        visual = self.regions[self.image_ids[image]]
        return {
            "choices": [
                {"text": caption, "visual": visual},
                {"text": random_caption, "visual": visual},
                {"text": caption, "visual": self.regions[self.image_ids[random_image]]},
                {"text": hard_caption, "visual": visual},
            ],
            "mc_labels": [0],
            "index": index,
            "epoch": epoch,
        }


class GalleryVisuals(Sequence):
    """Lazy list of the gallery's region dicts: ``visuals[i]`` reads image i from the reader (so a 1k-image gallery
    of 100x2048 regions is not held in memory); slices give lists."""

    def __init__(self, image_ids: list[str], regions: RegionReader) -> None:
        self.image_ids = image_ids
        self.regions = regions

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self.regions[k] for k in self.image_ids[i]]
        return self.regions[self.image_ids[i]]


class RetrievalDataModule(VLDataModule):
    """`data=retrieval`: ``jsonl`` per split + ``features`` (region LMDB / HDF5 / FRCNN JSON keyed by the img_path
    stem) + train ``hard_negatives`` (None: choice 3 is a random other image's caption).

    Train: every (image, caption) pair (``RetrievalTrain``). Val/test: the first ``max_images`` images (all when
    None) x their first ``captions_per_image`` captions as queries (``RetrievalQueries``) over ``gallery(split)``.
    With ``root=None`` the embedded scene corpus (``vl.data.scenes.corpus``) holds these files.

    ``global_token`` (``vl.data.region_rules.GLOBAL_TOKEN``): "all" (default, vilbert_beta's reader): ViLBERT's global image
    token is the mean of all the image's regions in the feature file, also those past ``max_regions``; "kept": of the
    kept ones (vl's earlier behaviour). Other models do not read it.

    ``text_truncation`` (``vl.data.collate.TEXT_TRUNCATION``): "seed" (default, vilbert_beta's reader): ``[CLS] caption
    [SEP]`` cut to ``max_text_len``, so an over-long caption loses its [SEP]; "tokenizer": the tokenizer's truncation (cuts
    the caption's tokens, keeps [SEP])."""

    corpus_parts = ("retrieval",)

    label_keys = {"gold": ("gold", "long"), "query_index": ("query_index", "long")}

    prediction_file = "retrieval_predictions.json"  # per query: gold image, rank

    def __init__(
        self,
        *,
        jsonl: str = "retrieval/{split}.jsonl",
        hard_negatives: str | None = "retrieval/hard_negative.pkl",
        features: str = "regions.lmdb",
        captions_per_image: int = 5,
        max_images: int | None = None,
        global_token: str = "all",
        text_truncation: str = "seed",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.global_token = check_global_token(global_token)
        self.text_truncation = check_text_truncation(text_truncation)
        if int(captions_per_image) < 1:
            raise ConfigError(f"data.captions_per_image must be >= 1, got {captions_per_image}")
        if max_images is not None and int(max_images) < 1:
            raise ConfigError(f"data.max_images must be >= 1 or null, got {max_images}")
        self.jsonl_file = jsonl
        self.hard_negatives_file = hard_negatives
        self.features_file = features
        self.captions_per_image = int(captions_per_image)
        self.max_images = None if max_images is None else int(max_images)
        self._galleries: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ files
    def required_files(self) -> list[Path]:
        files = [self.path(self.jsonl_file, split) for split in ("train", "val", "test")]
        if self.hard_negatives_file is not None:
            files.append(self.path(self.hard_negatives_file))
        return files + [self.path(self.features_file)]

    def _load_split(self, split: str) -> tuple[Path, list[str], list[list[str]]]:
        """(jsonl path, image keys, captions per image); DataError for an image without region features."""
        path = self.path(self.jsonl_file, split)
        records = load_retrieval_jsonl(path)
        image_ids = [image_key(r["img_path"]) for r in records]
        missing = next((r["img_path"] for r in records if image_key(r["img_path"]) not in self.regions), None)
        if missing is not None:
            raise DataError(
                f"{self.regions.path}: no region features for image {image_key(missing)!r} "
                f"(field 'img_path' {missing!r} in {path})"
            )
        return path, image_ids, [r["sentences"] for r in records]

    def _hard_pool(self, jsonl: Path, image_ids: list[str]) -> np.ndarray:
        """The pool re-indexed to positions in the train JSONL; DataError when its image list differs from it."""
        path = self.path(self.hard_negatives_file)
        pool_images, pool = load_hard_negatives(path)
        position = {k: i for i, k in enumerate(image_ids)}
        unknown = next((k for k in pool_images if k not in position), None)
        if unknown is not None:
            raise DataError(f"{path}: field 'train_image_list' has image {unknown!r}, which is not in {jsonl}")
        if len(pool_images) != len(image_ids):
            listed = set(pool_images)
            absent = next(k for k in image_ids if k not in listed)
            raise DataError(f"{path}: field 'train_image_list' lacks image {absent!r} of {jsonl}")
        to_jsonl = np.asarray([position[k] for k in pool_images], dtype=np.int64)
        out = np.empty_like(pool)
        out[to_jsonl] = to_jsonl[pool]
        return out

    # ------------------------------------------------------------------ datasets
    def gallery(self, split: str) -> dict[str, Any]:
        """Ranking gallery of a val/test split: ``texts`` [T] (image-major, first ``captions_per_image`` captions of
        each image), ``gold`` [T] (position of each text's image), ``image_ids`` [I] (first ``max_images`` images),
        ``visuals`` [I] region dicts (a lazy ``GalleryVisuals``)."""
        if split not in self._galleries:
            _, image_ids, sentences = self._load_split(split)
            if self.max_images is not None:
                image_ids, sentences = image_ids[: self.max_images], sentences[: self.max_images]
            texts, gold = [], []
            for i, caps in enumerate(sentences):
                for caption in caps[: self.captions_per_image]:
                    texts.append(caption)
                    gold.append(i)
            self._galleries[split] = {
                "texts": texts,
                "gold": gold,
                "image_ids": image_ids,
                "visuals": GalleryVisuals(image_ids, self.regions),
            }
        return self._galleries[split]

    def build_dataset(self, split: str) -> Dataset:
        if split != "train":
            g = self.gallery(split)
            return RetrievalQueries(g["texts"], g["gold"])
        path, image_ids, sentences = self._load_split("train")
        if len(image_ids) < 2:
            raise DataError(f"{path}: retrieval training needs at least 2 images, got {len(image_ids)}")
        pool = self._hard_pool(path, image_ids) if self.hard_negatives_file is not None else None
        return RetrievalTrain(image_ids, sentences, self.regions, pool)

    @property
    def info(self) -> dict[str, Any]:
        first = self.regions[self.regions.ids()[0]]
        return {"visual_dim": int(first["features"].shape[1]), "num_choices": 4, "mc_blocks": ["retrieval"]}

    def baselines(self, split: str = "test") -> dict[str, float]:
        """Recall@k of a random ranking over the split's gallery of I images: k / I."""
        n = len(self.gallery(split)["image_ids"])
        return {
            f"{split}/recall@1_chance": 1.0 / n,
            f"{split}/recall@5_chance": min(1.0, 5.0 / n),
            f"{split}/recall@10_chance": min(1.0, 10.0 / n),
        }

    def write_predictions(self, predictions: list[dict[str, Any]], path: Path, split: str = "test") -> Path:
        """``[{"query_index", "text", "gold_image", "rank", "top_images"}]`` sorted by query, from predictions
        ``{"query_index": int, "rank": int, "top": [image positions] (optional)}`` (other fields ignored); images are
        named by their ids in ``gallery(split)``."""
        g = self.gallery(split)
        rows = []
        for p in predictions:
            q = int(p["query_index"])
            rows.append(
                {
                    "query_index": q,
                    "text": g["texts"][q],
                    "gold_image": g["image_ids"][g["gold"][q]],
                    "rank": int(p["rank"]),
                    "top_images": [g["image_ids"][int(i)] for i in p.get("top", [])],
                }
            )
        Path(path).write_text(json.dumps(sorted(rows, key=lambda r: r["query_index"])))
        return Path(path)
