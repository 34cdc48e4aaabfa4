"""CLIP-ViL's corpora, read from pixels (spec: clip_vil.md): LXMERT pretraining JSON (MLM + ITM, + QA in stage 2)
and the LXMERT-format VQA JSON, with images decoded and transformed in DataLoader workers.

Files are relative to `root` in the seed's `data/` layout (`lxmert/*.json`, `mscoco/{train,val}2014/*.jpg`,
`vg_raw_images/VG_100K/*.jpg`, `mscoco/width_heigths.json`, `vqa/*.json`); without `root`, the embedded corpus is
written in that layout on first use (`vl.data.scenes.writers.images`).

- `data=clip_vil_pretrain` (`ClipVilPretrainDataModule`): training files `mscoco_train`, `mscoco_nominival`,
  `vgnococo` (the seed's `--train`; the embedded corpus has no nominival, so without `root` the other two), validation
  `mscoco_minival`; one example per sentence (`flatten_pretrain`); examples
  whose image is not in `width_heigths.json` are dropped (as the seed filters). ITM: with probability
  `itm_probability` (0.5) the sentence is replaced by a sentence of another image (`itm_label` 0). QA (when `qa` is
  in `objectives`): on matched pairs whose sentence has a label, the answers are normalised with `convert_ans`, those
  outside `answers` (all_ans.json, 9500) dropped, and one is sampled in proportion to its score -> `qa_label`
  (-1 = none). Every random choice derives from (seed, epoch, index): resumed runs draw the same.
- `data=clip_vil_vqa` (`ClipVilVQADataModule`): `vqa/{split}.json`, training on `train_splits` concatenated
  (default `train` + `nominival`, the seed's `--train train,nominival`; without `root`, `train`: the embedded corpus
  has no nominival), validation `minival`; targets = the label's soft scores over
  `trainval_ans2label.json` (3129); baselines: chance and the question-type prior (the `question_type` field, fitted
  on train); `vqa_predictions.json` in EvalAI format. A test file without any "label" (LXMERT's official
  `test.json`, test-dev / test-std: `data.splits.test=<its name>`) is unlabelled: no target, no metric, loss or
  baseline, the test stage writes every question's answer; a file with some rows labelled fails (before the fit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch.utils.data import Dataset

from vl.data.base import AnswerVocabulary
from vl.data.formats.lxmert_pretrain import (
    convert_label,
    flatten_pretrain,
    load_all_answers,
    load_ans2label,
    load_pretrain_json,
    load_vqa_json,
    vqa_rows_labelled,
)
from vl.data.image_base import ImageDataModule, ImageSource
from vl.data.samplers import global_seed, split_key
from vl.errors import ConfigError, DataError


class PretrainPairs(Dataset):
    """LXMERT pretraining examples -> `{"text", "pixels", "itm_label", "qa_label", "index", "epoch"}`."""

    def __init__(
        self,
        examples: list[dict[str, Any]],
        images: ImageSource,
        *,
        itm: bool,
        itm_probability: float,
        ans2id: dict[str, int] | None,
        seed: int,
    ) -> None:
        self.examples, self.images, self.itm, self.itm_probability = examples, images, itm, itm_probability
        self.ans2id, self.seed = ans2id, seed

    def __len__(self) -> int:
        return len(self.examples)

    def sample_answer(self, label: dict[str, float] | None, rng: np.random.Generator) -> int:
        """One answer id sampled in proportion to its score among the usable answers, -1 when there is none."""
        if not label or self.ans2id is None:
            return -1
        converted = convert_label(label, self.ans2id.__contains__)
        scores = {self.ans2id[ans]: float(score) for ans, score in converted.items() if score > 0}
        if not scores:
            return -1
        ids = sorted(scores)
        p = np.asarray([scores[i] for i in ids])
        return int(ids[int(rng.choice(len(ids), p=p / p.sum()))])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        epoch, index = split_key(key)
        ex = self.examples[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        text, matched = ex["sent"], 1
        if self.itm and rng.random() < self.itm_probability:
            for _ in range(20):  # a sentence of another image
                other = self.examples[int(rng.integers(len(self.examples)))]
                if other["img_id"] != ex["img_id"]:
                    text, matched = other["sent"], 0
                    break
        pixels = self.images(ex["img_id"])
        if pixels is None:
            return None
        out = {"text": text, "pixels": pixels, "index": index, "epoch": epoch}
        if self.itm:
            out["itm_label"] = matched
        if self.ans2id is not None:
            out["qa_label"] = self.sample_answer(ex["label"], rng) if matched else -1
        return out


class VQAPixels(Dataset):
    """LXMERT-format VQA questions -> `{"text", "pixels", "vqa_target" (A,), "question_id", "index", "epoch"}`;
    `labelled=False` (a split without answers, LXMERT's official `test.json`): no `vqa_target` at all, so the test
    stage writes each question's answer and scores nothing."""

    def __init__(
        self,
        questions: list[dict[str, Any]],
        images: ImageSource,
        ans2label: dict[str, int],
        *,
        labelled: bool = True,
    ) -> None:
        self.questions, self.images, self.ans2label, self.labelled = questions, images, ans2label, labelled

    def __len__(self) -> int:
        return len(self.questions)

    def target(self, q: dict[str, Any]) -> np.ndarray:
        target = np.zeros(len(self.ans2label), dtype=np.float32)
        for ans, score in (q.get("label") or {}).items():
            if ans in self.ans2label:
                target[self.ans2label[ans]] = score
        return target

    def fields(self, index: int) -> dict[str, Any]:
        """Question `index`'s fields but the image: `text`, `vqa_target` (labelled splits only), `question_id`."""
        q = self.questions[index]
        out: dict[str, Any] = {"text": q["sent"]}
        if self.labelled:
            out["vqa_target"] = self.target(q)
        return {**out, "question_id": int(q["question_id"]), "index": index}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        epoch, index = split_key(key)
        pixels = self.images(self.questions[index]["img_id"])
        if pixels is None:
            return None
        return {**self.fields(index), "pixels": pixels, "epoch": epoch}

    def record(self, index: int) -> dict[str, Any]:
        """The stored part of example `index` (`vl.data.streaming`): the image file's bytes (JPEG / PNG), not pixels;
        no `vqa_target` on an unlabelled split (`finish` keeps what the record holds)."""
        q = self.questions[index]
        path = self.images.path(q["img_id"])
        if not path.is_file():
            raise DataError(f"{path}: image file not found")
        return {**self.fields(index), "img_id": str(q["img_id"]), "image_bytes": path.read_bytes()}

    def finish(self, record: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        """A record -> the example: the image decoded and transformed (None for a bad image under
        `on_bad_image=skip`, as from the file)."""
        example = dict(record)
        pixels = self.images(example.pop("img_id"), example.pop("image_bytes"))
        if pixels is None:
            return None
        example["pixels"] = pixels
        example["epoch"] = epoch
        return example

    def stream_context(self) -> dict[str, Any]:
        return {"num_answers": len(self.ans2label)}


class ClipVilPretrainDataModule(ImageDataModule):
    """`data=clip_vil_pretrain`: LXMERT pretraining JSON from pixels; objectives `mlm`, `itm`, and `qa` in stage 2."""

    label_keys: ClassVar[dict[str, tuple[str, str]]] = {
        "itm_label": ("itm_labels", "long"),
        "qa_label": ("qa_labels", "long"),
    }

    def __init__(
        self,
        *,
        files: dict[str, list[str]] | None = None,
        answers: str = "lxmert/all_ans.json",
        itm_probability: float = 0.5,
        **kwargs: Any,
    ) -> None:
        """`files`: {"train" / "val" / "test": LXMERT JSON files under `root`, concatenated}; a split left out keeps
        its default: train `lxmert/{mscoco_train,mscoco_nominival,vgnococo}.json` (the seed's `--train`; without
        `root`, the embedded corpus's `mscoco_train` + `vgnococo`: it writes no nominival), val
        `lxmert/mscoco_minival.json`, test: with `root` `lxmert/mscoco_minival.json` (LXMERT releases no pretraining
        test file; the seed evaluates on minival), on the embedded corpus its held-out `lxmert/mscoco_test.json`. A
        missing file is a DataError naming it."""
        super().__init__(**kwargs)
        published = ["lxmert/mscoco_train.json", "lxmert/mscoco_nominival.json", "lxmert/vgnococo.json"]
        default = {
            # the embedded corpus (root null) writes no mscoco_nominival.json
            "train": published if self.root_arg else [f for f in published if "nominival" not in f],
            "val": ["lxmert/mscoco_minival.json"],
            # the release has no mscoco_test.json (the seed's --valid is minival); the embedded corpus writes one
            "test": ["lxmert/mscoco_minival.json"] if self.root_arg else ["lxmert/mscoco_test.json"],
        }
        self.files = default | dict(files or {})
        self.answers_file = answers
        self.itm_probability = itm_probability
        self._answers: list[str] | None = None

    def required_files(self) -> list[Path]:
        files = [self.path(f) for split in ("train", "val", "test") for f in self.files[split]]
        files.append(self.path(self.width_heights_file))
        if "qa" in self.objectives:
            files.append(self.path(self.answers_file))
        return files

    @property
    def answers(self) -> list[str]:
        if self._answers is None:
            self._answers = load_all_answers(self.path(self.answers_file))
        return self._answers

    def build_dataset(self, split: str) -> PretrainPairs:
        examples: list[dict[str, Any]] = []
        for rel in self.files[split]:
            path = self.path(rel)
            examples += self.keep_with_image(flatten_pretrain(load_pretrain_json(path), source=str(path)), path)
        ans2id = {a: i for i, a in enumerate(self.answers)} if "qa" in self.objectives else None
        return PretrainPairs(
            examples,
            self.images(),
            itm="itm" in self.objectives,
            itm_probability=self.itm_probability,
            ans2id=ans2id,
            seed=global_seed(),
        )

    @property
    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"pixels": True}
        if "qa" in self.objectives:
            info["num_qa_answers"] = len(self.answers)
            info["qa_answers_file"] = str(self.path(self.answers_file))
        return info


class ClipVilVQADataModule(AnswerVocabulary, ImageDataModule):
    """`data=clip_vil_vqa`: LXMERT-format VQA JSON from pixels (`vqa` objective, BCE x answers)."""

    label_keys: ClassVar[dict[str, tuple[str, str]]] = {
        "vqa_target": ("vqa_targets", "vector"),
        "question_id": ("question_id", "long"),
    }

    def __init__(
        self,
        *,
        questions: str = "vqa/{split}.json",
        answers: str = "vqa/trainval_ans2label.json",
        train_splits: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """`questions`: the VQA JSON pattern (`{split}` = a file split name). `train_splits`: the file splits
        concatenated for training; default `["train", "nominival"]` (the seed's `--train train,nominival`), or
        `[data.splits.train]` when that is set; without `root` (the embedded corpus, which writes no nominival)
        `["train"]`. A missing file is a DataError naming it."""
        given = dict(kwargs.get("splits") or {})
        if train_splits is not None and "train" in given:
            raise ConfigError(
                "data.train_splits and data.splits.train both name the VQA training files; set only data.train_splits"
            )
        kwargs["splits"] = {"train": "train", "val": "minival", "test": "test"} | given
        super().__init__(**kwargs)
        if train_splits is None:
            train_splits = (
                [given["train"]] if "train" in given else ["train", "nominival"] if self.root_arg else ["train"]
            )
        if not train_splits:
            raise ConfigError("data.train_splits: empty; name at least one VQA file split (e.g. [train, nominival])")
        self.train_splits = [str(t) for t in train_splits]
        self.questions_file = questions
        self.answers_file = answers
        self._labelled: dict[Path, bool] = {}  # file -> whether its rows carry answers (`vqa_rows_labelled`)
        self._test_checked = False  # `prepare_data` read the test file

    def required_files(self) -> list[Path]:
        files = [self.question_path(name) for split in ("train", "val", "test") for name in self.file_splits(split)]
        return files + [self.path(self.answers_file), self.path(self.width_heights_file)]

    def file_splits(self, split: str) -> list[str]:
        """The file split names read for `split` (train: `train_splits`; val / test: `data.splits`)."""
        return self.train_splits if split == "train" else [self.splits[split]]

    def question_path(self, file_split: str) -> Path:
        return self.root / self.questions_file.format(split=file_split)

    def load_questions(self, split: str, keep_with_image: bool = False) -> list[dict[str, Any]]:
        """The questions of `split`: its files concatenated (each filtered by `width_heights` when asked; an
        unlabelled file keeps every question or fails). Only the test split may be unlabelled."""
        out: list[dict[str, Any]] = []
        for name in self.file_splits(split):
            path = self.question_path(name)
            if not path.is_file():
                raise DataError(f"{path}: file not found (data.root={self.root})")
            rows = load_vqa_json(path)
            labelled = self._labelled[path] = vqa_rows_labelled(rows, path)
            if not labelled and split != "test":
                option = "data.train_splits" if split == "train" else f"data.splits.{split}"
                raise DataError(
                    f"{path}: no question has a 'label' (an unlabelled test split), but {option} names '{name}': "
                    f"{'training' if split == 'train' else 'validation'} needs answers; only data.splits.test may "
                    "name such a file"
                )
            out += self.keep_with_image(rows, path, every=not labelled) if keep_with_image else rows
        return out

    def labelled(self, split: str) -> bool:
        """Whether `split`'s rows carry answers (the test split may have none: LXMERT's official `test.json`)."""
        paths = [self.question_path(name) for name in self.file_splits(split)]
        if any(path not in self._labelled for path in paths):
            self.load_questions(split)
        return all(self._labelled[path] for path in paths)

    def prepare_data(self) -> None:
        """The files checked, and the test file's rows now, once (they are otherwise read only after the fit): labels
        on all rows or none (`vqa_rows_labelled`), and an unlabelled file's images all in `width_heights`."""
        super().prepare_data()
        if not self._test_checked:
            self.load_questions("test", keep_with_image=True)
            self._test_checked = True

    def read_answers(self, path: Path) -> dict[str, int]:
        return load_ans2label(path)

    def build_dataset(self, split: str) -> VQAPixels:
        questions = self.load_questions(split, keep_with_image=True)
        return VQAPixels(questions, self.images(), self.ans2label, labelled=self.labelled(split))

    def stream_finisher(self, split: str, context: dict[str, Any]) -> VQAPixels:
        n = len(self.ans2label)
        self.check_shard_count(context, "num_answers", n, self.path(self.answers_file), "answers")
        return VQAPixels([], self.images(), self.ans2label)

    @property
    def info(self) -> dict[str, Any]:
        return {"pixels": True, "num_answers": len(self.ans2label), "answers_file": str(self.path(self.answers_file))}

    def baselines(self, split: str = "test") -> dict[str, float]:
        """Chance (a uniformly random answer) and the question-type prior (the best constant answer per
        `question_type`, fitted on train's soft scores). None for a split without answers: nothing to score."""
        if not self.labelled(split):
            return {}
        train = self.load_questions("train")
        prior: dict[str, dict[str, float]] = {}
        for q in train:
            bucket = prior.setdefault(q.get("question_type", ""), {})
            for a, s in (q.get("label") or {}).items():
                bucket[a] = bucket.get(a, 0.0) + float(s)
        best = {t: max(b, key=b.get) for t, b in prior.items() if b}
        rows = self.load_questions(split)
        chance = [sum(float(s) for a, s in (q.get("label") or {}).items() if a in self.ans2label) for q in rows]
        n = len(self.ans2label)
        prior_acc = [float((q.get("label") or {}).get(best.get(q.get("question_type", ""), ""), 0.0)) for q in rows]
        return {
            f"{split}/vqa_acc_chance": float(np.mean(chance)) / n,
            f"{split}/vqa_acc_prior": float(np.mean(prior_acc)),
        }
