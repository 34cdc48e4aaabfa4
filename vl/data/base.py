"""Shared LightningDataModule base: embedded-corpus resolution, file checks, batch sizes, dataloaders."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vl.data.collate import REGION_MASKING, Collator, load_tokenizer, text_fields
from vl.data.features import RegionReader, open_region_features
from vl.data.features.cache import cached
from vl.data.formats.vqa import label2ans_of
from vl.data.region_rules import GlobalFeatureRegions, global_feature
from vl.data.samplers import (
    EpochShuffleSampler,
    GroupedEvalSampler,
    IndexBatches,
    ResumableDataLoader,
    UnpaddedDistributedSampler,
    global_seed,
    split_key,
)
from vl.data.scenes import SceneSettings, ensure_corpus
from vl.data.transport import worker_collate
from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class VLDataModule(L.LightningDataModule):
    """Base for one corpus. Subclasses implement `required_files()` and `build_dataset(split)`.

    `root=None` uses the embedded scene corpus (generated once into `cache_dir`, keyed by `corpus` settings).
    `batch_size` is the global batch; `batch_size_per_device` what one device sees; the training entry point derives
    gradient accumulation = batch_size / (batch_size_per_device x world size).
    `feature_cache_mb`: decoded region items kept per process (`vl.data.features.cache`; 0 turns it off): the values
    are the file's, only decoded once.
    """

    #: the corpus's own example keys -> (batch key, kind: "long" | "vector" | "regions" | "str"); see `vl.data.collate`
    label_keys: ClassVar[dict[str, tuple[str, str]]] = {}
    #: file name of the test stage's submission file in the run dir (`write_predictions`)
    prediction_file: ClassVar[str] = "predictions.json"
    #: the embedded corpus's task corpora this module reads (`vl.data.scenes.PARTS`), written on first use
    corpus_parts: ClassVar[tuple[str, ...]] = ()
    #: MLM also skips every id in `tokenizer.all_special_ids` (`Collator`); the CLIP-BERT corpora take it as an option
    mlm_skip_special_ids: bool = False
    #: where ViLBERT's global image token feature comes from (`GLOBAL_TOKEN`); VQA and retrieval take it as an option
    global_token: str = "kept"
    #: how an over-long single text is cut (`vl.data.collate.TEXT_TRUNCATION`); the ViLBERT task corpora (VQA,
    #: RefCOCO+, retrieval) take it as an option, "seed" by default (their seed readers' cut)
    text_truncation: str = "tokenizer"
    #: val / test datasets get `(epoch, index)` keys (the fit's epoch; `UnpaddedDistributedSampler`), for examples
    #: drawn per evaluation as the seed's were (VG-BERT's caption line: `data.eval_caption`)
    eval_epoch_keys: bool = False

    def __init__(
        self,
        *,
        root: str | None = None,
        cache_dir: str = "data",
        corpus: dict[str, Any] | None = None,
        objectives: list[str] = (),
        tokenizer: str = "minilm",
        batch_size: int = 64,
        batch_size_per_device: int | None = None,
        num_workers: int = 0,
        max_text_len: int = 32,
        max_regions: int = 36,
        mlm_probability: float = 0.15,
        splits: dict[str, str] | None = None,
        monitor: str = "val/loss",
        monitor_mode: str = "min",
        pin_memory: bool = False,
        feature_cache_mb: float = 256,
        shuffle: bool = True,
        streaming: bool = False,
        streaming_dir: str | None = None,
        worker_slots: bool = True,
    ) -> None:
        super().__init__()
        self.root_arg = root
        self.cache_dir = cache_dir
        self.corpus = dict(corpus or {})
        self.objectives = list(objectives)
        self.tokenizer_name = tokenizer
        self.batch_size = int(batch_size)
        self.batch_size_per_device = int(batch_size_per_device or batch_size)
        if self.batch_size_per_device > self.batch_size:  # `data.batch_size=16` alone: one device sees all 16
            log.info(
                "data.batch_size_per_device=%d > data.batch_size=%d: using %d per device",
                self.batch_size_per_device,
                self.batch_size,
                self.batch_size,
            )
            self.batch_size_per_device = self.batch_size
        if self.batch_size % self.batch_size_per_device:
            raise ConfigError(
                f"data.batch_size={batch_size} is not a multiple of data.batch_size_per_device={batch_size_per_device}"
            )
        self.num_workers = num_workers
        self.max_text_len = max_text_len
        self.max_regions = max_regions
        self.mlm_probability = mlm_probability
        self.splits = {s: s for s in SPLITS} | dict(splits or {})
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        self.pin_memory = pin_memory
        self.feature_cache_mb = float(feature_cache_mb)
        self.shuffle = shuffle  # False: every epoch in index order (the comparison of a streamed and an LMDB run)
        self.streaming = streaming  # the training split from LitData shards (`vl.data.streaming`)
        self.streaming_dir = streaming_dir
        self.worker_slots = worker_slots  # batches from workers through reused shared slots (`vl.data.transport`)
        if streaming and not streaming_dir:
            raise ConfigError(
                "data.streaming=true needs data.streaming_dir (a dir written by python -m vl.tools.shard)"
            )
        self._root: Path | None = None
        self._tokenizer = None
        self.features_file: str | None = None  # region features, relative to root (set by region-feature corpora)
        self._regions: RegionReader | None = None
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ files
    @property
    def root(self) -> Path:
        """The corpus dir: `root` as given, or the embedded corpus (generated on first use)."""
        if self._root is None:
            if self.root_arg:
                self._root = Path(self.root_arg).expanduser()
                if not self._root.is_dir():
                    raise DataError(f"{self._root}: data.root does not exist or is not a directory")
            else:
                self._root = ensure_corpus(Path(self.cache_dir), SceneSettings(**self.corpus), self.corpus_parts)
        return self._root

    def path(self, relative: str, split: str | None = None) -> Path:
        """`root / relative`, with `{split}` replaced by the file split name of `split`."""
        if split is not None:
            relative = relative.format(split=self.splits[split])
        return self.root / relative

    def required_files(self) -> list[Path]:
        """Every file the module will read; checked before any compute."""
        raise NotImplementedError

    def check_files(self) -> None:
        for path in self.required_files():
            if not path.exists():
                raise DataError(f"{path}: file not found (data.root={self.root})")

    def prepare_data(self) -> None:
        self.check_files()
        if self.streaming:
            from vl.data.streaming import check_shards

            self.stream_finisher("train", check_shards(self.streaming_dir, "train", self).get("context") or {})

    @property
    def regions(self) -> RegionReader:
        """The reader of `features_file` (LMDB / HDF5 / FRCNN JSON), opened lazily once per process."""
        if self._regions is None:
            if self.features_file is None:
                raise ConfigError(f"{type(self).__name__} reads no region features")
            self._regions = self.open_regions(self.features_file)
        return self._regions

    def open_regions(self, relative: str) -> RegionReader:
        """The region-feature reader of `relative` (under root; LMDB / HDF5 / FRCNN JSON) behind the decoded-item
        cache of `feature_cache_mb` MiB per process (`vl.data.features.cache`; 0: no cache); with `global_token`
        "all" each item also carries `global_feature` (`GlobalFeatureRegions`)."""
        reader = open_region_features(self.path(relative))
        if self.global_token == "all":  # inside the cache: each image's mean is computed once
            reader = GlobalFeatureRegions(reader)
        return cached(reader, self.feature_cache_mb)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    # ------------------------------------------------------------------ datasets
    def build_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage or "", SPLITS):
            if split not in self.datasets:
                self.datasets[split] = self.build_dataset(split)
        scored = {"fit": "val", "validate": "val", "test": "test"}.get(stage or "")
        if scored is not None:
            self.check_eval_share(scored)

    def check_eval_share(self, split: str) -> None:
        """ConfigError, when the fit / validate / test starts, if the val / test `split` has fewer examples than the
        run has processes: each example is scored once over the ranks (`UnpaddedDistributedSampler`), so a rank would
        get none and never join the others' metric sync at the epoch's end (they would wait until the process-group
        timeout). Not for predict (no metrics)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        dataset = self.datasets.get(split)
        if world <= 1 or dataset is None or not hasattr(dataset, "__len__"):
            return
        if len(dataset) < world:
            raise ConfigError(
                f"data: the {split} split has {len(dataset)} example(s), fewer than this run's {world} processes; "
                f"each is scored by one process and a process with none would wait forever for the others' metrics: "
                f"run it on at most {max(1, len(dataset))} device(s) (trainer.devices / trainer.num_nodes)"
            )

    @property
    def info(self) -> dict[str, Any]:
        """Corpus facts a model needs to build its heads (e.g. `visual_dim`, `num_answers`)."""
        return {}

    # ------------------------------------------------------------------ loaders
    def collator(self, split: str) -> Collator:
        return Collator(
            self.tokenizer,
            max_text_len=self.max_text_len,
            max_regions=self.max_regions,
            mlm="mlm" in self.objectives,
            mlm_probability=self.mlm_probability,
            mlm_skip_special_ids=self.mlm_skip_special_ids,
            region_masking=any(name in REGION_MASKING for name in self.objectives),
            labels=self.label_keys,
            truncation=self.text_truncation,
        )

    def scoring_collator(self) -> Collator:
        """Padding to max_text_len / max_regions: a (text, image) pair scores the same whatever shares its batch
        (retrieval ranks compare scores computed in different batches)."""
        return Collator(
            self.tokenizer,
            max_text_len=self.max_text_len,
            max_regions=self.max_regions,
            fixed_shapes=True,
            labels=self.label_keys,
            truncation=self.text_truncation,
        )

    # ------------------------------------------------------------------ optional hooks (defaults: nothing)
    def baselines(self, split: str = "test") -> dict[str, float]:
        """Reference points of the task on `split` (chance, a prior, a text-only heuristic), as metric keys
        (`test/vqa_acc_prior`, ...); the pipeline adds them to the results table."""
        return {}

    def write_predictions(self, predictions: list[dict[str, Any]], path: Path) -> Path | None:
        """Write the test stage's predictions (rows from the heads' `predictions`, gathered from all ranks) as the
        task's submission file at `path` (= run dir / `prediction_file`); returns the path, None when the corpus
        has no submission format."""
        return None

    def gallery(self, split: str) -> dict[str, Any] | None:
        """A ranking gallery (`{"texts": [...], "visuals": [...]}`) when `split`'s examples are retrieval queries
        (`gold`, `query_index`): the system then ranks every gallery image per query in val/test; None otherwise."""
        return None

    # ------------------------------------------------------------------ inference (`vl.load`, `mode=predict`)
    def answer_vocabulary(self) -> list[str] | None:
        """Answer strings by label index when the corpus classifies answers (written into checkpoints), else None."""
        return None

    def visual_example(self, image: Any) -> dict[str, Any]:
        """The example fields (`visual`, ...) of one image given as a feature id in the corpus's feature file, a
        reader dict (`features` (N, D), `boxes_norm` (N, 4)) or a feature array (N, D) (whole-image boxes); None
        for a corpus without visual input (text-only models)."""
        if image is None:
            if self.features_file is not None:
                raise ConfigError(f"{type(self).__name__}: this model reads an image; pass a feature id or array")
            return {}
        if isinstance(image, dict):
            if "features" not in image:
                raise DataError("image: a feature dict needs 'features' (N, D) and 'boxes_norm' (N, 4)")
            return {"visual": self._with_global(image)}
        if isinstance(image, (np.ndarray, torch.Tensor)):
            feats = np.asarray(image, dtype=np.float32)
            feats = feats[None] if feats.ndim == 1 else feats
            if feats.ndim != 2:
                raise DataError(f"image: a feature array must be (regions, dim), got shape {tuple(feats.shape)}")
            boxes = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32), (feats.shape[0], 1))
            return {"visual": self._with_global({"features": feats, "boxes_norm": boxes, "num_boxes": feats.shape[0]})}
        if self.features_file is None:
            raise ConfigError(f"{type(self).__name__} reads no visual features: pass a feature array, not an id")
        key = str(image)
        if key not in self.regions:
            raise DataError(f"{self.regions.path}: no features for image id {key!r}")
        return {"visual": self.regions[key]}

    def _with_global(self, visual: dict[str, Any]) -> dict[str, Any]:
        """A given image's regions with `global_feature` when `global_token` is "all", as the file's items have it."""
        if self.global_token != "all" or visual.get("global_feature") is not None:
            return visual
        return {**visual, "global_feature": global_feature(visual)}

    def inference_collator(self) -> Collator:
        """Unlabelled rows, no masking: what `vl.load`'s calls and `mode=predict` batch with."""
        return Collator(
            self.tokenizer,
            max_text_len=self.max_text_len,
            max_regions=self.max_regions,
            truncation=self.text_truncation,
        )

    def train_sampler(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int) -> EpochShuffleSampler:
        """The training order: this rank's share of a per-epoch shuffle derived from (seed, epoch), so a resumed run
        sees the same order. Override to group batches (e.g. by image aspect ratio); keep `set_epoch`."""
        return EpochShuffleSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=self.shuffle, seed=seed)

    def eval_groups(self, split: str) -> list[int] | None:
        """Val / test: a group per example when batches must not mix groups (then `GroupedEvalSampler` cuts each
        group's examples, in file order, into batches of at most `batch_size_per_device`; e.g. CLIP-ViL's canvas
        orientation); None (the default): plain batches in file order."""
        return None

    def stream_finisher(self, split: str, context: dict[str, Any]) -> Any:
        """For `data.streaming=true`: an object whose `finish(record, epoch)` turns a record read from the shards
        into the example `build_dataset(split)[(epoch, index)]` gives (`vl.data.streaming`); `context` is what the
        dataset's `stream_context()` wrote next to the shards."""
        raise ConfigError(f"data.streaming: {type(self).__name__} does not read streaming shards")

    def check_shard_count(self, context: dict[str, Any], key: str, expected: int, source: Path, what: str) -> None:
        """DataError when the shards' side file (`context`, see `stream_finisher`) recorded `context[key]` other than
        `expected`, the count `source` holds now (e.g. the answer vocabulary the shards' labels index)."""
        if context.get(key) != expected:
            raise DataError(f"{self.streaming_dir}: the shards have {context.get(key)} {what}, {source} has {expected}")

    def loader(self, split: str) -> DataLoader:
        self.setup({"train": "fit", "val": "validate"}.get(split, "test"))
        if split == "train" and self.streaming:
            from vl.data.streaming import streaming_train_loader

            return streaming_train_loader(self)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        dataset: Dataset = self.datasets[split]
        sampler: Any = None
        batch_size: int | None = self.batch_size_per_device
        groups = self.eval_groups(split) if split != "train" else None
        if split == "train":
            sampler = self.train_sampler(dataset, num_replicas=world, rank=rank, seed=global_seed())
            sampler.set_epoch(self.trainer.current_epoch if self.trainer else 0)  # resumed fits start mid-way
        elif groups is not None:  # whole batches as keys, none mixing groups
            sampler = GroupedEvalSampler(dataset, groups=groups, batch_size=batch_size, num_replicas=world, rank=rank)
            dataset, batch_size = IndexBatches(dataset), None
        elif world > 1 or self.eval_epoch_keys:
            sampler = UnpaddedDistributedSampler(
                dataset, num_replicas=world, rank=rank, epoch_keys=self.eval_epoch_keys
            )
        loader_class = ResumableDataLoader if split == "train" else DataLoader
        return loader_class(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # its own generator: creating an iterator then draws no number from the global RNG (resume parity)
            generator=torch.Generator().manual_seed(global_seed()),
            num_workers=self.num_workers,
            collate_fn=self.loader_collate(self.collator(split)),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def loader_collate(self, collate_fn: Any) -> Any:
        """`collate_fn` as this module's loaders call it: through reused shared-memory slots when batches come from
        workers (`vl.data.transport`; `data.worker_slots=false`: PyTorch's own per-tensor path)."""
        return worker_collate(collate_fn, num_workers=self.num_workers, slots=self.worker_slots)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")


class AnswerVocabulary:
    """Mixin of the VQA corpora (`data=vqa`, `data=clip_vil_vqa`; listed before `VLDataModule` in the bases): the
    answer vocabulary `answers_file` under `root`, read once by the corpus's `read_answers`, and the test stage's
    EvalAI file `vqa_predictions.json` (`[{"question_id", "answer"}]`: the VQA head's argmax of every question, of a
    labelled split or one without answers alike)."""

    prediction_file: ClassVar[str] = "vqa_predictions.json"
    answers_file: str
    _ans2label: dict[str, int] | None = None

    def read_answers(self, path: Path) -> dict[str, int]:
        """The vocabulary file -> {answer: label 0..N-1} (each corpus's own reader)."""
        raise NotImplementedError

    @property
    def ans2label(self) -> dict[str, int]:
        if self._ans2label is None:
            self._ans2label = self.read_answers(self.path(self.answers_file))  # type: ignore[attr-defined]
        return self._ans2label

    @property
    def label2ans(self) -> list[str]:
        return label2ans_of(self.ans2label)

    def write_predictions(self, predictions: list[dict[str, Any]], path: Path) -> Path:
        """The VQA head's test rows (`question_id`, `answer_idx`) -> EvalAI's file, sorted by question id."""
        label2ans = self.label2ans
        rows = [{"question_id": p["question_id"], "answer": label2ans[p["answer_idx"]]} for p in predictions]
        path.write_text(json.dumps(sorted(rows, key=lambda r: r["question_id"])))
        return path


class RetrievalQueries(Dataset):
    """Val/test: one example per gallery text, ``{"text", "gold" (image position), "query_index", "index", "epoch"}``
    (a gallery text given as a dict of text fields, e.g. ``{"text", "text_b"}``, gives those fields); no visual (the
    scorer pairs each text with every gallery image)."""

    def __init__(self, texts: list[Any], gold: list[int]) -> None:
        self.texts = texts
        self.gold = gold

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        return {
            **text_fields(self.texts[index]),  # a string, or a row's text fields (MM-BERT's joint queries)
            "gold": self.gold[index],
            "query_index": index,
            "index": index,
            "epoch": epoch,
        }
