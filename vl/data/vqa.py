"""VQA: official questions JSON + soft-score targets (pickle/JSON) + answer vocabulary + region-feature LMDB."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vl.data.base import VLDataModule
from vl.data.features import RegionReader
from vl.data.formats.vqa import load_answer_vocab, load_questions, load_targets
from vl.data.samplers import split_key
from vl.errors import DataError


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
    """`data=vqa`. Files are relative to `root` with `{split}` filled from `splits`."""

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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.questions_file = questions
        self.targets_file = targets
        self.answers_file = answers
        self.features_file = features
        self._ans2label: dict[str, int] | None = None

    def required_files(self) -> list[Path]:
        files = [self.path(self.answers_file), self.path(self.features_file)]
        for split in ("train", "val", "test"):
            files += [self.path(self.questions_file, split), self.path(self.targets_file, split)]
        return files

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
        qpath, tpath = self.path(self.questions_file, split), self.path(self.targets_file, split)
        questions = load_questions(qpath)
        targets = {int(t["question_id"]): t for t in load_targets(tpath)}
        n = len(self.ans2label)
        for t in targets.values():
            bad = [label for label in t["labels"] if not 0 <= int(label) < n]
            if bad:
                raise DataError(f"{tpath}: question {t['question_id']} has answer label {bad[0]} outside [0, {n})")
        missing = next((q["image_id"] for q in questions if str(q["image_id"]) not in self.regions), None)
        if missing is not None:
            raise DataError(f"{self.regions.path}: no region features for image id {missing} (used in {qpath})")
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
