"""VQA: official questions JSON + soft-score targets (pickle/JSON) + answer vocabulary + region-feature LMDB."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vl.data.base import VLDataModule, check_global_token
from vl.data.features import RegionReader
from vl.data.formats.vqa import load_answer_vocab, load_questions, load_targets
from vl.data.formats.vqa_answers import trainval_minval_split
from vl.data.samplers import split_key
from vl.errors import ConfigError, DataError


def _question_type(question: str) -> str:
    return " ".join(question.lower().split()[:3])


class VQAQuestions(Dataset):
    """One example per question: text, regions, dense soft-score target (A,)."""

    def __init__(
        self, questions: list[dict], targets: dict[int, dict], regions: RegionReader, num_answers: int
    ) -> None:
        self.questions = questions
        self.targets = targets
        self.regions = regions
        self.num_answers = num_answers

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        return self.finish(self.record(index), epoch)

    def record(self, index: int) -> dict[str, Any]:
        """The stored part of example `index` (`vl.data.streaming`): the target as its sparse labels and scores."""
        q = self.questions[index]
        entry = self.targets.get(q["question_id"]) or {"labels": [], "scores": []}
        return {
            "text": q["question"],
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "index": index,
            "vqa_labels": np.asarray(entry["labels"], dtype=np.int64).reshape(-1),
            "vqa_scores": np.asarray(entry["scores"], dtype=np.float32).reshape(-1),
            "visual": self.regions[str(q["image_id"])],
        }

    def finish(self, record: dict[str, Any], epoch: int) -> dict[str, Any]:
        """A record -> the example: the dense soft-score target (A,)."""
        example = dict(record)
        target = np.zeros(self.num_answers, dtype=np.float32)
        target[example.pop("vqa_labels")] = example.pop("vqa_scores")
        example["vqa_target"] = target
        example["epoch"] = epoch
        return example

    def stream_context(self) -> dict[str, Any]:
        return {"num_answers": self.num_answers}


class VQADataModule(VLDataModule):
    """`data=vqa`. Files are relative to `root` with `{split}` filled from `splits`.

    Besides the file splits (`train`, `val`, ...), `splits` may name ViLBERT's composed ones: `trainval` = the train
    questions + the val questions but the last `minval_size` (3000) by question id, `minval` = those last ones (the
    seed's `_load_dataset`, each file's questions sorted by question id; `vqa_answers.trainval_minval_split`, the rule
    `vl.tools.vqa_convert` also writes files by). Their questions and targets are read from the train and val files,
    as the seed reads them; the published ViLBERT recipe trains on trainval and validates on minval.

    `global_token` (`vl.data.base.GLOBAL_TOKEN`): "all" (default, vilbert_beta's reader): ViLBERT's global image token
    is the mean of all the image's regions in the feature file, also those past `max_regions`; "kept": of the kept
    ones (vl's earlier behaviour). Other models do not read it."""

    label_keys = {
        "vqa_target": ("vqa_targets", "vector"),
        "question_id": ("question_id", "long"),
        "image_id": ("image_id", "long"),
    }

    prediction_file = "vqa_predictions.json"  # EvalAI format, written into the run dir by `test`

    def __init__(
        self,
        *,
        questions: str = "vqa/v2_OpenEnded_mscoco_{split}2014_questions.json",
        targets: str = "vqa/cache/{split}_target.pkl",
        answers: str = "vqa/cache/trainval_ans2label.pkl",
        features: str = "regions.lmdb",
        minval_size: int = 3000,
        global_token: str = "all",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.global_token = check_global_token(global_token)
        if int(minval_size) < 0:
            raise ConfigError(f"data.minval_size={minval_size}: must be >= 0 (the val questions held out as minval)")
        self.minval_size = int(minval_size)
        self.questions_file = questions
        self.targets_file = targets
        self.answers_file = answers
        self.features_file = features
        self._ans2label: dict[str, int] | None = None

    def _file_parts(self, split: str) -> list[tuple[str, str | None]]:
        """(file split name, which of its questions: None for all) making up `split` (see the class docstring)."""
        name = self.splits[split]
        if name == "trainval":
            return [("train", None), ("val", "trainval")]
        if name == "minval":
            return [("val", "minval")]
        return [(name, None)]

    def required_files(self) -> list[Path]:
        files = [self.path(self.answers_file), self.path(self.features_file)]
        for split in ("train", "val", "test"):
            for name, _ in self._file_parts(split):
                files += [self.root / self.questions_file.format(split=name)]
                files += [self.root / self.targets_file.format(split=name)]
        return list(dict.fromkeys(files))

    @property
    def ans2label(self) -> dict[str, int]:
        if self._ans2label is None:
            self._ans2label = load_answer_vocab(self.path(self.answers_file))
        return self._ans2label

    @property
    def label2ans(self) -> list[str]:
        out = [""] * len(self.ans2label)
        for ans, idx in self.ans2label.items():
            out[idx] = ans
        return out

    def answer_vocabulary(self) -> list[str]:
        return self.label2ans

    def build_dataset(self, split: str) -> VQAQuestions:
        questions: list[dict[str, Any]] = []
        targets: dict[int, dict[str, Any]] = {}
        n = len(self.ans2label)
        composed = self.splits[split] in ("trainval", "minval")
        for name, part in self._file_parts(split):
            qpath = self.root / self.questions_file.format(split=name)
            tpath = self.root / self.targets_file.format(split=name)
            file_questions = load_questions(qpath)
            if composed:  # the seed's order (each file sorted by question id), then its val split
                file_questions = sorted(file_questions, key=lambda q: q["question_id"])
            if part is not None:
                to_trainval, minval = trainval_minval_split(
                    [q["question_id"] for q in file_questions], self.minval_size
                )
                keep = set(to_trainval if part == "trainval" else minval)
                file_questions = [q for q in file_questions if q["question_id"] in keep]
            file_targets = {int(t["question_id"]): t for t in load_targets(tpath)}
            for t in file_targets.values():
                bad = [label for label in t["labels"] if not 0 <= int(label) < n]
                if bad:
                    raise DataError(f"{tpath}: question {t['question_id']} has answer label {bad[0]} outside [0, {n})")
            missing = next((q["image_id"] for q in file_questions if str(q["image_id"]) not in self.regions), None)
            if missing is not None:
                raise DataError(f"{self.regions.path}: no region features for image id {missing} (used in {qpath})")
            questions += file_questions
            targets.update(
                (q["question_id"], file_targets[q["question_id"]])
                for q in file_questions
                if q["question_id"] in file_targets
            )
        return VQAQuestions(questions, targets, self.regions, n)

    def stream_finisher(self, split: str, context: dict[str, Any]) -> VQAQuestions:
        n = len(self.ans2label)
        self.check_shard_count(context, "num_answers", n, self.path(self.answers_file), "answers")
        return VQAQuestions([], {}, None, n)  # type: ignore[arg-type]  # finish reads no regions

    @property
    def info(self) -> dict[str, Any]:
        first = self.regions[self.regions.ids()[0]]
        return {"visual_dim": int(first["features"].shape[1]), "num_answers": len(self.ans2label)}

    def baselines(self, split: str = "test") -> dict[str, float]:
        """Reference points for `test/vqa_acc`: a uniformly random answer, and the best constant answer per question
        type (first three words) fitted on train — a model must beat the prior to be using the image."""
        self.setup("fit")
        self.setup("test" if split == "test" else "validate")
        prior: dict[str, np.ndarray] = {}
        train = self.datasets["train"]
        for q in train.questions:
            entry = train.targets.get(q["question_id"])
            if entry is not None:
                vec = prior.setdefault(_question_type(q["question"]), np.zeros(train.num_answers))
                np.add.at(vec, np.asarray(entry["labels"], dtype=np.int64), np.asarray(entry["scores"]))
        best = {k: int(v.argmax()) for k, v in prior.items()}
        data = self.datasets[split]
        chance, prior_acc = [], []
        for q in data.questions:
            entry = data.targets.get(q["question_id"], {"labels": [], "scores": []})
            scores = dict(zip((int(x) for x in entry["labels"]), entry["scores"]))
            chance.append(sum(scores.values()) / data.num_answers)
            prior_acc.append(scores.get(best.get(_question_type(q["question"]), -1), 0.0))
        return {f"{split}/vqa_acc_chance": float(np.mean(chance)), f"{split}/vqa_acc_prior": float(np.mean(prior_acc))}

    def write_predictions(self, predictions: list[dict[str, Any]], path: Path) -> Path:
        """EvalAI-style `[{"question_id", "answer"}]`."""
        label2ans = self.label2ans
        rows = [{"question_id": p["question_id"], "answer": label2ans[p["answer_idx"]]} for p in predictions]
        path.write_text(json.dumps(sorted(rows, key=lambda r: r["question_id"])))
        return path
