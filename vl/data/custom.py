"""`data=custom`: your own examples, no code. One JSONL (`data.jsonl`, relative to `data.root`) + region features in
any format vl reads (`data.features`: LMDB, HDF5 or per-image FRCNN JSON), keyed by the JSONL's `image_id`.

Each line: `image_id` (str or int), `text`, and optionally `answers` (a list of annotator answers, VQA-style; an
answer given by k annotators scores min(1, k / 3)), `label` (an int: 1 = the text matches the image) and `split`
(`train` / `val` / `test`; either every line has one or none, then a seeded split by `split_fractions`).
The task is the objectives: `data.objectives=[vqa]` (answer classification; `answers` needed) or `[mlm, itm]`
(captions pretraining: ITM uses the lines' `label` when every line of a split has one, else pairs each text with
another image's text half the time).

Derived and written next to the data (`<root>/<jsonl stem>.vl/`), also logged: `answers.json` (the answer vocabulary:
answers given on at least `min_answer_count` train lines), `splits.json` (line numbers per split), `info.json`
(feature dimension, counts). Every problem is a DataError naming file and line, raised before any compute: not JSON,
an unknown field, a missing or empty `text`, an `image_id` without features, mixed feature dimensions, a bad
`answers` / `label` / `split`.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vl.data.base import SPLITS, VLDataModule
from vl.data.captions import CaptionPairs
from vl.data.samplers import split_key
from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FIELDS = ("image_id", "text", "answers", "label", "split")


def _soft_scores(answers: list[str], ans2label: dict[str, int]) -> tuple[list[int], list[float]]:
    counts = Counter(answers)
    labels = [ans2label[a] for a in counts if a in ans2label]
    return labels, [min(1.0, counts[a] / 3.0) for a in counts if a in ans2label]


class AnswerLines(Dataset):
    """One example per line: text, regions, dense soft-score target (A,)."""

    def __init__(self, lines: list[dict[str, Any]], regions: Any, ans2label: dict[str, int]) -> None:
        self.lines, self.regions, self.ans2label = lines, regions, ans2label

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        line = self.lines[index]
        target = np.zeros(len(self.ans2label), dtype=np.float32)
        labels, scores = _soft_scores(line.get("answers") or [], self.ans2label)
        target[labels] = scores
        return {
            "text": line["text"],
            "image_id": str(line["image_id"]),
            "index": index,
            "epoch": epoch,
            "vqa_target": target,
            "visual": self.regions[str(line["image_id"])],
        }


class LabelledPairs(Dataset):
    """One example per line with the file's `label` as the ITM label (1 = the text matches the image)."""

    def __init__(self, lines: list[dict[str, Any]], regions: Any) -> None:
        self.lines, self.regions = lines, regions

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        line = self.lines[index]
        return {
            "text": line["text"],
            "image_id": str(line["image_id"]),
            "index": index,
            "epoch": epoch,
            "itm_label": int(line["label"]),
            "visual": self.regions[str(line["image_id"])],
        }


class CustomDataModule(VLDataModule):
    """`data=custom data.root=DIR` (see the module docstring)."""

    label_keys = {
        "vqa_target": ("vqa_targets", "vector"),
        "itm_label": ("itm_labels", "long"),
        "image_id": ("image_id", "str"),
    }

    def __init__(
        self,
        *,
        jsonl: str = "data.jsonl",
        features: str = "regions.lmdb",
        min_answer_count: int = 1,
        split_fractions: dict[str, float] | None = None,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.jsonl_file = jsonl
        self.features_file = features
        self.min_answer_count = int(min_answer_count)
        self.split_fractions = dict(split_fractions or {"train": 0.8, "val": 0.1, "test": 0.1})
        self.split_seed = int(split_seed)
        self._lines: dict[str, list[dict[str, Any]]] | None = None
        self._ans2label: dict[str, int] = {}

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

    # ------------------------------------------------------------------ reading, checking, deriving
    def _read(self) -> list[dict[str, Any]]:
        path = self.path(self.jsonl_file)
        regions = self.regions
        rows, dim = [], None
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
            for key in row:
                if key not in FIELDS:
                    near = difflib.get_close_matches(key, FIELDS, n=1)
                    hint = f" (did you mean '{near[0]}'?)" if near else f"; fields: {', '.join(FIELDS)}"
                    raise DataError(f"{where}: unknown field '{key}'{hint}")
            image_id = row.get("image_id")
            if not isinstance(image_id, (str, int)) or isinstance(image_id, bool) or str(image_id) == "":
                raise DataError(f"{where}: 'image_id' must be a non-empty string or an int")
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise DataError(f"{where}: empty or missing 'text'")
            if str(image_id) not in regions:
                raise DataError(f"{where}: image id {str(image_id)!r} has no features in {regions.path}")
            features = regions[str(image_id)]["features"]
            if dim is None:
                dim = (int(features.shape[1]), n)
            elif int(features.shape[1]) != dim[0]:
                raise DataError(
                    f"{where}: image id {str(image_id)!r} has {features.shape[1]}-d features, line {dim[1]}'s image "
                    f"has {dim[0]}-d (mixed feature dimensions in {regions.path})"
                )
            answers = row.get("answers")
            if answers is not None and (
                not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers)
            ):
                raise DataError(f"{where}: 'answers' must be a list of non-empty strings")
            if "label" in row and (not isinstance(row["label"], int) or isinstance(row["label"], bool)):
                raise DataError(f"{where}: 'label' must be an int")
            if "label" in row and "itm" in self.objectives and row["label"] not in (0, 1):
                raise DataError(f"{where}: 'label' {row['label']} is not 0 or 1 (ITM: 1 = the text matches the image)")
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
            self._write_derived()
        return self._lines

    def _write_derived(self) -> None:
        assert self._lines is not None
        out = self.root / f"{Path(self.jsonl_file).stem}.vl"
        out.mkdir(exist_ok=True)
        first = self._lines["train"][0]
        info = {
            "visual_dim": int(self.regions[str(first["image_id"])]["features"].shape[1]),
            "lines": {s: len(v) for s, v in self._lines.items()},
            "num_answers": len(self._ans2label),
        }
        (out / "answers.json").write_text(json.dumps(list(self._ans2label)))
        (out / "splits.json").write_text(json.dumps({s: [r["line"] for r in v] for s, v in self._lines.items()}))
        (out / "info.json").write_text(json.dumps(info, indent=1))
        log.info("data=custom: %s; derived files in %s", json.dumps(info), out)

    # ------------------------------------------------------------------ datasets
    def build_dataset(self, split: str) -> Dataset:
        lines = self.lines()[split]
        if "vqa" in self.objectives:
            return AnswerLines(lines, self.regions, self._ans2label)
        if "itm" in self.objectives and all("label" in r for r in lines):  # the file's own matching labels
            return LabelledPairs(lines, self.regions)
        captions = [{"caption": r["text"], "image_id": str(r["image_id"])} for r in lines]
        if "itm" in self.objectives and len({c["image_id"] for c in captions}) < 2:
            raise DataError(f"{self.path(self.jsonl_file)}: split '{split}' needs 2+ images for ITM negatives")
        return CaptionPairs(captions, self.regions, itm="itm" in self.objectives)

    def answer_vocabulary(self) -> list[str] | None:
        return list(self._ans2label) if "vqa" in self.objectives else None

    @property
    def info(self) -> dict[str, Any]:
        self.lines()
        first = self._lines["train"][0]  # type: ignore[index]
        facts: dict[str, Any] = {"visual_dim": int(self.regions[str(first["image_id"])]["features"].shape[1])}
        if "vqa" in self.objectives:
            facts["num_answers"] = len(self._ans2label)
        return facts
