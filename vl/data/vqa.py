"""VQA: official questions JSON + soft-score targets (pickle/JSON) + answer vocabulary + region-feature LMDB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vl.data.base import AnswerVocabulary, VLDataModule
from vl.data.collate import check_text_truncation
from vl.data.features import RegionReader
from vl.data.formats.vqa import load_answer_vocab, load_questions, load_targets
from vl.data.formats.vqa_answers import trainval_minval_split
from vl.data.region_rules import check_global_token
from vl.data.samplers import split_key
from vl.errors import ConfigError, DataError

#: the official VQA v2 test splits (no answers published; scored on EvalAI): `data.splits.test=test2015` or
#: `test-dev2015` reads its own questions file and no targets. `data.split_files.<name>` entries are merged over these
OFFICIAL_SPLIT_FILES: dict[str, dict[str, Any]] = {
    "test2015": {"questions": "vqa/v2_OpenEnded_mscoco_test2015_questions.json", "targets": None, "features": None},
    "test-dev2015": {
        "questions": "vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json",
        "targets": None,
        "features": None,
    },
}
_SPLIT_FILE_KEYS = ("questions", "targets", "features")


def _question_type(question: str) -> str:
    return " ".join(question.lower().split()[:3])


class VQAQuestions(Dataset):
    """One example per question: text, regions, dense soft-score target (A,); `labelled=False` (an official test
    split, no answers published): no target at all, so the test stage predicts and scores nothing."""

    def __init__(
        self,
        questions: list[dict],
        targets: dict[int, dict],
        regions: RegionReader,
        num_answers: int,
        labelled: bool = True,
    ) -> None:
        self.questions = questions
        self.targets = targets
        self.regions = regions
        self.num_answers = num_answers
        self.labelled = labelled

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        return self.finish(self.record(index), epoch)

    def record(self, index: int) -> dict[str, Any]:
        """The stored part of example `index` (`vl.data.streaming`): the target as its sparse labels and scores."""
        q = self.questions[index]
        record: dict[str, Any] = {
            "text": q["question"],
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "index": index,
        }
        if self.labelled:
            entry = self.targets[q["question_id"]]  # every labelled question has one (`build_dataset` checks)
            record["vqa_labels"] = np.asarray(entry["labels"], dtype=np.int64).reshape(-1)
            record["vqa_scores"] = np.asarray(entry["scores"], dtype=np.float32).reshape(-1)
        record["visual"] = self.regions[str(q["image_id"])]
        return record

    def finish(self, record: dict[str, Any], epoch: int) -> dict[str, Any]:
        """A record -> the example: the dense soft-score target (A,)."""
        example = dict(record)
        if "vqa_labels" in example:  # unlabelled rows carry no target: the VQA head predicts, scores nothing
            target = np.zeros(self.num_answers, dtype=np.float32)
            target[example.pop("vqa_labels")] = example.pop("vqa_scores")
            example["vqa_target"] = target
        example["epoch"] = epoch
        return example

    def stream_context(self) -> dict[str, Any]:
        return {"num_answers": self.num_answers}


class VQADataModule(AnswerVocabulary, VLDataModule):
    """`data=vqa`. Files are relative to `root` with `{split}` filled from `splits`.

    Besides the file splits (`train`, `val`, ...), `splits` may name ViLBERT's composed ones: `trainval` = the train
    questions + the val questions but the last `minval_size` (3000) by question id, `minval` = those last ones (the
    seed's `_load_dataset`, each file's questions sorted by question id; `vqa_answers.trainval_minval_split`, the rule
    `vl.tools.vqa_convert` also writes files by). Their questions and targets are read from the train and val files,
    as the seed reads them; the published ViLBERT recipe trains on trainval and validates on minval.

    `global_token` (`vl.data.region_rules.GLOBAL_TOKEN`): "all" (default, vilbert_beta's reader): ViLBERT's global image token
    is the mean of all the image's regions in the feature file, also those past `max_regions`; "kept": of the kept
    ones (vl's earlier behaviour). Other models do not read it.

    `text_truncation` (`vl.data.collate.TEXT_TRUNCATION`): "seed" (default, vilbert_beta's reader): `[CLS] question
    [SEP]` cut to `max_text_len`, so an over-long question loses its [SEP]; "tokenizer": the tokenizer's truncation (cuts
    the question's tokens, keeps [SEP]).

    `split_files.<file split>`: that split's own `questions` / `targets` / `features` files instead of the templates
    and `features` (each optional). `targets: null` declares a split without answers (the official `test2015` and
    `test-dev2015`, `OFFICIAL_SPLIT_FILES`): only `splits.test` may name one; its test stage writes the EvalAI file and
    no accuracy. `features: <file>`: its images' own region features (the seed's test-image LMDB)."""

    label_keys = {
        "vqa_target": ("vqa_targets", "vector"),
        "question_id": ("question_id", "long"),
        "image_id": ("image_id", "long"),
    }

    def __init__(
        self,
        *,
        questions: str = "vqa/v2_OpenEnded_mscoco_{split}2014_questions.json",
        targets: str = "vqa/cache/{split}_target.pkl",
        answers: str = "vqa/cache/trainval_ans2label.pkl",
        features: str = "regions.lmdb",
        minval_size: int = 3000,
        global_token: str = "all",
        text_truncation: str = "seed",
        split_files: dict[str, dict[str, Any]] | None = OFFICIAL_SPLIT_FILES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.global_token = check_global_token(global_token)
        self.text_truncation = check_text_truncation(text_truncation)
        if int(minval_size) < 0:
            raise ConfigError(f"data.minval_size={minval_size}: must be >= 0 (the val questions held out as minval)")
        self.minval_size = int(minval_size)
        self.questions_file = questions
        self.targets_file = targets
        self.answers_file = answers
        self.features_file = features
        self.split_files = _split_files(split_files)
        for role in ("train", "val"):
            unlabelled = [name for name, _ in self._file_parts(role) if not self._labelled(name)]
            if unlabelled:
                raise ConfigError(
                    f"data.splits.{role}={self.splits[role]}: '{unlabelled[0]}' has no answers "
                    f"(data.split_files.{unlabelled[0]}.targets=null); only data.splits.test may name such a split"
                )
        self._split_regions: dict[str, RegionReader] = {}

    def _file_parts(self, split: str) -> list[tuple[str, str | None]]:
        """(file split name, which of its questions: None for all) making up `split` (see the class docstring)."""
        name = self.splits[split]
        if name == "trainval":
            return [("train", None), ("val", "trainval")]
        if name == "minval":
            return [("val", "minval")]
        return [(name, None)]

    def _labelled(self, name: str) -> bool:
        """Whether file split `name` has targets (`split_files.<name>.targets: null` says it has none)."""
        entry = self.split_files.get(name, {})
        return "targets" not in entry or entry["targets"] is not None

    def labelled(self, split: str) -> bool:
        """Whether `split` (train / val / test) has answers to score."""
        return all(self._labelled(name) for name, _ in self._file_parts(split))

    def _files(self, name: str) -> tuple[Path, Path | None, str]:
        """File split `name` -> (its questions file, its targets file or None, its features file relative to root)."""
        entry = self.split_files.get(name, {})
        questions = entry.get("questions") or self.questions_file.format(split=name)
        targets = self.targets_file.format(split=name) if "targets" not in entry else entry["targets"]
        return (
            self.root / questions,
            None if targets is None else self.root / targets,
            entry.get("features") or self.features_file,
        )

    def required_files(self) -> list[Path]:
        files = [self.path(self.answers_file), self.path(self.features_file)]
        for split in ("train", "val", "test"):
            for name, _ in self._file_parts(split):
                questions, targets, features = self._files(name)
                files += [questions, *([targets] if targets is not None else []), self.path(features)]
        return list(dict.fromkeys(files))

    def check_files(self) -> None:
        try:
            super().check_files()
        except DataError as err:
            names = [n for s in ("train", "val", "test") for n, _ in self._file_parts(s) if n not in self.split_files]
            name = next((n for n in names if str(self._files(n)[0]) in str(err)), None)
            if name is None:
                raise
            raise DataError(
                f"{err}; a split with other file names: data.split_files.{name}.questions=<file> (targets=null: "
                f"no answers, as the official {' / '.join(OFFICIAL_SPLIT_FILES)})"
            ) from None

    def _regions_of(self, features: str) -> RegionReader:
        """The reader of `features` (the corpus's own one, or a split's `split_files.<name>.features`)."""
        if features == self.features_file:
            return self.regions
        if features not in self._split_regions:
            reader = self.open_regions(features)
            ids = reader.ids()
            if not ids:
                raise DataError(f"{reader.path}: no region features in the file")
            dim, own = reader[ids[0]]["features"].shape[1], self.info["visual_dim"]
            if dim != own:
                raise DataError(
                    f"{reader.path}: region features of dim {dim}, the model reads {own} ({self.path(self.features_file)})"
                )
            self._split_regions[features] = reader
        return self._split_regions[features]

    def read_answers(self, path: Path) -> dict[str, int]:
        return load_answer_vocab(path)  # ans2label or label2ans, JSON or pickle

    def answer_vocabulary(self) -> list[str]:
        return self.label2ans

    def build_dataset(self, split: str) -> VQAQuestions:
        questions: list[dict[str, Any]] = []
        targets: dict[int, dict[str, Any]] = {}
        n = len(self.ans2label)
        composed = self.splits[split] in ("trainval", "minval")
        parts = [(part, *self._files(name)) for name, part in self._file_parts(split)]
        if len({features for *_, features in parts}) > 1 or len({tpath is None for *_, tpath, _ in parts}) > 1:
            raise ConfigError(f"data.splits.{split}={self.splits[split]}: its parts have different features / labels")
        regions = self._regions_of(parts[0][-1])
        for part, qpath, tpath, _ in parts:
            file_questions = load_questions(qpath)
            if composed:  # the seed's order (each file sorted by question id), then its val split
                file_questions = sorted(file_questions, key=lambda q: q["question_id"])
            if part is not None:
                to_trainval, minval = trainval_minval_split(
                    [q["question_id"] for q in file_questions], self.minval_size
                )
                keep = set(to_trainval if part == "trainval" else minval)
                file_questions = [q for q in file_questions if q["question_id"] in keep]
            file_targets = {} if tpath is None else {int(t["question_id"]): t for t in load_targets(tpath)}
            for t in file_targets.values():
                bad = [label for label in t["labels"] if not 0 <= int(label) < n]
                if bad:
                    raise DataError(f"{tpath}: question {t['question_id']} has answer label {bad[0]} outside [0, {n})")
            # the seed's reader asserts that questions and targets line up, image ids included
            for q in file_questions if tpath is not None else []:
                target = file_targets.get(q["question_id"])
                if target is None:
                    raise DataError(
                        f"{tpath}: no target entry for question {q['question_id']} of {qpath} (a labelled split needs "
                        "one per question, its labels may be empty; targets=null declares a split without answers)"
                    )
                if str(target["image_id"]) != str(q["image_id"]):
                    raise DataError(
                        f"{tpath}: question {q['question_id']} is on image {target['image_id']} there, on image "
                        f"{q['image_id']} in {qpath}"
                    )
            missing = next((q["image_id"] for q in file_questions if str(q["image_id"]) not in regions), None)
            if missing is not None:
                raise DataError(f"{regions.path}: no region features for image id {missing} (used in {qpath})")
            questions += file_questions
            if tpath is not None:
                targets.update((q["question_id"], file_targets[q["question_id"]]) for q in file_questions)
        return VQAQuestions(questions, targets, regions, n, labelled=parts[0][2] is not None)

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
        type (first three words) fitted on train — a model must beat the prior to be using the image. None for a split
        without answers (`split_files`): there is nothing to score."""
        if not self.labelled(split):
            return {}
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


def _split_files(given: Any) -> dict[str, dict[str, Any]]:
    """`data.split_files` checked and merged over `OFFICIAL_SPLIT_FILES` (key by key: `test2015: {features: x}` keeps
    its questions file and its `targets: null`): {file split: {questions / targets / features: file or null}}."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in dict(given or {}).items():
        entry = {**OFFICIAL_SPLIT_FILES.get(str(name), {}), **dict(entry or {})}
        unknown = sorted(set(entry) - set(_SPLIT_FILE_KEYS))
        if unknown:
            raise ConfigError(
                f"data.split_files.{name}.{unknown[0]}: unknown key; a split's files are {', '.join(_SPLIT_FILE_KEYS)}"
            )
        for key, value in entry.items():
            if value is not None and not isinstance(value, str):
                raise ConfigError(
                    f"data.split_files.{name}.{key}={value!r}: a file path relative to data.root, or null"
                )
        if "questions" in entry and entry["questions"] is None:
            raise ConfigError(f"data.split_files.{name}.questions: null; every split needs its questions file")
        out[str(name)] = entry
    return {**{name: dict(entry) for name, entry in OFFICIAL_SPLIT_FILES.items()}, **out}
