"""Multi30k for MM-BERT (`data=multi30k`, `data=multi30k_retrieval`, `data=multi30k_translation`,
`data=multi30k_mlt`, `data=multi30k_mt`, `data=wmt_text`, `data=aux_text`): the real layout of
``vl.data.formats.multi30k`` (``root`` = the ``flickr30k/`` dir), or the embedded scene corpus's Multi30k copy
(``root=null``: ``vl.data.scenes.writers.multi30k``, German captions generated from the scenes).

Tasks (``task``):
- ``pretrain``: Task A ``[CLS] EN [SEP] DE [SEP]`` + image; Task B the same images twice, EN only and DE only; Task C
  the text-only parallel pairs of ``wmt`` (WMT JSONL) without image. Objectives MLM (whole-word) + MVRC. With
  ``aux_text`` the aux text corpus (`vl.data.aux_text`) is batched jointly (CombinedLoader); with
  ``pretrain_tasks: []`` it is the only data (``data=aux_text``, a file per split).
- ``retrieval``: train = binary ITM, each caption paired with its image or (``negative_fraction`` 50 %) with a random
  other caption of the same language; ``languages`` en | de | both. Val/test: every caption (``eval_language``) ranked
  against every image of the split (the shared system's chunked gallery ranking); with ``exhaustive_test`` the test
  stage also scores all caption x image pairs per language, both directions, and writes the seed-layout scores files
  (``MMBertSystem.on_test_epoch_end``). ``languages: both`` with ``both_layout: joint`` (default, the seed's
  ``LANGUAGES_USED: both``): one row per annotation line, ``[CLS] EN [SEP] DE [SEP]`` (Task A's text layout), in
  training (a negative takes both captions of one other line) and as the val/test queries (``eval_language`` unused;
  exhaustive test: one joint caption x image matrix, ``test/both_*``, ``retrieval_scores_both.json``);
  ``both_layout: per_language``: an EN row and a DE row per line, ranked per language as above (vl's earlier rows).
- ``translation`` (the seed's ``translation_multi30k`` with vision, `ResNetVLBERTForPretrainingMultitask`): binary ITM
  on ``[CLS] EN [SEP] DE [SEP]`` + the EN line's image, a negative (``negative_fraction``) taking another line's DE
  caption only; val/test the same rows (ITM loss / accuracy); with ``exhaustive_test`` the test stage scores every EN x
  DE pair of the split with EN's image, ranks both ways (``test/translation_<de|en>_*``: the German caption retrieval
  of EN queries, and its transpose) and writes the seed's ``translation_scores.json`` (``translation_pairs``).
- ``mlt``: ``[CLS] word_en [SEP] caption_en [SEP]`` + image -> the index of word_de in ``MLT_vocab.txt`` (test2018:
  word_de lists every accepted word, any of them counts; ``mlt_rows``).
- ``mt``: EN -> DE on every German prefix (``mt_dataset``); greedy decoding and BLEU in ``MMBertSystem``.

Batches: ``vl.data.multi30k_collate.Multi30kCollator`` (tokenisation of every task, whole-word MLM, MVRC).

Rows -> examples: ``vl.data.multi30k_examples`` (regions, ITM negatives, the training flip ``flip_prob``: the seed's
``RandomHorizontalFlip`` on the boxes; the MLT and MT rows, ``TranslationRows``). Tokenizer, MT detokenisation and
BLEU: ``vl.data.multi30k_text``.

Regions: the per-image FRCNN JSON named by each record's ``frcnn`` field (``.zip@`` stripped), read through
``FrcnnJsonRegionReader`` (listed once, lazy handles), sorted by max class confidence, at most ``max_regions`` kept;
then text and boxes of a row share ``seq_len`` (64) positions as in the seed (``seed_truncation``: the longer of the two
loses one at a time), so a caption pair of ~30 tokens meets ~30 boxes, not 100.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vl.data.aux_text import AUX_EPOCHS, AUX_WINDOWS, AuxTextCorpus
from vl.data.base import RetrievalQueries, VLDataModule
from vl.data.features import FrcnnJsonRegionReader
from vl.data.formats.multi30k import (
    ANNOTATION_KEYS,
    MLT_KEYS,
    SPLIT_FILES,
    WMT_KEYS,
    frcnn_location,
    read_annotations,
    select_regions,
)
from vl.data.multi30k_collate import MT_TRUNCATION, Multi30kCollator
from vl.data.multi30k_examples import LazyVisuals, Multi30kExamples, TranslationRows
from vl.data.multi30k_text import MT_DETOKENIZE, load_multi30k_tokenizer
from vl.data.scenes import SceneSettings, ensure_corpus
from vl.data.scenes.writers.multi30k import ensure_multi30k
from vl.errors import ConfigError, DataError

TASKS = ("pretrain", "retrieval", "translation", "mlt", "mt")
LANGUAGES = ("en", "de", "both")
BOTH_LAYOUTS = ("joint", "per_language")


# ------------------------------------------------------------------------------------------------ module
class Multi30kDataModule(AuxTextCorpus, TranslationRows, VLDataModule):
    """See the module docstring. ``pretrain_tasks``: a subset of A, B, C; None = ["A"], the published config
    (``base_prec_16x16G_fp16_pretrained_LR6``: Task A + the aux corpus; the seed runs B and C as separate configs,
    chained through their checkpoints); [A, B, C] mixes the three in one loader (vl's earlier default, the tiny
    experiment's). ``flip_prob``: training rows' boxes mirrored with that probability (module docstring; 0.5 as the
    seed).
    Files relative to ``root`` (the ``flickr30k/`` dir): ``annotations`` (``{split}_frcnn.json``),
    ``train_annotations`` (the training split's file when it is another one: ``data=multi30k_5x``, the seed's
    ``multi30k_5x`` / ``multi30k_5x_mixed`` datasets, read ``train_frcnn_5captions_both.json``, five caption pairs an
    image, the same record fields; val / test keep ``annotations``; the seed also strips ``.0``-``.3`` from FRCNN
    paths, which its five-caption generator never writes: a no-op on its files, not copied), ``mlt_annotations`` /
    ``mlt_vocab`` (task mlt), ``wmt`` (Task C; relative to root).
    ``mlt_outputs``: the MLT head's size (the seed's ``MLT_words`` 1536; None = the MLT vocabulary's size).
    ``seq_len``: VL-BERT's joint limit on a row's text tokens + boxes (whole-image box included; 64 as the seed's
    datasets; None: none), applied per row after masking and per caption x image pair in the retrieval gallery
    (``Multi30kCollator.pair_batch``). ``mt_seq_len``: the same limit when translating (the seed's generate config:
    150), applied once, to the first decoding step's rows; the generated tokens are appended without truncating
    again (`vl.models.translation.greedy_translate`). ``mt_truncation``: an MT training / val row over ``seq_len``
    tokens: "seed" (default: its first seq_len - 1 tokens and its last [SEP], the [MASK] and label cut with it, as the
    seed's MT datasets) or "source" (vl's earlier: the EN source shortened, the [MASK] kept; `Multi30kCollator`).
    ``mt_max_steps``: at most that many generated tokens (49: the
    seed's ``while not all(stop) and curr_len <= max_len`` with ``max_len = 48`` runs 49 steps). ``mt_detokenize``:
    how the generated ids become the hypothesis (`detokenize`: "seed", default, the seed's join of token strings;
    "hf": the tokenizer's ``decode``); the copy-the-source BLEU baseline goes through the same. ``lowercase``: the
    tokenizer lower-cases and strips accents (True, the seed's: its ``BertTokenizer`` defaults to
    ``do_lower_case=True``; every task's text, MT targets included, so MT hypotheses come out lower-cased while the
    BLEU references keep their case, only unidecoded, as the seed's ``evaluate_translation.py``); False: cased
    (`load_multi30k_tokenizer`)."""

    label_keys = {
        "itm_label": ("itm_labels", "long"),
        "mlt_label": ("mlt_labels", "long"),
        "mlt_options": ("mlt_options", "vector"),
        "gold": ("gold", "long"),
        "query_index": ("query_index", "long"),
    }

    def __init__(
        self,
        *,
        task: str = "pretrain",
        pretrain_tasks: list[str] | None = None,
        flip_prob: float = 0.5,
        languages: str = "both",
        both_layout: str = "joint",
        eval_language: str = "en",
        negative_fraction: float = 0.5,
        exhaustive_test: bool = True,
        mt_vision: bool = True,
        aux_text: str | None = None,
        aux_batch_size: int = 8,
        aux_min_words: int = 96,
        aux_seq_len: int = 96,
        aux_windows: str = "seed",
        aux_epoch: str = "seed",
        mt_max_steps: int = 49,
        mt_seq_len: int | None = 150,
        mt_detokenize: str = "seed",
        mt_truncation: str = "seed",
        annotations: str = "{split}_frcnn.json",
        train_annotations: str | None = None,
        mlt_annotations: str = "{split}_MLT_frcnn.json",
        mlt_vocab: str = "utils/MLT_vocab.txt",
        mlt_outputs: int | None = 1536,
        wmt: str | None = "../wmt/{split}.jsonl",
        tokenizer: str = "corpus",
        lowercase: bool = True,
        max_text_len: int = 64,
        max_regions: int = 100,
        seq_len: int | None = 64,
        splits: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            max_text_len=max_text_len,
            max_regions=max_regions,
            splits={"test": SPLIT_FILES["test"]} | dict(splits or {}),
            **kwargs,
        )
        if task not in TASKS:
            raise ConfigError(f"data.task: '{task}' is not one of {TASKS}")
        if languages not in LANGUAGES or eval_language not in ("en", "de"):
            raise ConfigError(f"data.languages must be one of {LANGUAGES} and data.eval_language en or de")
        if both_layout not in BOTH_LAYOUTS:
            raise ConfigError(f"data.both_layout: '{both_layout}' is not one of {BOTH_LAYOUTS}")
        self.both_layout = both_layout
        pretrain_tasks = ["A"] if pretrain_tasks is None else list(pretrain_tasks)
        unknown = sorted(set(pretrain_tasks) - {"A", "B", "C"})
        if unknown:
            raise ConfigError(f"data.pretrain_tasks: unknown task(s) {unknown}; choose from A, B, C")
        self.task, self.pretrain_tasks = task, list(pretrain_tasks)
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ConfigError(f"data.flip_prob: {flip_prob} is not a probability in [0, 1]")
        self.flip_prob = float(flip_prob)
        if seq_len is not None and int(seq_len) < 3:
            raise ConfigError(f"data.seq_len: {seq_len} leaves no room for [CLS] ... [SEP] and the image box")
        self.seq_len = None if seq_len is None else int(seq_len)
        self.languages, self.eval_language = languages, eval_language
        self.negative_fraction = float(negative_fraction)
        self.exhaustive_test = exhaustive_test
        self.mt_vision, self.mt_max_steps = mt_vision, int(mt_max_steps)
        self.mt_seq_len = None if mt_seq_len is None else int(mt_seq_len)
        if mt_detokenize not in MT_DETOKENIZE:
            raise ConfigError(f"data.mt_detokenize: '{mt_detokenize}' is not one of {MT_DETOKENIZE}")
        self.mt_detokenize = mt_detokenize
        if mt_truncation not in MT_TRUNCATION:
            raise ConfigError(f"data.mt_truncation: '{mt_truncation}' is not one of {MT_TRUNCATION}")
        self.mt_truncation = mt_truncation
        self.lowercase = bool(lowercase)
        self.aux_text, self.aux_batch_size = aux_text, int(aux_batch_size)
        self.aux_min_words, self.aux_seq_len = int(aux_min_words), int(aux_seq_len)
        if aux_windows not in AUX_WINDOWS:
            raise ConfigError(f"data.aux_windows: '{aux_windows}' is not one of {AUX_WINDOWS}")
        self.aux_windows = aux_windows
        if aux_epoch not in AUX_EPOCHS:
            raise ConfigError(f"data.aux_epoch: '{aux_epoch}' is not one of {AUX_EPOCHS}")
        self.aux_epoch = aux_epoch
        self.train_annotations = train_annotations
        self.annotations, self.mlt_annotations, self.mlt_vocab_file, self.wmt = (
            annotations,
            mlt_annotations,
            mlt_vocab,
            wmt,
        )
        self._readers: dict[Path, FrcnnJsonRegionReader] = {}
        self._galleries: dict[tuple[str, str], dict[str, Any]] = {}
        self._mlt_vocab: list[str] | None = None
        if mlt_outputs is not None and int(mlt_outputs) < 1:
            raise ConfigError(f"data.mlt_outputs: {mlt_outputs} is not a positive number of MLT head outputs")
        self.mlt_outputs = None if mlt_outputs is None else int(mlt_outputs)

    # ------------------------------------------------------------------ files
    @property
    def root(self) -> Path:
        if self._root is None and not self.root_arg:
            settings = SceneSettings(**self.corpus)
            scenes = ensure_corpus(Path(self.cache_dir), settings)
            self._root = ensure_multi30k(scenes, settings) / "flickr30k"
        return super().root

    def required_files(self) -> list[Path]:
        files = []
        for split in ("train", "val", "test"):
            if self.task == "mlt":
                files.append(self.path(self.mlt_annotations, split))
            else:
                files.append(self.annotation_file(split))
            if self.task == "pretrain" and "C" in self.pretrain_tasks and self.wmt:
                files.append(self.path(self.wmt, split))
        if self.task == "mlt":
            files.append(self.path(self.mlt_vocab_file))
        if self.uses_aux:
            files += self.aux_paths("train")
        if self.aux_alone:
            files += [path for split in ("train", "val", "test") for path in self.aux_paths(split)]
        return files

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            corpus_dir = None if self.root_arg else self.root.parent
            self._tokenizer = load_multi30k_tokenizer(self.tokenizer_name, corpus_dir, lowercase=self.lowercase)
        return self._tokenizer

    def reader(self, directory: str) -> FrcnnJsonRegionReader:
        path = self.root / directory
        if path not in self._readers:
            if not path.is_dir():
                raise DataError(f"{path}: per-image Faster R-CNN directory not found")
            self._readers[path] = FrcnnJsonRegionReader(path)
        return self._readers[path]

    def records(
        self, split: str, *, mlt: bool | None = None
    ) -> tuple[Path, list[dict[str, Any]], list[tuple[Any, str]]]:
        """(annotation file, its records, (reader, image id) per record); DataError naming file and line for an image
        without a per-image FRCNN file. `mlt`: the MLT annotations (a line per word pair) or the plain ones (a line per
        image); None: the MLT ones for `task: mlt`."""
        mlt = self.task == "mlt" if mlt is None else mlt
        path = self.path(self.mlt_annotations, split) if mlt else self.annotation_file(split)
        records = read_annotations(path, MLT_KEYS if mlt else ANNOTATION_KEYS)
        images = []
        for lineno, rec in enumerate(records, 1):
            directory, image_id = frcnn_location(str(rec["frcnn"]))
            reader = self.reader(directory)
            if image_id not in reader:
                raise DataError(
                    f"{path}:{lineno}: image {rec['image']!r} has no Faster R-CNN file {directory}/{image_id}.json"
                )
            images.append((reader, image_id))
        return path, records, images

    def annotation_file(self, split: str) -> Path:
        """The annotation JSONL of ``split``: ``train_annotations`` for the training split when set (the seed's
        ``multi30k_5x``: ``train_frcnn_5captions_both.json``), else ``annotations`` (``{split}_frcnn.json``)."""
        if split == "train" and self.train_annotations:
            return self.path(self.train_annotations, split)
        return self.path(self.annotations, split)

    # ------------------------------------------------------------------ datasets
    def _languages(self) -> list[str]:
        return ["en", "de"] if self.languages == "both" else [self.languages]

    @property
    def joint(self) -> bool:
        """Retrieval rows ``[CLS] EN [SEP] DE [SEP]``, one per annotation line (``languages: both``, ``both_layout:
        joint``: the seed's ``LANGUAGES_USED: both``)."""
        return self.languages == "both" and self.both_layout == "joint"

    def build_dataset(self, split: str) -> Dataset:
        if self.task == "retrieval" and split != "train":
            g = self.gallery(split)
            return RetrievalQueries(g["texts"], g["gold"])
        if self.aux_alone:
            return self.aux_dataset(split)
        path, records, images = self.records(split)
        flip = self.flip_prob if split == "train" else 0.0  # the seed's TRAIN.FLIP_PROB; VAL / TEST.FLIP_PROB 0
        rows: list[dict[str, Any]] = []
        if self.task == "pretrain":
            if "A" in self.pretrain_tasks:
                rows += [
                    {"text": r["caption_en"], "text_b": r["caption_de"], "image": im} for r, im in zip(records, images)
                ]
            if "B" in self.pretrain_tasks:
                for lang in ("en", "de"):
                    rows += [{"text": r[f"caption_{lang}"], "image": im} for r, im in zip(records, images)]
            if "C" in self.pretrain_tasks and self.wmt:
                wmt = read_annotations(self.path(self.wmt, split), WMT_KEYS)
                rows += [{"text": r["caption_en"], "text_b": r["caption_de"], "image": None} for r in wmt]
            return Multi30kExamples(rows, self.max_regions, flip_prob=flip)
        if self.task == "retrieval":
            if self.joint:  # Task A's text layout; a negative takes both captions of one other line
                rows = [
                    {"text": r["caption_en"], "text_b": r["caption_de"], "image": im, "language": "both"}
                    for r, im in zip(records, images)
                ]
                return Multi30kExamples(rows, self.max_regions, negatives=self.negative_fraction, flip_prob=flip)
            for lang in self._languages():
                rows += [
                    {"text": r[f"caption_{lang}"], "image": im, "language": lang} for r, im in zip(records, images)
                ]
            return Multi30kExamples(rows, self.max_regions, negatives=self.negative_fraction, flip_prob=flip)
        if self.task == "translation":  # EN + its image with its own DE, or (negatives) another line's DE
            rows = [{"text": r["caption_en"], "text_b": r["caption_de"], "image": im} for r, im in zip(records, images)]
            return Multi30kExamples(
                rows, self.max_regions, negatives=self.negative_fraction, flip_prob=flip, negative_fields=("text_b",)
            )
        if self.task == "mt":
            return self.mt_dataset(split, records, images)
        return Multi30kExamples(self.mlt_rows(path, records, images), self.max_regions, flip_prob=flip)

    def gallery(self, split: str, language: str | None = None) -> dict[str, Any] | None:
        """Retrieval val/test: caption i (``language``, default ``eval_language``; ``"both"``, the default of the joint
        layout: ``{"text": EN, "text_b": DE}``, the ``[CLS] EN [SEP] DE [SEP]`` query) of image i; every caption
        ranked against every image."""
        if self.task != "retrieval" or split == "train":
            return None
        language = language or ("both" if self.joint else self.eval_language)
        if (split, language) not in self._galleries:
            _, records, images = self.records(split)
            if language == "both":
                texts: list[Any] = [{"text": r["caption_en"], "text_b": r["caption_de"]} for r in records]
            else:
                texts = [r[f"caption_{language}"] for r in records]
            self._galleries[split, language] = {
                "texts": texts,
                "gold": list(range(len(records))),
                "image_ids": [im[1] for im in images],
                "visuals": LazyVisuals(images, self.max_regions),
            }
        return self._galleries[split, language]

    def translation_pairs(self, split: str) -> tuple[list[str], list[str], LazyVisuals]:
        """The split's EN captions, DE captions and images, line-aligned: EN i with DE j is scored on image i."""
        _, records, images = self.records(split)
        en, de = [r["caption_en"] for r in records], [r["caption_de"] for r in records]
        return en, de, LazyVisuals(images, self.max_regions)

    @property
    def info(self) -> dict[str, Any]:
        for split in ("train", "val", "test"):
            _, _, images = self.records(split)
            if images:
                break
        first = select_regions(images[0][0][images[0][1]], self.max_regions)
        info = {"visual_dim": int(first["features"].shape[1]), "vocab_size": len(self.tokenizer)}
        if first.get("cls_prob") is not None:
            info["num_region_classes"] = int(first["cls_prob"].shape[1])
        if self.task == "mlt":
            info["num_mlt_words"] = self.num_mlt_outputs()
        return info

    def baselines(self, split: str = "test") -> dict[str, float]:
        if self.task == "translation":
            n = len(self.records(split)[1])
            return {
                f"{split}/translation_{lang}_recall@{k}_chance": min(1.0, k / n)
                for lang in ("de", "en")
                for k in (1, 5, 10)
            }
        if self.task == "retrieval":
            n = len(self.gallery(split)["image_ids"])
            return {f"{split}/recall@{k}_chance": min(1.0, k / n) for k in (1, 5, 10)}
        return self.translation_baselines(split)

    # ------------------------------------------------------------------ loaders
    def collator(self, split: str) -> Multi30kCollator:
        if self.aux_alone:
            return self.aux_collator()
        return Multi30kCollator(
            self.tokenizer,
            max_text_len=self.max_text_len,
            max_regions=self.max_regions,
            mlm="mlm" in self.objectives and self.task != "mt",
            mlm_probability=self.mlm_probability,
            mvrc="mvrc" in self.objectives and self.task != "mt",
            labels=self.label_keys,
            seq_len=self.seq_len,
            mt_truncation=self.mt_truncation,
        )

    def scoring_collator(self) -> Multi30kCollator:
        return Multi30kCollator(
            self.tokenizer,
            max_text_len=self.max_text_len,
            max_regions=self.max_regions,
            fixed_shapes=True,
            labels=self.label_keys,
            seq_len=self.seq_len,
        )
