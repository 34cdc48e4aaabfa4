"""VCR (Visual Commonsense Reasoning) files: reading, checking, text conversion, the embedded-corpus writer.

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
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.jsonl import load_jsonl, read_json, write_atomically, write_jsonl
from vl.data.scenes import COLOURS, POSITIONS, SPLITS, Scene, SceneSettings, region_features
from vl.errors import DataError

__all__ = [
    "NUM_CHOICES",
    "VCR_DIR",
    "SUBMISSION_COLUMNS",
    "image_int_id",
    "load_vcr_jsonl",
    "load_names_table",
    "load_metadata",
    "person_names",
    "token_detections",
    "tokens_to_text",
    "record_texts",
    "write_vcr_submission",
    "vcr_paths",
    "write_vcr_corpus",
]

NUM_CHOICES = 4
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
    return None


def load_vcr_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a VCR JSONL -> list of records (as in the file; blank lines skipped).

    Required fields: ``question``, ``answer_choices`` / ``rationale_choices`` (4 token lists each), ``img_id``
    (``"<split>-<n>"``), ``annot_id``, ``objects`` (class names); ``answer_label`` / ``rationale_label`` (0..3) are
    optional (the real test split has none). Every detection index must be < len(objects). Raises DataError
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


def person_names(objects: Sequence[str], names: Sequence[str], key: str) -> dict[int, str]:
    """Detection index -> name for every ``"person"`` in ``objects``: distinct random names from ``names`` (repeats
    only when there are more persons than names), seeded by ``key`` (the annot_id), so a record always reads the same."""
    persons = [i for i, o in enumerate(objects) if o == "person"]
    if not persons:
        return {}
    if not names:
        raise ValueError("the names table is empty")
    rng = np.random.default_rng(_stable_seed(str(key)))
    picks = rng.choice(len(names), size=len(persons), replace=len(persons) > len(names))
    return {i: names[int(p)] for i, p in zip(persons, picks)}


def tokens_to_text(tokens: Sequence[Any], objects: Sequence[str], person_names: Mapping[int, str]) -> str:
    """Token list -> text (tokens joined by spaces). A detection list ``[i, j]`` becomes ``"<i> and <j>"`` where a
    detection is its name from ``person_names`` when given (persons), else its class name ``objects[i]``.
    Use ``token_detections(tokens)`` for the indices referenced."""
    words = []
    for tok in tokens:
        if isinstance(tok, list):
            words.append(" and ".join(person_names.get(int(i), objects[int(i)]) for i in tok))
        else:
            words.append(str(tok))
    return " ".join(words)


def record_texts(record: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A VCR record as text: ``{"question": str, "answers": [4] str, "rationales": [4] str, "detections": [int]}``
    (detections referenced anywhere, in order of appearance), persons named by ``person_names(objects, names,
    annot_id)``, consistently across question, answers and rationales."""
    objects = record["objects"]
    mapping = person_names(objects, names, record["annot_id"])
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


# ------------------------------------------------------------------------------------------- embedded corpus writer


def _text(text: str) -> Callable[[Path], None]:
    """A `write_atomically` writer of `text` (UTF-8, \\n line ends)."""
    return lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n")


#: names of the embedded corpus's names table (all in the real VCR table)
_SCENE_NAMES = (
    "Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody", "Kendall",
    "Skyler", "Frankie", "Quinn", "Harley", "Reese", "Emerson", "Rowan", "Dakota", "Sage", "Finley",
)  # fmt: skip
#: detection class of each scene shape (stars are "person" so that name replacement is exercised)
_SCENE_CLASSES = {"circle": "circle", "square": "square", "triangle": "triangle", "star": "person"}
_IMAGE_DIR = "scenes"
_QUESTIONS_PER_SCENE = 2


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


def _where(position: str) -> list[str]:
    return ["in", "the", "middle"] if position == "middle" else ["on", "the", position]


def _scene_questions(scene: Scene, settings: SceneSettings, objects: list[str]) -> list[dict[str, Any]]:
    """Up to 2 colour questions about shapes whose shape is unique in the scene (so the name / class word picks out one
    region). Q->A: "What color is [k] ?" -> "[k] is <colour> ." (3 wrong colours, preferring those of the other shapes).
    QA->R: "[k] looks <colour> and is <where> ." with (gold colour, true place) correct and (gold colour, wrong place
    w), (wrong colour, true place), (other wrong colour, w) as distractors: given the gold answer, text alone narrows
    the rationale to 2 of 4 and the region's position decides. Label positions are uniform, seeded by the scene."""
    rng = np.random.default_rng([settings.seed, 11, scene.image_id])
    shape_counts = Counter(p.shape for p in scene.shapes)
    unique = [k for k, p in enumerate(scene.shapes) if shape_counts[p.shape] == 1]
    picked = [unique[int(i)] for i in rng.permutation(len(unique))[:_QUESTIONS_PER_SCENE]]
    out = []
    for k in picked:
        shape = scene.shapes[k]
        in_scene = [c for c in dict.fromkeys(p.colour for p in scene.shapes) if c != shape.colour]
        others = [c for c in COLOURS if c != shape.colour and c not in in_scene]
        rng.shuffle(in_scene)
        rng.shuffle(others)
        wrong = (in_scene + others)[: NUM_CHOICES - 1]
        answer_label = int(rng.integers(NUM_CHOICES))
        colours = list(wrong)
        colours.insert(answer_label, shape.colour)
        wrong_places = [p for p in POSITIONS if p != shape.position]
        rng.shuffle(wrong_places)
        # every colour-matching rationale's place also appears twice in the set: no cross-choice text cue
        rationale_facts = [(shape.colour, wrong_places[0]), (wrong[0], shape.position), (wrong[1], wrong_places[0])]
        order = rng.permutation(len(rationale_facts))
        rationale_facts = [rationale_facts[int(i)] for i in order]
        rationale_label = int(rng.integers(NUM_CHOICES))
        rationale_facts.insert(rationale_label, (shape.colour, shape.position))
        out.append(
            {
                "question": ["What", "color", "is", [k], "?"],
                "answer_choices": [[[k], "is", c, "."] for c in colours],
                "rationale_choices": [[[k], "looks", c, "and", "is", *_where(pos), "."] for c, pos in rationale_facts],
                "answer_label": answer_label,
                "rationale_label": rationale_label,
                "objects": objects,
            }
        )
    return out


def write_vcr_corpus(root: str | Path, scenes: Sequence[Scene], settings: SceneSettings) -> list[Path]:
    """Write the scenes as a VCR corpus under ``root/vcr`` (see the module docstring for the layout):

    - ``{train,val,test}.jsonl``: the questions of each split's scenes (``_scene_questions``); img_id
      ``"<split>-<image_id>"``, annot_id ``"<split>-<k>"`` (k-th question of the split), objects = the scene's shapes
      left to right as classes (star -> "person"). Test records keep their labels so the corpus can be scored.
    - ``vcr1images/scenes/<image_id>.json`` metadata (names, boxes [x1,y1,x2,y2,1.0], width, height) per scene.
    - ``unisex_names_table.csv`` (20 names, the real table's columns).
    - ``regions.lmdb``: ``region_features`` of every scene (with cls_prob) keyed by ``image_int_id(img_id)``.

    Each file is replaced atomically; the JSONL files are written last. Returns every written path (the LMDB as
    ``regions.lmdb/data.mdb``)."""
    from vl.data.features import write_region_lmdb

    paths = vcr_paths(root)
    image_dir = paths["images"] / _IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    header = '"","name","total","male_share","female_share","gap"\n'
    lines = [f'"{i}","{n}",{1000.0 - i:.1f},0.5,0.5,0\n' for i, n in enumerate(_SCENE_NAMES, start=1)]
    write_atomically(paths["names"], _text(header + "".join(lines)))
    written.append(paths["names"])

    regions = []
    split_lines: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for sc in scenes:
        img_id = f"{sc.split}-{sc.image_id}"
        objects = [_SCENE_CLASSES[p.shape] for p in sc.shapes]
        meta_path = image_dir / f"{sc.image_id}.json"
        meta = {
            "boxes": [[float(v) for v in p.box] + [1.0] for p in sc.shapes],
            "names": objects,
            "width": sc.width,
            "height": sc.height,
        }
        write_atomically(meta_path, _text(json.dumps(meta)))
        written.append(meta_path)
        rec = region_features(sc, settings)
        rec.pop("labels")
        rec["image_id"] = image_int_id(img_id)
        regions.append(rec)
        for q in _scene_questions(sc, settings, objects):
            k = len(split_lines[sc.split])
            split_lines[sc.split].append(
                {
                    **q,
                    "img_id": img_id,
                    "annot_id": f"{sc.split}-{k}",
                    "img_fn": f"{_IMAGE_DIR}/{sc.image_id}.jpg",
                    "metadata_fn": f"{_IMAGE_DIR}/{sc.image_id}.json",
                    "question_number": k,
                }
            )
    write_region_lmdb(paths["regions"], regions)
    written.append(paths["regions"] / "data.mdb")
    for s in SPLITS:
        write_atomically(paths[s], lambda tmp, lines=split_lines[s]: write_jsonl(tmp, lines))
        written.append(paths[s])
    return written
