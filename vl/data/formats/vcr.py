"""VCR (Visual Commonsense Reasoning) files: reading, checking, text conversion, the submission file.

Files (relative to a corpus root; the real VCR release has the same layout under ``vcr/``)::

    vcr/{train,val,test}.jsonl          one question a line: question, answer_choices [4], rationale_choices [4],
                                        answer_label, rationale_label (absent in the real test split), img_id
                                        ("train-123"), annot_id, img_fn, metadata_fn, objects (class per detection)
    vcr/vcr1images/<dir>/<name>.json    per-image metadata: names [N], boxes [N x 5] x1y1x2y2score px, width, height
    vcr/unisex_names_table.csv          names for person detections, column 1 ("name")
    vcr/regions.lmdb                    region features (ViLBERT LMDB) keyed by ``str(image_int_id(img_id))``

Token lists (``question`` and every choice) mix words (str) and detection references (a list of indices into
``objects``): ``["Does", [0], "live", "here", "?"]``. ``tokens_to_text`` turns them into plain text, naming person
detections with names drawn from the names table (``person_names``, deterministic per record).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.formats.jsonl import load_jsonl, read_json
from vl.errors import DataError

__all__ = [
    "NUM_CHOICES",
    "VCR_DIR",
    "SUBMISSION_COLUMNS",
    "image_int_id",
    "load_vcr_jsonl",
    "load_names_table",
    "load_metadata",
    "PERSON_NAMES",
    "PERSON_NAMES_PER",
    "VCR_TASKS",
    "person_names",
    "token_detections",
    "tokens_to_text",
    "record_texts",
    "write_vcr_submission",
    "vcr_paths",
]

NUM_CHOICES = 4
SPLITS: tuple[str, ...] = ("train", "val", "test")
VCR_DIR = "vcr"
#: the VCR leaderboard CSV header
SUBMISSION_COLUMNS: tuple[str, ...] = (
    ("annot_id",)
    + tuple(f"answer_{i}" for i in range(NUM_CHOICES))
    + tuple(f"rationale_conditioned_on_a{a}_{r}" for a in range(NUM_CHOICES) for r in range(NUM_CHOICES))
)
_SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
_REQUIRED = ("question", "answer_choices", "rationale_choices", "img_id", "annot_id", "objects")


# ------------------------------------------------------------------------------------------------------------ reading


def image_int_id(img_id: str) -> int:
    """``"train-n"`` -> n, ``"val-n"`` -> n + 1_000_000, ``"test-n"`` -> n + 2_000_000 (the feature key).

    Raises ValueError for anything else."""
    split, sep, num = str(img_id).partition("-")
    if not sep or split not in _SPLIT_OFFSETS or not num.isdigit() or int(num) >= 1_000_000:
        raise ValueError(f"img_id {img_id!r} is not '<train|val|test>-<n>' with 0 <= n < 1000000")
    return int(num) + _SPLIT_OFFSETS[split]


def token_detections(tokens: Sequence[Any]) -> list[int]:
    """Detection indices referenced in a token list, in order of first appearance (no repeats)."""
    seen: dict[int, None] = {}
    for tok in tokens:
        if isinstance(tok, list):
            for i in tok:
                seen.setdefault(int(i), None)
    return list(seen)


def _line_number(path: Path, record: int) -> int:
    """1-based line of the ``record``-th non-blank line (only computed when reporting an error)."""
    with path.open("r", encoding="utf-8") as f:
        k = -1
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                k += 1
                if k == record:
                    return lineno
    return record + 1


def _token_error(tokens: Any, num_objects: int) -> str | None:
    """Why ``tokens`` is not a valid token list, or None."""
    if not isinstance(tokens, list) or not tokens:
        return f"is a {type(tokens).__name__}, expected a non-empty token list"
    for t, tok in enumerate(tokens):
        if isinstance(tok, str):
            continue
        if not isinstance(tok, list) or not tok:
            return f"token {t} is {tok!r}, expected a word or a non-empty list of detection indices"
        for i in tok:
            if not isinstance(i, int) or isinstance(i, bool):
                return f"token {t} holds {i!r}, expected integer detection indices"
            if not 0 <= i < num_objects:
                return f"token {t} refers to detection {i}, outside [0, {num_objects}) (len(objects))"
    return None


def _record_error(rec: dict[str, Any]) -> str | None:
    """Why a VCR record is malformed (a message naming the field), or None."""
    objects = rec["objects"]
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        return "field 'objects' must be a list of class names"
    for name in ("img_id", "annot_id"):
        if not isinstance(rec[name], str) or not rec[name]:
            return f"field {name!r} must be a non-empty string"
    try:
        image_int_id(rec["img_id"])
    except ValueError as e:
        return f"field 'img_id': {e}"
    why = _token_error(rec["question"], len(objects))
    if why:
        return f"field 'question' {why}"
    for field in ("answer_choices", "rationale_choices"):
        choices = rec[field]
        if not isinstance(choices, list) or len(choices) != NUM_CHOICES:
            n = len(choices) if isinstance(choices, list) else type(choices).__name__
            return f"field {field!r} has {n} choices, expected {NUM_CHOICES}"
        for c, tokens in enumerate(choices):
            why = _token_error(tokens, len(objects))
            if why:
                return f"field {field!r} choice {c} {why}"
    for field in ("answer_label", "rationale_label"):
        if field in rec:
            label = rec[field]
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_CHOICES:
                return f"field {field!r} is {label!r}, expected an integer in [0, {NUM_CHOICES})"
    if "rationale_label" in rec and "answer_label" not in rec:
        return "field 'rationale_label' is given without 'answer_label'"
    if "answer_label" in rec and "rationale_label" not in rec:  # QA->R would have no label and never train
        return "field 'rationale_label' is missing while 'answer_label' is given"
    return None


def load_vcr_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a VCR JSONL -> list of records (as in the file; blank lines skipped).

    Required fields: ``question``, ``answer_choices`` / ``rationale_choices`` (4 token lists each), ``img_id``
    (``"<split>-<n>"``), ``annot_id``, ``objects`` (class names); ``answer_label`` / ``rationale_label`` (0..3) are
    optional (the real test split has none), but a record has both or neither. Every detection index must be < len(objects). Raises DataError
    ``"<path>:<line>: field '...' ..."``; annot_ids must be unique within the file."""
    path = Path(path)
    records = load_jsonl(path, required=_REQUIRED)
    seen: dict[str, int] = {}
    for k, rec in enumerate(records):
        why = _record_error(rec)
        if why is None and rec["annot_id"] in seen:
            why = f"field 'annot_id' {rec['annot_id']!r} repeats line {_line_number(path, seen[rec['annot_id']])}"
        if why is not None:
            raise DataError(f"{path}:{_line_number(path, k)}: {why}")
        seen[rec["annot_id"]] = k
    return records


def load_names_table(path: str | Path) -> list[str]:
    """``unisex_names_table.csv`` -> names (column 1, ``"name"``; header row skipped), in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("r", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    if not rows or len(rows[0]) < 2 or rows[0][1].strip() != "name":
        raise DataError(f"{path}:1: expected a header row with column 1 'name'")
    names = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < 2 or not row[1].strip():
            raise DataError(f"{path}:{lineno}: column 1 ('name') is empty")
        names.append(row[1].strip())
    if not names:
        raise DataError(f"{path}: no names")
    return names


def load_metadata(path: str | Path) -> dict[str, Any]:
    """Per-image metadata JSON -> ``{"names": [N] str, "boxes": float32 (N,5) or (N,4) x1y1x2y2[score] px,
    "width": int, "height": int}`` (other fields such as ``segms`` are dropped)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for field in ("names", "boxes", "width", "height"):
        if field not in data:
            raise DataError(f"{path}: missing field {field!r}")
    names = data["names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: field 'names' must be a list of class names")
    try:
        boxes = np.asarray(data["boxes"], dtype=np.float32)
        boxes = boxes.reshape(len(boxes), -1) if boxes.size else np.zeros((0, 5), np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{path}: field 'boxes' is not a list of equal-length number lists") from None
    if boxes.shape[1] not in (4, 5) and len(boxes):
        raise DataError(f"{path}: field 'boxes' rows have {boxes.shape[1]} numbers, expected 4 or 5")
    if len(boxes) != len(names):
        raise DataError(f"{path}: field 'boxes' has {len(boxes)} rows but 'names' has {len(names)}")
    for field in ("width", "height"):
        v = data[field]
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise DataError(f"{path}: field {field!r} is {v!r}, expected a positive number")
    return {"names": names, "boxes": boxes, "width": int(data["width"]), "height": int(data["height"])}


# ------------------------------------------------------------------------------------------------------------- text


def _stable_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "little")


#: how person detections are named (`data.person_names`): "independent" (the seed's `generate_random_name`: each
#: person draws from the whole table, so two persons of a record may share a name) or "distinct" (vl's earlier rule)
PERSON_NAMES = ("independent", "distinct")
#: which rows share a naming (`data.person_names_per`): "task" (the seed's: its Q->A and QA->R datasets each draw a
#: record's names on their own, so the two blocks of a question may name a person differently) or "record" (one
#: naming for both blocks: vl's earlier rule)
PERSON_NAMES_PER = ("task", "record")
#: the seed's two VCR task datasets (vilbert_beta `VCR_Q-A`, `VCR_QA-R`): the keys of their separate name draws
VCR_TASKS = ("Q-A", "QA-R")


def person_names(objects: Sequence[str], names: Sequence[str], key: str, draw: str = "independent") -> dict[int, str]:
    """Detection index -> name for every ``"person"`` in ``objects``, random names from ``names`` seeded by ``key``
    (the annot_id), so a record always reads the same. ``draw`` (``PERSON_NAMES``): "independent" (default, vilbert_beta's
    `generate_random_name`: one `random.choice(names)` per person, with replacement), "distinct" (no two persons of a
    record share a name unless there are more persons than names)."""
    if draw not in PERSON_NAMES:
        raise ValueError(f"person names: '{draw}' is not one of {PERSON_NAMES}")
    persons = [i for i, o in enumerate(objects) if o == "person"]
    if not persons:
        return {}
    if not names:
        raise ValueError("the names table is empty")
    rng = np.random.default_rng(_stable_seed(str(key)))
    replace = draw == "independent" or len(persons) > len(names)
    picks = rng.choice(len(names), size=len(persons), replace=replace)
    return {i: names[int(p)] for i, p in zip(persons, picks)}


def tokens_to_text(tokens: Sequence[Any], objects: Sequence[str], person_names: Mapping[int, str]) -> str:
    """Token list -> text (tokens joined by spaces). A detection list ``[i, j]`` becomes ``"<i> <j>"``, its names
    one after the other as ViLBERT's `replace_det_with_name` tokenises them (no "and"), where a detection is its name
    from ``person_names`` when given (persons), else its class name ``objects[i]``.
    Use ``token_detections(tokens)`` for the indices referenced."""
    words = []
    for tok in tokens:
        if isinstance(tok, list):
            words.append(" ".join(person_names.get(int(i), objects[int(i)]) for i in tok))
        else:
            words.append(str(tok))
    return " ".join(words)


def record_texts(
    record: Mapping[str, Any], names: Sequence[str], draw: str = "independent", *, task: str | None = None
) -> dict[str, Any]:
    """A VCR record as text: ``{"question": str, "answers": [4] str, "rationales": [4] str, "detections": [int]}``
    (detections referenced anywhere, in order of appearance), persons named by ``person_names(objects, names, key,
    draw)``, consistently across question, answers and rationales. ``key``: the annot_id, or ``"<annot_id>/<task>"``
    for one of the seed's task datasets (``VCR_TASKS``), each of which draws its own names."""
    objects = record["objects"]
    if task is not None and task not in VCR_TASKS:
        raise ValueError(f"VCR task '{task}' is not one of {VCR_TASKS}")
    key = str(record["annot_id"]) if task is None else f"{record['annot_id']}/{task}"
    mapping = person_names(objects, names, key, draw)
    detections: dict[int, None] = {}
    for tokens in [record["question"], *record["answer_choices"], *record["rationale_choices"]]:
        detections.update(dict.fromkeys(token_detections(tokens)))
    return {
        "question": tokens_to_text(record["question"], objects, mapping),
        "answers": [tokens_to_text(t, objects, mapping) for t in record["answer_choices"]],
        "rationales": [tokens_to_text(t, objects, mapping) for t in record["rationale_choices"]],
        "detections": list(detections),
    }


# -------------------------------------------------------------------------------------------------------- submission


def _probs(value: Any, what: str, annot_id: str) -> list[float]:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (NUM_CHOICES,):
        raise ValueError(f"prediction {annot_id!r}: {what} has shape {arr.shape}, expected ({NUM_CHOICES},)")
    return [float(x) for x in arr]


def _annot_sort_key(annot_id: str) -> tuple[str, int, str]:
    prefix, _, num = annot_id.rpartition("-")
    return (prefix, int(num), annot_id) if num.isdigit() else (annot_id, -1, annot_id)


def write_vcr_submission(predictions: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """VCR leaderboard CSV: header ``SUBMISSION_COLUMNS`` (annot_id, answer_0..3, rationale_conditioned_on_a0_0 ..
    rationale_conditioned_on_a3_3), one row per prediction sorted by annot_id (numerically within a split).

    Each prediction: ``{"annot_id": str, "answer_probs": [4], "rationale_probs": [4][4] (row a = rationales given
    answer a) or [4]}``. A single [4] list (rationale probs given the gold answer, the 2-block layout) is written
    under every ``rationale_conditioned_on_a{i}`` column group, since the other conditionings were not scored."""
    rows = []
    for p in predictions:
        annot_id = str(p["annot_id"])
        answers = _probs(p["answer_probs"], "answer_probs", annot_id)
        rat = np.asarray(p["rationale_probs"], dtype=np.float64)
        if rat.shape == (NUM_CHOICES,):
            rat = np.tile(rat, (NUM_CHOICES, 1))
        if rat.shape != (NUM_CHOICES, NUM_CHOICES):
            raise ValueError(
                f"prediction {annot_id!r}: rationale_probs has shape {rat.shape}, expected ({NUM_CHOICES},) or "
                f"({NUM_CHOICES}, {NUM_CHOICES})"
            )
        rows.append([annot_id] + answers + [float(x) for x in rat.reshape(-1)])
    rows.sort(key=lambda r: _annot_sort_key(r[0]))
    path = Path(path)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(SUBMISSION_COLUMNS)
        writer.writerows(rows)
    return path


def vcr_paths(root: str | Path) -> dict[str, Path]:
    """Paths of the VCR files in ``root``: ``train``/``val``/``test`` (JSONL), ``images`` (metadata dir),
    ``names`` (CSV) and ``regions`` (LMDB dir)."""
    base = Path(root) / VCR_DIR
    return {
        **{s: base / f"{s}.jsonl" for s in SPLITS},
        "images": base / "vcr1images",
        "names": base / "unisex_names_table.csv",
        "regions": base / "regions.lmdb",
    }
