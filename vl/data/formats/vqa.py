"""Pure helpers for the VQA v2 file formats (official JSON, ViLBERT/LXMERT caches).

Formats:
- questions ``v2_OpenEnded_mscoco_{split}2014_questions.json``: ``{"questions": [{question_id, image_id, question}]}``.
- annotations ``v2_mscoco_{split}2014_annotations.json``: ``{"annotations": [{question_id, image_id, question_type,
  answer_type, multiple_choice_answer, answers: [{answer, answer_confidence, answer_id}] x10}]}``.
- targets ``cache/{split}_target.pkl`` / ``.json``: list of ``{question_id, image_id, labels: [int], scores: [float]}``.
- answer vocabulary: ``trainval_ans2label`` (dict answer -> index) / ``trainval_label2ans`` (list index -> answer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vl.data.formats.jsonl import read_json
from vl.data.formats.safe_pickle import read_pickle_file
from vl.data.formats.vqa_answers import EVALUATORS, compared_forms, prediction_form
from vl.errors import DataError

__all__ = [
    "vqa_soft_score",
    "build_targets",
    "load_questions",
    "load_annotations",
    "load_targets",
    "load_answer_vocab",
    "load_label2ans",
    "label2ans_of",
]

_SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)


def vqa_soft_score(count: int) -> float:
    """Soft VQA score of an answer given by ``count`` of the 10 annotators: 0/0.3/0.6/0.9/1.0 for 0/1/2/3/>=4."""
    if count < 0:
        raise ValueError(f"annotator count must be >= 0, got {count}")
    return _SOFT_SCORES[min(int(count), 4)]


def build_targets(
    annotations: Iterable[Mapping[str, Any]], ans2label: Mapping[str, int], *, matching: str = "2021"
) -> list[dict[str, Any]]:
    """Soft-score targets from official annotations.

    An answer of the vocabulary gets the soft score of the number of human answers it would match under the official
    VQA evaluator (`vl.data.formats.vqa_answers`), i.e. the credit a model predicting it gets: ``matching="2021"`` (default,
    the current evaluator) / ``"2016"`` (its earlier release) compare the human answers and the vocabulary answer as
    that evaluator does (``compared_forms``); ``"raw"`` counts the raw human strings that equal a vocabulary entry
    (the bottom-up-attention ``compute_softscore.py`` the ViLBERT seed's caches come from; "Yes" is not "yes").

    Returns one ``{"question_id", "image_id", "labels": [int], "scores": [float]}`` per annotation (input order);
    labels are sorted by answer index; answers matching no vocabulary entry are dropped (``labels`` may be empty).
    """
    if matching not in (*EVALUATORS, "raw"):
        raise ValueError(f"matching must be one of {(*EVALUATORS, 'raw')}, got {matching!r}")
    # the vocabulary under each prediction transform -> labels (several entries may share a form)
    by_form: dict[str, dict[str, list[int]]] = {"normalized": {}, "stripped": {}, "raw": {}}
    for answer, label in ans2label.items():
        by_form["raw"].setdefault(answer, []).append(label)
        for how in ("normalized", "stripped"):
            by_form[how].setdefault(prediction_form(answer, how), []).append(label)
    targets: list[dict[str, Any]] = []
    for i, ann in enumerate(annotations):
        if "question_id" not in ann or "answers" not in ann:
            missing = "question_id" if "question_id" not in ann else "answers"
            raise DataError(f"annotation {i} has no {missing!r}")
        humans = [_answer_text(a, i) for a in ann["answers"]]
        if matching == "raw":
            compared, how = humans, "raw"
        else:
            compared, how = compared_forms(humans, matching)
        counts = Counter(compared)
        pairs = sorted((lab, vqa_soft_score(c)) for a, c in counts.items() for lab in by_form[how].get(a, ()))
        targets.append(
            {
                "question_id": ann["question_id"],
                "image_id": ann.get("image_id"),
                "labels": [lab for lab, _ in pairs],
                "scores": [s for _, s in pairs],
            }
        )
    return targets


def _answer_text(answer: Any, index: int) -> str:
    if isinstance(answer, Mapping):
        if "answer" not in answer:
            raise DataError(f"annotation {index}: an answer has no 'answer'")
        return str(answer["answer"])
    return str(answer)


# ----------------------------------------------------------------------------------------------------------- loaders


def _read_pickle(path: Path) -> Any:
    return read_pickle_file(path)  # plain data only: a pickle that would run code is refused


def _read_json_or_pickle(path: Path) -> Any:
    if path.suffix in (".pkl", ".pickle"):
        return _read_pickle(path)
    return read_json(path)


def _check_entries(
    path: Path, entries: Any, fields: dict[str, type | tuple[type, ...]], what: str = "entry"
) -> list[dict[str, Any]]:
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a list of {what}s, got {type(entries).__name__}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise DataError(f"{path}: {what} {i} is a {type(e).__name__}, expected an object")
        for name, typ in fields.items():
            if name not in e:
                raise DataError(f"{path}: {what} {i} has no {name!r}")
            if not isinstance(e[name], typ) or isinstance(e[name], bool):
                raise DataError(f"{path}: {what} {i} field {name!r} has type {type(e[name]).__name__}")
    return entries


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """Official VQA questions JSON -> list of ``{"question_id": int, "image_id": int, "question": str, ...}``."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or "questions" not in data:
        raise DataError(f"{path}: missing top-level field 'questions'")
    questions = _check_entries(path, data["questions"], {"question_id": int, "image_id": int, "question": str})
    _unique_question_ids(path, questions, "questions")
    return questions


def _unique_question_ids(path: Path, entries: list[dict[str, Any]], what: str) -> None:
    """A question id twice: its target would be replaced by the later entry's, its prediction row dropped (the
    EvalAI file is keyed by question id)."""
    seen: dict[int, int] = {}
    for i, e in enumerate(entries):
        first = seen.setdefault(int(e["question_id"]), i)
        if first != i:
            raise DataError(f"{path}: {what} {first} and {i} are both question {e['question_id']}")


def load_annotations(path: str | Path) -> list[dict[str, Any]]:
    """Official VQA annotations JSON -> list of annotation dicts (each has ``question_id`` and 10 ``answers``).

    Other fields (``image_id``, ``answer_type``, ...) are kept when present but not required (some public fixtures
    lack them)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise DataError(f"{path}: missing top-level field 'annotations'")
    anns = _check_entries(path, data["annotations"], {"question_id": int, "answers": list})
    for i, a in enumerate(anns):
        for j, ans in enumerate(a["answers"]):
            if not isinstance(ans, dict) or not isinstance(ans.get("answer"), str):
                raise DataError(f"{path}: entry {i} answer {j} has no 'answer'")
    return anns


def load_targets(path: str | Path) -> list[dict[str, Any]]:
    """Target cache (``.pkl`` pickle or ``.json``) -> list of ``{question_id, image_id, labels, scores}``."""
    path = Path(path)
    data = _read_json_or_pickle(path)
    entries = _check_entries(path, data, {"question_id": int, "labels": list, "scores": list})
    for i, e in enumerate(entries):
        if "image_id" not in e:
            raise DataError(f"{path}: entry {i} has no 'image_id'")
        if len(e["labels"]) != len(e["scores"]):
            raise DataError(f"{path}: entry {i} has {len(e['labels'])} labels but {len(e['scores'])} scores")
        if any(not isinstance(x, int) or isinstance(x, bool) for x in e["labels"]):
            raise DataError(f"{path}: entry {i} field 'labels' must hold integers")
        if any(not isinstance(x, int | float) or isinstance(x, bool) for x in e["scores"]):
            raise DataError(f"{path}: entry {i} field 'scores' must hold numbers")
        if not all(0.0 <= x <= 1.0 for x in e["scores"]):  # NaN fails too: a soft VQA score is in [0, 1]
            raise DataError(
                f"{path}: entry {i} (question {e['question_id']}) has a score outside [0, 1]: {e['scores']}"
            )
        if len(set(e["labels"])) != len(e["labels"]):
            raise DataError(f"{path}: entry {i} (question {e['question_id']}) repeats a label: {e['labels']}")
    _unique_question_ids(path, entries, "entries")
    return entries


def load_answer_vocab(path: str | Path) -> dict[str, int]:
    """Answer vocabulary -> ``ans2label`` dict. Accepts ans2label dicts and label2ans lists, ``.json`` or ``.pkl``."""
    path = Path(path)
    data = _read_json_or_pickle(path)
    if isinstance(data, list):
        ans2label: dict[str, int] = {}
        for i, a in enumerate(data):
            if not isinstance(a, str):
                raise DataError(f"{path}: entry {i} is a {type(a).__name__}, expected an answer string")
            if a in ans2label:
                raise DataError(f"{path}: answer {a!r} appears twice (entries {ans2label[a]} and {i})")
            ans2label[a] = i
        return ans2label
    if isinstance(data, dict):
        for a, lab in data.items():
            if not isinstance(a, str) or not isinstance(lab, int) or isinstance(lab, bool):
                raise DataError(f"{path}: entry {a!r} -> {lab!r} is not answer string -> integer label")
        labels = sorted(data.values())
        if labels != list(range(len(labels))):
            raise DataError(f"{path}: labels are not 0..{len(labels) - 1} without gaps or repeats")
        return dict(data)
    raise DataError(f"{path}: expected an answer->label object or a list of answers, got {type(data).__name__}")


def load_label2ans(path: str | Path) -> list[str]:
    """Answer vocabulary file (either layout) -> ``label2ans`` list."""
    return label2ans_of(load_answer_vocab(path))


def label2ans_of(ans2label: Mapping[str, int]) -> list[str]:
    """``ans2label`` (answer -> label 0..N-1) -> ``label2ans`` (the answer of each label)."""
    label2ans = [""] * len(ans2label)
    for a, lab in ans2label.items():
        label2ans[lab] = a
    return label2ans
