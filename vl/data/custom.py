"""`data=custom`: your own examples, no code. One JSONL (`data.jsonl`, relative to `data.root`) + the visual input
(`data.features`), keyed by the JSONL's `image_id` (strings or ints):

- region features in any format vl reads (LMDB, region HDF5, per-image FRCNN JSON), `{"visual"}` per example;
- a CLIP HDF5 (`features` (N, D) + `ids`, as `data=vlp` / `python -m vl.tools.clip_extract` write it): the `data=vlp`
  fields, `clip_feats` for CLIP-BERT and the vector as one whole-image region for region models;
- an image directory (`<id>`, `<id>.jpg`, `.jpeg` or `.png`) for pixel models (`model=clip_vil`): decoded in the
  DataLoader workers by `vl.data.images.PixelLoader` with `data.transform` ("clip_vil": CLIP-ViL's resize-pad-normalise,
  `data.transform_options` {min_size, max_size}; "vg_bert") and `data.on_bad_image`.
`data.visual=auto` tells which from the path (an HDF5 with `features` + `ids` and no per-image `offsets` is CLIP);
`regions` / `clip` / `images` say it (`vl.data.visual_source`: the source, its checks and its collators).

Each line: `image_id` (str or int), `text` (other names mapped by `data.fields`, e.g. `{question: text, img: image_id}`),
and optionally `answers` (a list of annotator answers, VQA-style; an
answer given by k annotators scores min(1, k / 3)), `label` (an int: 1 = the text matches the image) and `split`
(`train` / `val` / `test`; either every line has one or none, then a seeded split by `split_fractions`).
The task is the objectives: `data.objectives=[vqa]` (answer classification; `answers` needed), `[mlm, itm]`
(captions pretraining: ITM uses the lines' `label` when every line of a split has one, else pairs each text with
another image's text half the time) or `[retrieval]` (ViLBERT's 4-way multiple choice on the train lines; val/test
rank every image of the split for each of its texts: recall@1/5/10; lines with `label` 0 are left out; any input:
CLIP-BERT gets `clip_feats` and pixel models `pixel_values` in the choice rows and the ranking gallery too).

Derived and written next to the data (`<root>/<jsonl stem>.vl/`), also logged: `answers.json` (the answer vocabulary:
answers given on at least `min_answer_count` train lines), `splits.json` (line numbers per split), `info.json`
(visual input, feature dimension, counts). Every problem is a DataError naming file and line, raised before any
compute: not JSON, an unknown field, a missing or empty `text`, an `image_id` without features (or without an image
file, or whose file is not an image), mixed feature dimensions (region files; a CLIP HDF5 is one (N, D) array and
pixels are RGB, so neither can mix), a bad `answers` / `label` / `split`.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vl.data.base import SPLITS, RetrievalQueries, VLDataModule
from vl.data.captions import CaptionPairs
from vl.data.collate import Collator
from vl.data.custom_examples import AnswerLines, LabelledPairs
from vl.data.images import PixelLoader, build_transform
from vl.data.retrieval import GalleryVisuals, RetrievalDataModule, RetrievalTrain
from vl.data.visual_source import (
    VISUAL_KINDS,
    Expanded,
    VisualAsReader,
    VisualSource,
    clip_fields,
    kind_of,
    source_collator,
)
from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FIELDS = ("image_id", "text", "answers", "label", "split")


class CustomDataModule(VLDataModule):
    """`data=custom data.root=DIR` (see the module docstring)."""

    label_keys = {
        "vqa_target": ("vqa_targets", "vector"),
        "itm_label": ("itm_labels", "long"),
        "image_id": ("image_id", "str"),
        "gold": ("gold", "long"),
        "query_index": ("query_index", "long"),
    }

    def __init__(
        self,
        *,
        jsonl: str = "data.jsonl",
        features: str = "regions.lmdb",
        visual: str = "auto",
        transform: str = "clip_vil",
        transform_options: dict[str, Any] | None = None,
        on_bad_image: str = "error",
        fields: dict[str, str] | None = None,
        min_answer_count: int = 1,
        split_fractions: dict[str, float] | None = None,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fields = {str(k): str(v) for k, v in dict(fields or {}).items()}  # the file's field name -> vl's
        bad = next((v for v in self.fields.values() if v not in FIELDS), None)
        if bad is not None:
            raise ConfigError(f"data.fields: '{bad}' is not one of vl's fields ({', '.join(FIELDS)})")
        if visual not in VISUAL_KINDS:
            raise ConfigError(f"data.visual: '{visual}' is not one of {', '.join(VISUAL_KINDS)}")
        tasks = [o for o in ("vqa", "retrieval") if o in self.objectives]
        if len(tasks) > 1 or (tasks == ["retrieval"] and len(self.objectives) > 1):
            raise ConfigError(
                f"data.objectives={self.objectives}: pick one task: [vqa] (answer classification), [mlm, itm] "
                "(captions pretraining) or [retrieval]"
            )
        self.jsonl_file = jsonl
        self.features_file = features
        self.visual_arg = visual
        self.transform_name, self.transform_options = transform, dict(transform_options or {})
        self.on_bad_image = on_bad_image
        PixelLoader(None, on_bad_image)  # validates the option now
        self.min_answer_count = int(min_answer_count)
        self.split_fractions = dict(split_fractions or {"train": 0.8, "val": 0.1, "test": 0.1})
        self.split_seed = int(split_seed)
        self._lines: dict[str, list[dict[str, Any]]] | None = None
        self._ans2label: dict[str, int] = {}
        self._source: VisualSource | None = None
        self._galleries: dict[str, dict[str, Any]] = {}
        if "retrieval" in self.objectives:
            self.prediction_file = "retrieval_predictions.json"

    @property
    def root(self) -> Path:
        if not self.root_arg:
            raise ConfigError("data=custom needs data.root=<dir holding data.jsonl and the feature file>")
        return super().root

    def required_files(self) -> list[Path]:
        return [self.path(self.jsonl_file), self.path(self.features_file)]

    def prepare_data(self) -> None:
        self.check_files()
        self.lines()

    @property
    def source(self) -> VisualSource:
        """The visual input (`data.visual`: "auto" tells it from `data.features`)."""
        if self._source is None:
            path = self.path(self.features_file)
            if not path.exists():
                raise DataError(f"{path}: file not found (data.features; data.root={self.root})")
            kind = kind_of(path) if self.visual_arg == "auto" else self.visual_arg
            if kind == "images" and "retrieval" in self.objectives and self.on_bad_image != "error":
                raise ConfigError(
                    "data=custom: retrieval over an image directory needs data.on_bad_image=error (a choice or a "
                    "gallery image cannot be skipped)"
                )
            pixels = None
            if kind == "images":
                pixels = PixelLoader(build_transform(self.transform_name, **self.transform_options), self.on_bad_image)
            self._source = VisualSource(path, kind, pixels=pixels)
        return self._source

    @property
    def regions(self) -> Any:
        if self.source.kind != "regions":
            return VisualAsReader(self.source, visual_only=True)
        return self.source.reader

    # ------------------------------------------------------------------ reading, checking, deriving
    def _read(self) -> list[dict[str, Any]]:
        path = self.path(self.jsonl_file)
        source = self.source
        rows, dim = [], None
        checked: dict[str, tuple[str | None, int | None]] = {}  # image id -> (problem, dim): each image read once
        for n, raw in enumerate(path.read_text().splitlines(), 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a line must be a JSON object")
            if self.fields:
                row = {self.fields.get(k, k): v for k, v in row.items()}
            for key in row:
                if key not in FIELDS:
                    near = difflib.get_close_matches(key, FIELDS, n=1)
                    hint = f" (did you mean '{near[0]}'?)" if near else f"; fields: {', '.join(FIELDS)}"
                    hint += " (or name it: '+data.fields={<your name>: <vl field>}')"
                    raise DataError(f"{where}: unknown field '{key}'{hint}")
            image_id = row.get("image_id")
            if not isinstance(image_id, (str, int)) or isinstance(image_id, bool) or str(image_id) == "":
                raise DataError(f"{where}: 'image_id' must be a non-empty string or an int")
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise DataError(f"{where}: empty or missing 'text'")
            sid = str(image_id)
            if sid not in checked:
                try:
                    problem = source.problem(sid)
                    checked[sid] = (problem, None if problem is not None else source.dim(sid))
                except DataError as err:  # a damaged record: named with the line that uses it
                    raise DataError(f"{where}: {err}") from None
            problem, d = checked[sid]
            if problem is not None:
                raise DataError(f"{where}: {problem}")
            if dim is None:
                dim = (d, n)
            elif d != dim[0]:
                raise DataError(
                    f"{where}: image id {str(image_id)!r} has {d}-d features, line {dim[1]}'s image "
                    f"has {dim[0]}-d (mixed feature dimensions in {source.path})"
                )
            answers = row.get("answers")
            if answers is not None and (
                not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers)
            ):
                raise DataError(f"{where}: 'answers' must be a list of non-empty strings")
            if "label" in row and (not isinstance(row["label"], int) or isinstance(row["label"], bool)):
                raise DataError(f"{where}: 'label' must be an int")
            binary = "itm" in self.objectives or "retrieval" in self.objectives
            if "label" in row and binary and row["label"] not in (0, 1):
                raise DataError(f"{where}: 'label' {row['label']} is not 0 or 1 (1 = the text matches the image)")
            if "split" in row and row["split"] not in SPLITS:
                raise DataError(f"{where}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
            rows.append({**row, "line": n})
        if not rows:
            raise DataError(f"{path}: no examples")
        if "vqa" in self.objectives:
            missing = next((r for r in rows if not r.get("answers")), None)
            if missing is not None:
                raise DataError(f"{path}:{missing['line']}: no 'answers' (data.objectives has 'vqa')")
        return rows

    def _split(self, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        path = self.path(self.jsonl_file)
        with_split = [r for r in rows if "split" in r]
        if with_split and len(with_split) != len(rows):
            first = next(r for r in rows if "split" not in r)
            raise DataError(f"{path}:{first['line']}: no 'split' while other lines have one (give all or none)")
        if with_split:
            return {s: [r for r in rows if r["split"] == s] for s in SPLITS}
        total = sum(self.split_fractions.get(s, 0.0) for s in SPLITS)
        order = np.random.default_rng(self.split_seed).permutation(len(rows))
        out, start = {}, 0
        for i, s in enumerate(SPLITS):
            end = (
                len(rows) if i == len(SPLITS) - 1 else start + round(len(rows) * self.split_fractions.get(s, 0) / total)
            )
            out[s] = [rows[j] for j in sorted(order[start:end])]
            start = end
        return out

    def lines(self) -> dict[str, list[dict[str, Any]]]:
        """The checked lines per split (read once; the derived files are written then)."""
        if self._lines is None:
            rows = self._read()
            self._lines = self._split(rows)
            empty = [s for s in SPLITS if not self._lines[s]]
            if empty:
                raise DataError(f"{self.path(self.jsonl_file)}: split '{empty[0]}' has no lines ({len(rows)} in all)")
            if "vqa" in self.objectives:
                counts = Counter(a for r in self._lines["train"] for a in set(r["answers"]))
                kept = sorted(a for a, c in counts.items() if c >= self.min_answer_count)
                self._ans2label = {a: i for i, a in enumerate(kept)}
            if "retrieval" in self.objectives:
                for split in SPLITS:
                    self._retrieval_images(split)  # 2+ images per split, checked now
            self._write_derived()
        return self._lines

    def _facts(self) -> dict[str, Any]:
        assert self._lines is not None
        first = str(self._lines["train"][0]["image_id"])
        facts: dict[str, Any] = {"visual": self.source.kind}
        dim = self.source.dim(first)
        if dim is not None:
            facts["visual_dim"] = dim
        return facts

    def _write_derived(self) -> None:
        assert self._lines is not None
        out = self.root / f"{Path(self.jsonl_file).stem}.vl"
        out.mkdir(exist_ok=True)
        info = {
            **self._facts(),
            "lines": {s: len(v) for s, v in self._lines.items()},
            "num_answers": len(self._ans2label),
        }
        (out / "answers.json").write_text(json.dumps(list(self._ans2label)))
        (out / "splits.json").write_text(json.dumps({s: [r["line"] for r in v] for s, v in self._lines.items()}))
        (out / "info.json").write_text(json.dumps(info, indent=1))
        log.info("data=custom: %s; derived files in %s", json.dumps(info), out)

    # ------------------------------------------------------------------ retrieval
    def _retrieval_images(self, split: str) -> tuple[list[str], list[list[str]]]:
        """(image ids in first-seen order, their texts) of a split's matching lines (`label` 1 or absent; lines
        with `label` 0 are not pairs and are left out, counted in the log)."""
        assert self._lines is not None
        texts: dict[str, list[str]] = {}
        dropped = 0
        for r in self._lines[split]:
            if r.get("label", 1) == 0:
                dropped += 1
                continue
            texts.setdefault(str(r["image_id"]), []).append(r["text"])
        if len(texts) < 2:
            raise DataError(
                f"{self.path(self.jsonl_file)}: retrieval needs 2+ images in split '{split}', it has {len(texts)}"
            )
        if dropped:
            log.info("data=custom retrieval, split %s: %d lines with label 0 are not pairs, left out", split, dropped)
        return list(texts), list(texts.values())

    def gallery(self, split: str) -> dict[str, Any] | None:
        """Retrieval: the split's images (first-seen order) x all their texts as queries; None for other tasks."""
        if "retrieval" not in self.objectives or split == "train":
            return None
        if split not in self._galleries:
            self.lines()
            image_ids, sentences = self._retrieval_images(split)
            texts = [t for caps in sentences for t in caps]
            gold = [i for i, caps in enumerate(sentences) for _ in caps]
            self._galleries[split] = {
                "texts": texts,
                "gold": gold,
                "image_ids": image_ids,
                "visuals": GalleryVisuals(image_ids, self.regions),
            }
        return self._galleries[split]

    def baselines(self, split: str = "test") -> dict[str, float]:
        gallery = self.gallery(split)
        if gallery is None:
            return {}
        n = len(gallery["image_ids"])
        return {f"{split}/recall@{k}_chance": min(1.0, k / n) for k in (1, 5, 10)}

    def write_predictions(self, predictions: list[dict[str, Any]], path: Path) -> Path | None:
        if "retrieval" not in self.objectives:
            return None
        return RetrievalDataModule.write_predictions(self, predictions, path)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ datasets
    def build_dataset(self, split: str) -> Dataset:
        lines = self.lines()[split]
        source = self.source
        if "vqa" in self.objectives:
            outside = sum(not any(a in self._ans2label for a in r.get("answers") or []) for r in lines)
            if outside:  # as VQA's targets (an answer outside the vocabulary scores nothing), but said
                log.info(
                    "%s: %d of %d %s lines have no answer in the answer vocabulary (built on train): their target is "
                    "all zeros",
                    self.path(self.jsonl_file),
                    outside,
                    len(lines),
                    split,
                )
            return AnswerLines(lines, source, self._ans2label)
        if "retrieval" in self.objectives:
            if split != "train":
                g = self.gallery(split)
                assert g is not None
                return RetrievalQueries(g["texts"], g["gold"])
            return RetrievalTrain(*self._retrieval_images("train"), self.regions)
        labelled = sum("label" in r for r in lines)
        if "itm" in self.objectives and labelled:  # the file's own matching labels, on every line or on none
            if labelled < len(lines):
                first = next(i for i, r in enumerate(lines) if "label" not in r)
                raise DataError(
                    f"{self.path(self.jsonl_file)}: split '{split}' has 'label' on {labelled} of {len(lines)} lines "
                    f"(its line {first + 1} in the split has none): ITM uses the file's labels when every line has "
                    "one, else draws its own negatives; give all or none"
                )
            return LabelledPairs(lines, source)
        captions = [{"caption": r["text"], "image_id": str(r["image_id"])} for r in lines]
        if "itm" in self.objectives and len({c["image_id"] for c in captions}) < 2:
            raise DataError(f"{self.path(self.jsonl_file)}: split '{split}' needs 2+ images for ITM negatives")
        return Expanded(CaptionPairs(captions, VisualAsReader(source), itm="itm" in self.objectives))

    def answer_vocabulary(self) -> list[str] | None:
        return list(self._ans2label) if "vqa" in self.objectives else None

    @property
    def info(self) -> dict[str, Any]:
        self.lines()
        facts = self._facts()
        kind = facts.pop("visual")
        if kind == "images":
            facts["pixels"] = True
        elif kind == "clip":
            facts.update(num_region_classes=0, clip_dim=facts["visual_dim"])
        if "vqa" in self.objectives:
            facts["num_answers"] = len(self._ans2label)
        if "retrieval" in self.objectives:
            facts.update(num_choices=4, mc_blocks=["retrieval"])
        return facts

    # ------------------------------------------------------------------ collation, inference
    def _collator(self, base: Collator) -> Collator:
        pixels = self.source.pixels
        return source_collator(self.source.kind, base, getattr(pixels and pixels.transform, "batch_pad_value", None))

    def collator(self, split: str) -> Collator:
        return self._collator(super().collator(split))

    def scoring_collator(self) -> Collator:
        return self._collator(super().scoring_collator())

    def inference_collator(self) -> Collator:
        return self._collator(super().inference_collator())

    def visual_example(self, image: Any) -> dict[str, Any]:
        """An image id of the feature file / image directory, a feature array ((N, D) regions, a (D,) CLIP vector)
        or, for an image directory, an image file path."""
        kind = self.source.kind
        if kind == "regions":
            return super().visual_example(image)
        if kind == "clip" and isinstance(image, (np.ndarray, torch.Tensor)):
            return clip_fields(np.asarray(image, dtype=np.float32))
        problem = None if kind == "images" and Path(str(image)).is_file() else self.source.problem(str(image))
        if problem is not None:
            raise DataError(f"image: {problem}")
        fields = self.source.fields(image)
        if fields is None:
            raise DataError(f"image: {image!r} could not be decoded")
        return fields
