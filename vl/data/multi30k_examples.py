"""Multi30k rows -> examples (`Multi30kExamples`: the image's selected regions, ITM negatives of the same language,
the training flip), `LazyVisuals` (the regions of a split's images, read when indexed) and `TranslationRows` (the rows,
vocabulary, baselines and hypotheses file of the MLT and MT tasks, a mixin of `Multi30kDataModule`).

Flip (``data.flip_prob``, the seed's ``TRAIN.FLIP_PROB`` 0.5; training split only, val/test never): a training row's
boxes are mirrored with that probability, drawn from (seed, epoch, index) (`flip_drawn`), as the seed's
``RandomHorizontalFlip`` does with precomputed features: the box coordinates only (`mirror_boxes`), never the features;
the whole-image box [0, 0, w-1, h-1] maps to itself."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vl.data.features.base import normalise_boxes
from vl.data.formats.multi30k import MLT_KEYS, read_annotations, read_mlt_vocab, select_regions
from vl.data.multi30k_text import detokenize, seed_bleu
from vl.data.samplers import global_seed, split_key
from vl.errors import ConfigError, DataError

__all__ = [
    "FLIP_STREAM",
    "flip_drawn",
    "mirror_boxes",
    "flip_regions",
    "Multi30kExamples",
    "LazyVisuals",
    "TranslationRows",
]


# ------------------------------------------------------------------------------------------------ flip
FLIP_STREAM = 7  # the flip's own random stream: (seed, epoch, index, FLIP_STREAM), apart from the ITM negatives'


def flip_drawn(epoch: int, index: int, probability: float) -> bool:
    """Whether row ``index`` of epoch ``epoch`` is mirrored (`Multi30kExamples`): one draw < ``probability`` from
    (seed, epoch, index), so a resumed run flips the same rows."""
    if probability <= 0.0:
        return False
    return bool(np.random.default_rng([global_seed(), epoch, index, FLIP_STREAM]).random() < probability)


def mirror_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """The seed's ``RandomHorizontalFlip`` on (N, 4) x1y1x2y2 boxes in the pixels of an image ``width`` px wide:
    ``boxes[:, [0, 2]] = w - 1 - boxes[:, [2, 0]]`` in float32 (y unchanged; [0, 0, w-1, h-1] maps to itself)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    out = boxes.copy()
    out[:, [0, 2]] = (np.float32(width) - np.float32(1.0)) - boxes[:, [2, 0]]
    return out


def flip_regions(visual: dict[str, Any]) -> dict[str, Any]:
    """A region dict (`select_regions`) with its boxes mirrored in the image's pixels (`mirror_boxes`, ``image_w``)
    and ``boxes_norm`` recomputed as the readers compute it (`vl.data.features.base.make_item`: box / (w, h, w, h),
    clipped to [0, 1]; the seed clamps to [0, w-1] after its flip); features, classes and order unchanged. The seed
    flips after resizing to its SCALES (600, 1000), so its ``- 1`` is one resized pixel; vl keeps the image's own
    pixels throughout (its whole-image box too), so the two agree up to that pixel's size."""
    w, h = float(visual["image_w"]), float(visual["image_h"])
    boxes = visual.get("boxes")
    if boxes is None:  # only normalised boxes: back to pixels first
        boxes = np.asarray(visual["boxes_norm"], dtype=np.float32) * np.array([w, h, w, h], dtype=np.float32)
    boxes = mirror_boxes(boxes, w)
    return {**visual, "boxes": boxes, "boxes_norm": normalise_boxes(boxes, w, h)}


# ------------------------------------------------------------------------------------------------ datasets
class Multi30kExamples(Dataset):
    """Plain rows ``{"text", "text_b"?, "image": (reader, id) | None, labels...}`` -> examples with the image's
    selected regions; ``negatives`` > 0: with that probability a row's caption is replaced by a random other row's
    caption of the same language (``itm_label`` 0), drawn from (seed, epoch, index); a row with ``text_b`` (the joint
    ``[CLS] EN [SEP] DE [SEP]`` retrieval rows) takes ``text`` and ``text_b`` together from that one other row.
    ``flip_prob`` > 0 (training): with that probability a row's boxes are mirrored (`flip_drawn`, `flip_regions`).
    ``negative_fields``: the fields a negative takes from the other row (default both captions; ``("text_b",)``: the
    translation rows' DE caption alone, the EN caption and the image kept, as the seed's ``translation_multi30k``)."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        max_regions: int,
        negatives: float = 0.0,
        flip_prob: float = 0.0,
        negative_fields: tuple[str, ...] = ("text", "text_b"),
    ) -> None:
        self.rows, self.max_regions, self.negatives, self.flip_prob = rows, max_regions, negatives, flip_prob
        self.negative_fields = tuple(negative_fields)
        self.by_language: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            self.by_language.setdefault(row.get("language", ""), []).append(i)

    def __len__(self) -> int:
        return len(self.rows)

    def visual(self, image: tuple[Any, str] | None) -> dict[str, Any] | None:
        if image is None:
            return None
        reader, image_id = image
        return select_regions(reader[image_id], self.max_regions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        row = self.rows[index]
        ex = {k: v for k, v in row.items() if k not in ("image", "language")}
        ex.update(visual=self.visual(row["image"]), index=index, epoch=epoch)
        if ex["visual"] is None:
            del ex["visual"]
        elif flip_drawn(epoch, index, self.flip_prob):
            ex["visual"] = flip_regions(ex["visual"])
        if self.negatives:
            rng = np.random.default_rng([global_seed(), epoch, index])
            ex["itm_label"] = 1
            if rng.random() < self.negatives:
                pool = self.by_language[row.get("language", "")]
                fields = [f for f in self.negative_fields if f in row]  # joint rows: both captions of one other line
                for _ in range(16):  # a different caption text (joint rows: a different caption pair)
                    other = self.rows[pool[int(rng.integers(len(pool)))]]
                    if any(other.get(f) != row[f] for f in fields):
                        ex.update({f: other[f] for f in fields}, itm_label=0)
                        break
        return ex


class LazyVisuals(Sequence):
    def __init__(self, images: list[tuple[Any, str]], max_regions: int) -> None:
        self.images, self.max_regions = images, max_regions

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        reader, image_id = self.images[i]
        return select_regions(reader[image_id], self.max_regions)


# ------------------------------------------------------------------------------------------------ task rows
class TranslationRows:
    """Mixin of `Multi30kDataModule` (listed before `VLDataModule` in its bases): what is particular to the two
    translation tasks, MLT (`mlt_rows`, its vocabulary `mlt_words` and head size `num_mlt_outputs`) and MT
    (`mt_dataset`, the hypotheses file `write_predictions`), and their computed baselines (`translation_baselines`)."""

    def mlt_rows(self, path: Path, records: list[dict[str, Any]], images: list[Any]) -> list[dict[str, Any]]:
        """MLT rows: ``[CLS] word_en [SEP] caption_en [SEP]`` + image -> the index of ``word_de`` in the MLT vocabulary.
        A ``word_de`` of several space-separated words (the seed's test2018: every accepted translation) is correct
        when the prediction is any of them (the seed's ``evaluate2018.py``: ``word_pred in word_de.split(' ')``); its
        training label is the first listed word in the vocabulary. DataError naming file and line when no listed word
        is in the vocabulary."""
        index = {w: i for i, w in enumerate(self.mlt_words)}
        rows = []
        for lineno, (rec, image) in enumerate(zip(records, images), 1):
            known = [index[w] for w in str(rec["word_de"]).split(" ") if w in index]
            if not known:
                raise DataError(f"{path}:{lineno}: word_de {rec['word_de']!r} is not in {self.mlt_vocab_file}")
            rows.append(
                {
                    "text": rec["word_en"],
                    "text_b": rec["caption_en"],
                    "image": image,
                    "mlt_label": known[0],
                    "options": known,
                }
            )
        width = max((len(r["options"]) for r in rows), default=1)
        for r in rows:
            options = r.pop("options")
            if width > 1:  # any listed word counts: the head reads `mlt_options` (-1 padded)
                r["mlt_options"] = options + [-1] * (width - len(options))
        return rows

    def mt_dataset(self, split: str, records: list[dict[str, Any]], images: list[Any]) -> Dataset:
        """MT (EN -> DE). Train / val: every German prefix of each sentence, its last token the labelled [MASK]
        (``tokenize(caption_de)[:pos + 1]``), plus one entry ending in [STOP]. Test: one row per sentence (the
        source, image and reference; ``MMBertSystem`` translates greedily; records marked ``"image_dependent": true``
        also score as a subset, ``test/bleu_image_dependent``). ``mt_vision`` False: no image (the no-vision
        variant). Training rows' boxes are mirrored with ``flip_prob`` (each prefix row drawn on its own index)."""
        tok = self.tokenizer
        stop = tok.convert_tokens_to_ids("[STOP]")
        rows: list[dict[str, Any]] = []
        for rec, image in zip(records, images):
            image = image if self.mt_vision else None
            if split == "test":
                rows.append(
                    {
                        "text": rec["caption_en"],
                        "reference": rec["caption_de"],
                        "image": image,
                        "image_dependent": bool(rec.get("image_dependent")),
                    }
                )
                continue
            target = tok(rec["caption_de"], add_special_tokens=False)["input_ids"] + [stop]
            for pos, label in enumerate(target):
                rows.append(
                    {
                        "text": rec["caption_en"],
                        "text_b_ids": [*target[:pos], tok.mask_token_id],
                        "mt_label": label,
                        "image": image,
                    }
                )
        return Multi30kExamples(rows, self.max_regions, flip_prob=self.flip_prob if split == "train" else 0.0)

    @property
    def mlt_words(self) -> list[str]:
        if self._mlt_vocab is None:
            self._mlt_vocab = read_mlt_vocab(self.path(self.mlt_vocab_file))
        return self._mlt_vocab

    def num_mlt_outputs(self) -> int:
        """The MLT head's outputs: ``mlt_outputs`` (the seed's ``MLT_words`` 1536 for its 1535-line MLT_vocab.txt),
        or the vocabulary's size when None; never fewer than the vocabulary's words (ConfigError)."""
        words = len(self.mlt_words)
        if self.mlt_outputs is None:
            return words
        if self.mlt_outputs < words:
            raise ConfigError(
                f"data.mlt_outputs: {self.mlt_outputs} is smaller than the {words} words of {self.mlt_vocab_file}"
            )
        return self.mlt_outputs

    def translation_baselines(self, split: str = "test") -> dict[str, float]:
        """The computed baselines of MT (BLEU of copying the source, detokenised as the hypotheses) and MLT (accuracy
        of the most frequent training word); {} for the other tasks."""
        if self.task == "mt":
            import sacrebleu

            _, records, _ = self.records(split)
            # copying the source's tokens, detokenised as the model's hypotheses are
            ids = self.tokenizer([r["caption_en"] for r in records], add_special_tokens=False)["input_ids"]
            sources = [detokenize(self.tokenizer, i, self.mt_detokenize) for i in ids]
            refs = [r["caption_de"] for r in records]
            out = {
                f"{split}/bleu_copy_source": seed_bleu(sources, refs),
                f"{split}/bleu_plain_copy_source": sacrebleu.corpus_bleu(sources, [refs]).score,
            }
            subset = [i for i, r in enumerate(records) if r.get("image_dependent")]
            if subset:
                out[f"{split}/bleu_image_dependent_copy_source"] = seed_bleu(
                    [sources[i] for i in subset], [refs[i] for i in subset]
                )
            return out
        if self.task == "mlt":
            train = [r["word_de"] for r in read_annotations(self.path(self.mlt_annotations, "train"), MLT_KEYS)]
            test = [r["word_de"] for r in read_annotations(self.path(self.mlt_annotations, split), MLT_KEYS)]
            top = Counter(train).most_common(1)[0][0]  # ties: the first seen (a set's order varies per process)
            hits = sum(top in w.split(" ") for w in test)  # any listed word counts (test2018)
            return {f"{split}/mlt_acc_most_frequent": hits / max(1, len(test))}
        return {}

    @property
    def prediction_file(self) -> str:  # type: ignore[override]
        return "mt_hypotheses.txt" if self.task == "mt" else "predictions.json"

    def write_predictions(self, predictions: list[dict[str, Any]], path: Path) -> Path | None:
        """MT: the greedy translations, one line per source sentence, in the test file's order."""
        if self.task != "mt":
            return None
        lines = [p["hypothesis"].replace("\n", " ") for p in sorted(predictions, key=lambda p: p["index"])]
        Path(path).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        return Path(path)
