"""MM-BERT's batches (`vl.data.multi30k`): `Multi30kCollator` tokenises each row (``[CLS] EN [SEP] DE [SEP]``, the MT
prefix rows, the aux text chunks), masks whole words for MLM (`whole_word_mask`, VL-BERT's ``random_word_wwm``), pads
the regions and draws the MVRC choices; its randomness comes from (seed, epoch, index) per row (`vl.data.draws`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vl.batch import IGNORE_INDEX
from vl.data.collate import collate_labels
from vl.data.draws import example_keys, global_seed, uniforms
from vl.data.region_batch import pad_regions
from vl.errors import ConfigError, DataError

__all__ = ["MT_TRUNCATION", "Multi30kCollator", "seed_truncation", "whole_word_mask"]

#: how an MT row ``[CLS] EN [SEP] DE prefix [MASK] [SEP]`` longer than its limit is cut (`Multi30kCollator`)
MT_TRUNCATION = ("seed", "source")


def seed_truncation(n_text: int, n_boxes: int, seq_len: int) -> tuple[int, int]:
    """VL-BERT's datasets (MM-BERT's `seq_len`, default 64): (text tokens kept, boxes kept) of a row whose text has
    `n_text` tokens and whose image `n_boxes` boxes (the whole-image box included). While the two exceed `seq_len`,
    drop a box when there are more boxes than tokens, else a token; then at least 2 tokens and 1 box stay. The kept
    text is its first `kept - 1` tokens and its last ([SEP]); the kept boxes are the first ones."""
    if n_text + n_boxes <= seq_len:
        return n_text, n_boxes
    text, boxes = n_text, n_boxes
    while text + boxes > seq_len and text > 0 and boxes > 0:
        if boxes > text:
            boxes -= 1
        else:
            text -= 1
    return max(text, 2), max(boxes, 1)


def whole_word_mask(
    input_ids: list[int],
    word_keys: Sequence[Any],
    *,
    rng: np.random.Generator,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
) -> tuple[list[int], list[int]]:
    """VL-BERT's ``random_word_wwm``: each word (tokens sharing a ``word_keys`` entry; None = special, never masked)
    is chosen with ``probability``; all its sub-tokens are then 80 % [MASK], 10 % random tokens, 10 % kept, and
    labelled with their ids (IGNORE_INDEX elsewhere)."""
    ids, labels = list(input_ids), [IGNORE_INDEX] * len(input_ids)
    words: dict[Any, list[int]] = {}
    for pos, key in enumerate(word_keys):
        if key is not None:
            words.setdefault(key, []).append(pos)
    for positions in words.values():
        p = rng.random()
        if p >= probability:
            continue
        p /= probability
        for pos in positions:
            labels[pos] = input_ids[pos]
            if p < 0.8:
                ids[pos] = mask_token_id
            elif p < 0.9:
                ids[pos] = int(rng.integers(vocab_size))
    return ids, labels


class Multi30kCollator:
    """Examples -> MM-BERT batch: per-row tokenisation (``text`` [+ ``text_b``]: ``[CLS] EN [SEP] DE [SEP]``; all token
    types 0), whole-word MLM, regions padded (``has_image``, ``visual_image_size``), MVRC choices (15 % of the real
    regions; 90 % of them ``mvrc_replace``d), declared labels. Randomness per row from (seed, epoch, index), never the global RNG or the batch.
    ``add_special_tokens`` False: the aux text corpus (no [CLS] / [SEP]). ``aux_text``: the rows are the aux text
    corpus's (``aux_text`` (B,) True in the batch: the encoder gives them the learned aux visual embedding, other
    text-only rows zeros, as the seed). ``seq_len``: text and boxes of a row with an
    image truncated jointly as VL-BERT's datasets do (`seed_truncation`; after MLM and MVRC are drawn, the whole-image
    box's mean still over every region: ``image_mean_mask``); None: no joint limit. A training row's regions arrive
    already mirrored when the dataset drew a flip (`vl.data.multi30k_examples.flip_regions`, ``data.flip_prob``).
    ``mt_truncation``: an MT prefix row longer than ``min(seq_len, max_text_len)`` tokens: "seed" (default, the
    seed's MT datasets ``MT/data/datasets/multi30k.py`` / ``multi30k_no_vision.py``) keeps its first limit - 1 tokens
    and its last [SEP], so the [MASK] and its label go with the cut (the row then has no label); "source" (vl's
    earlier rule) shortens the EN source so the DE prefix, the [MASK] and its label stay. With an image the joint cut
    (``seq_len``) follows either way. Greedy decoding (`vl.models.translation.greedy_translate`) always uses "source"."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_text_len: int = 64,
        max_regions: int = 100,
        mlm: bool = False,
        mlm_probability: float = 0.15,
        mvrc: bool = False,
        mvrc_probability: float = 0.15,
        mvrc_replace_fraction: float = 0.9,
        fixed_shapes: bool = False,
        labels: dict[str, tuple[str, str]] | None = None,
        add_special_tokens: bool = True,
        aux_text: bool = False,
        seq_len: int | None = None,
        mt_truncation: str = "seed",
    ) -> None:
        if mt_truncation not in MT_TRUNCATION:
            raise ConfigError(f"data.mt_truncation: '{mt_truncation}' is not one of {MT_TRUNCATION}")
        self.mt_truncation = mt_truncation
        self.tokenizer = tokenizer
        self.seq_len = None if seq_len is None else int(seq_len)
        self.max_text_len, self.max_regions = max_text_len, max_regions
        self.mlm, self.mlm_probability = mlm, mlm_probability
        self.mvrc, self.mvrc_probability, self.mvrc_replace_fraction = mvrc, mvrc_probability, mvrc_replace_fraction
        self.fixed_shapes = fixed_shapes
        self.labels = dict(labels or {})
        self.add_special_tokens = add_special_tokens
        self.aux_text = aux_text

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        # each row's draws from (run seed, epoch, index), not from its batch (`vl.data.draws`)
        epochs = [int(ex.get("epoch", 0)) for ex in examples]
        indices = [int(ex.get("index", 0)) for ex in examples]
        keys = example_keys(global_seed(), epochs, indices)
        rows, label_rows = [], []
        mt_rows = False
        for ex, key in zip(examples, keys, strict=True):
            if "text_b_ids" in ex:  # MT: [CLS] EN [SEP] DE prefix ... [MASK] [SEP], only the [MASK] labelled
                tail = list(ex["text_b_ids"])
                tok = self.tokenizer
                if self.mt_truncation == "source":  # the EN source shortened: the [MASK] and its label stay
                    room = max(1, self.max_text_len - len(tail) - 3)
                    source = tok(ex["text"], add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
                else:
                    source = tok(ex["text"], add_special_tokens=False)["input_ids"]
                ids = [tok.cls_token_id, *source, tok.sep_token_id, *tail, tok.sep_token_id]
                labels = [IGNORE_INDEX] * len(ids)
                if "mt_label" in ex:
                    labels[len(ids) - 2] = int(ex["mt_label"])
                limit = max(min(self.seq_len or self.max_text_len, self.max_text_len), 2)
                if self.mt_truncation == "seed" and len(ids) > limit:  # the first limit - 1 tokens and the last [SEP]
                    ids, labels = ids[: limit - 1] + ids[-1:], labels[: limit - 1] + labels[-1:]
                label_rows.append(labels)
                mt_rows = True
                rows.append(ids)
                continue
            # an EN-DE pair is cut as the seed's datasets cut it (Task C's `parallel_text`; with an image, the joint cut
            # of `pair_batch` after this one keeps the same first tokens): `[CLS] EN [SEP] DE [SEP]` whole, MLM drawn,
            # then its first seq_len - 1 tokens + the last [SEP] (the tokenizer's longest-first cut EN and DE each)
            pair_row = ex.get("text_b") is not None and self.add_special_tokens
            limit = min(self.seq_len or self.max_text_len, self.max_text_len)
            enc = self.tokenizer(
                ex["text"],
                ex.get("text_b"),
                truncation=not pair_row,
                max_length=None if pair_row else self.max_text_len,
                add_special_tokens=self.add_special_tokens,
            )
            ids = list(enc["input_ids"])
            if self.mlm:
                seq, words = enc.sequence_ids(), enc.word_ids()
                word_keys = [None if s is None else (s, w) for s, w in zip(seq, words)]
                ids, labels = whole_word_mask(
                    ids,
                    word_keys,
                    rng=np.random.default_rng(int(key)),
                    mask_token_id=self.tokenizer.mask_token_id,
                    vocab_size=len(self.tokenizer),
                    probability=self.mlm_probability,
                )
            if pair_row and len(ids) > limit:
                ids = ids[: max(limit, 2) - 1] + ids[-1:]
                if self.mlm:  # cut with the row (the seed leaves its labels uncut: a bug, not copied)
                    labels = labels[: max(limit, 2) - 1] + labels[-1:]
            if self.mlm:
                label_rows.append(labels)
            rows.append(ids)
        width = self.max_text_len if self.fixed_shapes else max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "token_type_ids": torch.zeros_like(input_ids),  # EN and DE share token type 0
            "index": torch.tensor([int(ex.get("index", 0)) for ex in examples]),
        }
        if self.aux_text:
            batch["aux_text"] = torch.ones(len(rows), dtype=torch.bool)
        if label_rows and (self.mlm or mt_rows or any(v != IGNORE_INDEX for r in label_rows for v in r)):
            mlm_labels = torch.full_like(input_ids, IGNORE_INDEX)
            for i, r in enumerate(label_rows):
                mlm_labels[i, : len(r)] = torch.tensor(r)
            batch["mlm_labels"] = mlm_labels
        with_visual = [ex.get("visual") for ex in examples]
        template = next((v for v in with_visual if v is not None), None)
        if template is not None:
            empty = {
                "features": np.zeros((0, template["features"].shape[1]), np.float32),
                "boxes_norm": np.zeros((0, 4), np.float32),
                "cls_prob": None
                if template.get("cls_prob") is None
                else np.zeros((0, template["cls_prob"].shape[1]), np.float32),
            }
            visuals = [v if v is not None else empty for v in with_visual]
            if not self.fixed_shapes and max(v["features"].shape[0] for v in visuals) == 0:
                visuals[0] = {**empty, "features": np.zeros((1, empty["features"].shape[1]), np.float32)}
                visuals[0]["boxes_norm"] = np.zeros((1, 4), np.float32)
                if empty["cls_prob"] is not None:
                    visuals[0]["cls_prob"] = np.zeros((1, empty["cls_prob"].shape[1]), np.float32)
                padded = pad_regions(visuals, self.max_regions, fixed=False)
                padded["visual_mask"][0] = 0
            else:
                padded = pad_regions(visuals, self.max_regions, fixed=self.fixed_shapes)
            batch.update(padded)
            batch["has_image"] = torch.tensor([v is not None for v in with_visual])
            batch["visual_image_size"] = image_sizes(with_visual)
            if self.mvrc and "region_cls_prob" in batch:
                valid = batch["visual_mask"].bool()
                width = valid.shape[1]
                chosen = torch.from_numpy(uniforms(keys, width, 8) < self.mvrc_probability) & valid
                replace = torch.from_numpy(uniforms(keys, width, 9) < self.mvrc_replace_fraction) & chosen
                batch["region_mask_labels"], batch["mvrc_replace"] = chosen, replace
            self.pair_batch(batch)
        collate_labels(examples, self.labels, batch)
        return batch

    def pair_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Apply ``seq_len`` (`seed_truncation`) in place to a batch of text rows paired with images: each row with an
        image keeps its first text tokens and its last, and its first regions (``visual_mask`` / MVRC keys beyond
        them cleared); ``image_mean_mask`` records the regions the whole-image box averages before that (every real
        region not replaced for MVRC, as the seed computes it before truncating). Also called on the retrieval
        gallery's pair batches (`vl.models.ranking.gallery_scorer`), where a caption meets each image."""
        if self.seq_len is None or "visual_mask" not in batch:
            return batch
        valid = batch["visual_mask"].bool()
        if "image_mean_mask" not in batch:
            replace = batch.get("mvrc_replace")
            batch["image_mean_mask"] = valid if replace is None else valid & ~replace.bool()
        has_image = batch.get("has_image")
        n_text = batch["attention_mask"].sum(1).tolist()
        n_regions = valid.sum(1).tolist()
        fill = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        fill["mlm_labels"] = IGNORE_INDEX
        for i, (t, r) in enumerate(zip(n_text, n_regions)):
            if has_image is not None and not bool(has_image[i]):
                continue
            keep_text, keep_boxes = seed_truncation(t, 1 + r, self.seq_len)
            if keep_text < t:
                for key, pad in fill.items():
                    if key in batch:
                        row = batch[key][i]
                        row[keep_text - 1] = row[t - 1].clone()
                        row[keep_text:t] = pad
            if keep_boxes - 1 < r:
                for key in ("visual_mask", "region_mask_labels", "mvrc_replace"):
                    if key in batch:
                        batch[key][i, keep_boxes - 1 :] = 0
        return batch

    def visual_batch(self, visuals: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A retrieval gallery's image keys (`vl.models.ranking.gallery_scorer`), as `__call__` gives them for rows
        with these images: the padded regions (``visual_feats``, ``visual_boxes``, ``visual_mask``; no
        ``region_cls_prob``, scoring needs none), ``visual_image_size`` (B, 2) = (w, h), so that the whole-image box is
        [0, 0, w-1, h-1] / size as in training, and ``has_image`` (B,) all True."""
        out = pad_regions(visuals, self.max_regions, fixed=self.fixed_shapes)
        out.pop("region_cls_prob", None)
        out["has_image"] = torch.ones(len(visuals), dtype=torch.bool)
        out["visual_image_size"] = image_sizes(visuals)
        return out


def image_sizes(visuals: Sequence[dict[str, Any] | None]) -> torch.Tensor:
    """(B, 2) float (image_w, image_h) of each image's region dict; (1, 1) for a row without image (None)."""
    sizes = []
    for v in visuals:
        if v is None:
            sizes.append([1.0, 1.0])
            continue
        if v.get("image_w") is None or v.get("image_h") is None:
            image = v.get("image_id", "?")
            raise DataError(f"region features of image {image}: no image_w / image_h (MM-BERT's whole-image box)")
        sizes.append([float(v["image_w"]), float(v["image_h"])])
    return torch.tensor(sizes, dtype=torch.float32)
