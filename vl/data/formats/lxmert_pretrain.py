"""The LXMERT / CLIP-ViL data formats, read as the CLIP-ViL seed reads them (spec: clip_vil.md).

- Pretraining JSON (`data/lxmert/mscoco_train.json`, `vgnococo.json`, ...): a list of
  `{"img_id", "labelf": {src: [{answer: score}, ...]}, "sentf": {src: [sentences]}}`, flattened to one example per
  sentence, uid `"{img_id}_{src}_{idx:03d}"`; a label is attached when `src` is in `labelf` (`flatten_pretrain`).
- Image paths (`image_path`): an id containing `val2014` -> `mscoco/val2014/<id>.jpg`, `train2014` ->
  `mscoco/train2014/<id>.jpg`, anything else -> `vg_raw_images/VG_100K/<id>.jpg` (relative to the image root).
- `mscoco/width_heigths.json` (the seed's spelling): `{"data/<image path>": [h, w]}` as the seed's size pass writes
  it (`(image.shape[0], image.shape[1])` of the decoded array, stored under names `w, h`: the pair is (height,
  width) whatever the spec's "(w,h)" says; keys carry the seed's `data/` prefix, accepted here with or
  without it); used to filter examples and group aspect ratios (`load_width_heights`).
- Answer lists: `lxmert/all_ans.json` (list of `{"ans", "dsets"}`, 9500 in the release) and the VQA
  `trainval_ans2label.json` (dict, 3129) / `trainval_label2ans.json` (list).
- VQA JSON (`data/vqa/{train,nominival,minival}.json`): a list of
  `{"answer_type", "img_id", "label": {ans: score}, "question_id", "question_type", "sent"}`; the official test
  split (`test.json`: test-dev / test-std) has no "label" in any row (`vqa_rows_labelled`).
- `convert_ans`: the seed's `AnswerTable` normalisation of pretraining answers. It is NOT the VQA evaluator's
  (`vl.data.formats.vqa_answers.normalize_answer`): it only lower-cases, strips one trailing ".", drops a leading
  article word, maps number words to digits and "grey" -> "gray"; punctuation inside an answer and contractions are
  left alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vl.data.formats.jsonl import read_json
from vl.errors import DataError

__all__ = [
    "convert_ans",
    "flatten_pretrain",
    "image_path",
    "load_all_answers",
    "load_pretrain_json",
    "load_vqa_json",
    "vqa_rows_labelled",
    "load_width_heights",
    "load_ans2label",
]

#: the seed's `AnswerTable.ANS_CONVERT`
ANS_CONVERT: dict[str, str] = {
    "a man": "man",
    "the man": "man",
    "a woman": "woman",
    "the woman": "woman",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "grey": "gray",
}


def convert_ans(ans: str) -> str:
    """The seed's answer normalisation: lower-case; drop one trailing "."; strip a leading "a " / "an " / "the ";
    then the `ANS_CONVERT` table ("two" -> "2", "grey" -> "gray", "a man" -> "man")."""
    if len(ans) == 0:
        return ""
    ans = ans.lower()
    if ans[-1] == ".":
        ans = ans[:-1].strip()
    if ans.startswith("a "):
        ans = ans[2:].strip()
    if ans.startswith("an "):
        ans = ans[3:].strip()
    if ans.startswith("the "):
        ans = ans[4:].strip()
    return ANS_CONVERT.get(ans, ans)


def convert_label(label: dict[str, float], used: Any) -> dict[str, float]:
    """The seed's in-place answer normalisation of a label (`lxmert_data.py`): each answer in order is normalised
    (`convert_ans`); one the answer table does not use (`used(answer)` false) is dropped; a changed one takes the
    place of the answer it becomes, replacing its score, not adding to it ("two" then "2": the score of "two")."""
    out = dict(label)
    for ans in list(out):
        new = convert_ans(ans)
        if not used(new):
            out.pop(ans)
        elif ans != new:
            out[new] = out.pop(ans)
    return out


def image_path(img_id: str) -> str:
    """The seed's image path rule, relative to the image root."""
    if "val2014" in img_id:
        return f"mscoco/val2014/{img_id}.jpg"
    if "train2014" in img_id:
        return f"mscoco/train2014/{img_id}.jpg"
    if "test2015" in img_id:
        return f"mscoco/test2015/{img_id}.jpg"
    return f"vg_raw_images/VG_100K/{img_id}.jpg"


def _score_error(label: dict[str, Any]) -> str | None:
    """Why an answer -> score dict is not one of VQA soft scores (finite numbers in [0, 1]), or None."""
    for ans, score in label.items():
        number = isinstance(score, int | float) and not isinstance(score, bool)
        if not number or not math.isfinite(score) or not 0 <= score <= 1:
            return f"label {ans!r} score {score!r} is not a number in [0, 1]"
    return None


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def load_pretrain_json(path: str | Path) -> list[dict[str, Any]]:
    """An LXMERT pretraining JSON -> its datums, checked: `img_id` a non-empty string, `sentf` `{src: [sentence]}`
    (strings; an empty one is kept, as the seed tokenises it), `labelf` (optional) `{src: [{answer: score}]}` with VQA soft scores (numbers in [0, 1]: the
    seed samples an answer in proportion to them). A bad one is a DataError naming the file, the datum and the field."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of LXMERT datums")
    for n, datum in enumerate(data):
        if not isinstance(datum, dict) or "img_id" not in datum or not isinstance(datum.get("sentf"), dict):
            raise DataError(f"{path}: datum {n} lacks 'img_id' or a 'sentf' dict")
        if not _nonempty_str(datum["img_id"]):
            raise DataError(f"{path}: datum {n} field 'img_id' must be a non-empty string, got {datum['img_id']!r}")
        where = f"{path}: datum {n} ({datum['img_id']})"
        for src, sents in datum["sentf"].items():
            if not isinstance(sents, list):
                raise DataError(f"{where}: sentf[{src!r}] must be a list of sentences")
            for idx, sent in enumerate(sents):  # an empty one is the seed's [CLS] [SEP]: kept
                if not isinstance(sent, str):
                    raise DataError(f"{where}: sentf[{src!r}][{idx}] must be a string, got {sent!r}")
        labelf = datum.get("labelf") or {}
        if not isinstance(labelf, dict):
            raise DataError(f"{where}: 'labelf' must be a dict {{src: [{{answer: score}}]}}")
        for src, labels in labelf.items():
            if not isinstance(labels, list) or not all(isinstance(label, dict) for label in labels):
                raise DataError(f"{where}: labelf[{src!r}] must be a list of {{answer: score}} dicts")
            for idx, label in enumerate(labels):
                why = _score_error(label)
                if why:
                    raise DataError(f"{where}: labelf[{src!r}][{idx}]: {why}")
    return data


def flatten_pretrain(datums: Iterable[dict[str, Any]], *, source: str = "<lxmert json>") -> list[dict[str, Any]]:
    """One example per sentence: `{"uid", "img_id", "sent", "label" (dict or None), "src"}` (the seed's order)."""
    out = []
    for n, datum in enumerate(datums):
        labelf = datum.get("labelf") or {}
        for src, sents in datum["sentf"].items():
            labels = labelf.get(src)
            if labels is not None and len(labels) != len(sents):
                raise DataError(f"{source}: datum {n} ({datum['img_id']}): labelf[{src!r}] does not match sentf")
            for idx, sent in enumerate(sents):
                out.append(
                    {
                        "uid": f"{datum['img_id']}_{src}_{idx:03d}",
                        "img_id": datum["img_id"],
                        "sent": sent,
                        "label": labels[idx] if labels is not None else None,
                        "src": src,
                    }
                )
    return out


def load_all_answers(path: str | Path) -> list[str]:
    """`all_ans.json` -> the answers in file order (the answer ids of the pretraining QA head; the seed's
    `AnswerTable` uses them as stored, `convert_ans` is applied to the labels looked up in it)."""
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(a, dict) and "ans" in a for a in data):
        raise DataError(f"{path}: expected a list of {{'ans', 'dsets'}} records")
    answers = [str(a["ans"]) for a in data]
    if len(set(answers)) != len(answers):
        dup = next(a for i, a in enumerate(answers) if a in answers[:i])
        raise DataError(f"{path}: answer {dup!r} is listed twice")
    return answers


def load_ans2label(path: str | Path) -> dict[str, int]:
    data = read_json(path)
    if isinstance(data, list):  # label2ans
        data = {a: i for i, a in enumerate(data)}
    if not isinstance(data, dict) or sorted(data.values()) != list(range(len(data))):
        raise DataError(f"{path}: expected ans2label (answer -> 0..N-1) or label2ans (a list)")
    return {str(k): int(v) for k, v in data.items()}


def load_vqa_json(path: str | Path) -> list[dict[str, Any]]:
    """An LXMERT-format VQA JSON -> its rows, checked: `img_id` a non-empty string, `sent` a string, `label` (when
    present) `{answer: score}` with VQA soft scores (numbers in [0, 1]; a NaN or a string became a NaN loss or a
    crash mid-fit). A bad row is a DataError naming the file and the question."""
    data = read_json(path)
    required = ("img_id", "question_id", "sent")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of VQA questions")
    for n, q in enumerate(data):
        missing = [k for k in required if not isinstance(q, dict) or k not in q]
        if missing:
            raise DataError(f"{path}: question {n} lacks {missing}")
        if not _nonempty_str(q["img_id"]):
            raise DataError(f"{path}: question {n} field 'img_id' must be a non-empty string, got {q['img_id']!r}")
        if not isinstance(q["sent"], str):  # an empty one is the seed's [CLS] [SEP]: kept
            raise DataError(f"{path}: question {n} field 'sent' must be a string, got {q['sent']!r}")
        if "label" in q and not isinstance(q["label"], dict):
            raise DataError(f"{path}: question {q['question_id']}: 'label' is not a dict")
        why = _score_error(q.get("label") or {})
        if why:
            raise DataError(f"{path}: question {q['question_id']}: {why}")
    return data


def vqa_rows_labelled(rows: Sequence[dict[str, Any]], path: str | Path) -> bool:
    """Whether the VQA JSON rows of `path` carry answers: True when every row has a "label" (an empty one too),
    False when none has (LXMERT's official `test.json`: test-dev / test-std questions, no answers published); a
    file with both is a DataError naming it and its first question without one."""
    labelled = sum("label" in q for q in rows)
    if 0 < labelled < len(rows):
        first = next(q["question_id"] for q in rows if "label" not in q)
        raise DataError(
            f"{path}: question {first} has no 'label' while {labelled} of the file's {len(rows)} questions have "
            "one; label every question, or none (an unlabelled test split)"
        )
    return labelled > 0 or not rows


def load_width_heights(path: str | Path) -> dict[str, tuple[int, int]]:
    """The seed's `width_heigths.json` -> `{image path relative to the data root: (w, h)}`.

    The file maps `"data/mscoco/train2014/<id>.jpg"` (the seed's working-dir paths; the `data/` prefix is dropped,
    keys without it are accepted too) to `[h, w]`: the seed stores `(image.shape[0], image.shape[1])` of the decoded
    array, i.e. (height, width), under the names `(w, h)`. A real file wins over the spec's "(w,h)". Each entry must
    be two positive integers; anything else is a DataError naming the file and the key."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f'{path}: expected {{"data/<image path>": [h, w]}} (the seed\'s width_heigths.json)')
    out: dict[str, tuple[int, int]] = {}
    for key, value in data.items():
        ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
        ok = ok and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)
        if not ok:
            raise DataError(f"{path}: {key!r} -> {value!r} is not [height, width] (two positive integers)")
        rel = str(key).removeprefix("data/")
        if rel in out:
            raise DataError(f"{path}: {key!r} lists an image already listed (with or without the 'data/' prefix)")
        out[rel] = (int(value[1]), int(value[0]))
    return out
