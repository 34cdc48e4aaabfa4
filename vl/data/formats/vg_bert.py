"""VG-BERT's two data files (spec: vg_bert.md), read and checked record by record before any compute.

- COCO JSON: `{"image_base_path": str, "caption_base_path": str, "data": [{"image": relpath, "caption": relpath to a
  .txt with (5) caption lines}]}` (`load_coco_json`).
- VG JSON: `{"image_base_path": str, "data": [{"image": relpath, "object_description": [str], "object_class": [int
  0..55], "relation": n x n int matrix (0 = none, 1..114)}]}` (`load_vg_json`).

Paths: `image_base_path` / `caption_base_path` are joined with each record's path as the seed's `os.path.join`; a
relative base path is taken relative to the JSON file's directory (the seed's are absolute; relative ones let a corpus
directory move). Every error is a `DataError` naming the file and the record: a missing caption file, an empty one,
a class id out of range, a relation matrix whose size differs from the object count or with a relation id out of
range. Image files are checked when decoded (`vl.data.images.load_rgb` names the file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vl.data.formats.jsonl import read_json
from vl.errors import DataError

__all__ = ["load_coco_json", "load_vg_json", "read_captions", "resolve_base"]


def resolve_base(json_path: Path, base: Any, key: str) -> Path:
    if not isinstance(base, str):
        raise DataError(f"{json_path}: '{key}' must be a path string, got {type(base).__name__}")
    path = Path(base).expanduser()
    return path if path.is_absolute() else (json_path.parent / path)


def _records(path: Path, doc: Any, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: expected an object with a 'data' list (VG-BERT JSON)")
    for key in keys:
        if key not in doc:
            raise DataError(f"{path}: missing '{key}'")
    return doc["data"]


def read_captions(path: Path, where: str) -> list[str]:
    """The non-empty lines of a caption file; `where` names the record for the error."""
    if not path.is_file():
        raise DataError(f"{where}: caption file {path} not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{where}: caption file {path} has no caption line")
    return lines


def load_coco_json(path: str | Path, *, check_captions: bool = True) -> list[dict[str, Any]]:
    """-> [{"image": absolute image path, "captions": [lines], "record": i}]; every caption file is read now
    (`check_captions`), so a missing one fails before training."""
    path = Path(path)
    doc = read_json(path)
    data = _records(path, doc, ("image_base_path", "caption_base_path"))
    image_base = resolve_base(path, doc["image_base_path"], "image_base_path")
    caption_base = resolve_base(path, doc["caption_base_path"], "caption_base_path")
    out = []
    for i, rec in enumerate(data):
        where = f"{path}: data[{i}]"
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("image"), str)
            or not isinstance(rec.get("caption"), str)
        ):
            raise DataError(f"{where}: expected {{'image': str, 'caption': str}}")
        captions = read_captions(caption_base / rec["caption"], where) if check_captions else []
        out.append({"image": str(image_base / rec["image"]), "captions": captions, "record": i})
    if not out:
        raise DataError(f"{path}: 'data' is empty")
    return out


def load_vg_json(path: str | Path, *, num_object_classes: int = 56, num_relations: int = 115) -> list[dict[str, Any]]:
    """-> [{"image": absolute image path, "objects": [str], "classes": [int], "relation": [[int]], "record": i}];
    checks class ids in 0..num_object_classes-1, relation ids in 0..num_relations-1, and an n x n matrix for n
    objects."""
    path = Path(path)
    doc = read_json(path)
    data = _records(path, doc, ("image_base_path",))
    image_base = resolve_base(path, doc["image_base_path"], "image_base_path")
    out = []
    for i, rec in enumerate(data):
        where = f"{path}: data[{i}]"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object")
        for key in ("image", "object_description", "object_class", "relation"):
            if key not in rec:
                raise DataError(f"{where}: missing '{key}'")
        objects, classes, relation = rec["object_description"], rec["object_class"], rec["relation"]
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            raise DataError(f"{where}: 'object_description' must be a list of strings")
        n = len(objects)
        if not isinstance(classes, list) or len(classes) != n:
            raise DataError(
                f"{where}: 'object_class' has {len(classes) if isinstance(classes, list) else '?'} "
                f"entries for {n} objects"
            )
        for j, c in enumerate(classes):
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < num_object_classes:
                raise DataError(f"{where}: object_class[{j}] = {c!r} is out of range 0..{num_object_classes - 1}")
        if (
            not isinstance(relation, list)
            or len(relation) != n
            or any(not isinstance(row, list) or len(row) != n for row in relation)
        ):
            rows = len(relation) if isinstance(relation, list) else "?"
            raise DataError(f"{where}: 'relation' must be a {n} x {n} matrix for {n} objects (it has {rows} rows)")
        for a, row in enumerate(relation):
            for b, r in enumerate(row):
                if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < num_relations:
                    raise DataError(f"{where}: relation[{a}][{b}] = {r!r} is out of range 0..{num_relations - 1}")
        out.append(
            {
                "image": str(image_base / rec["image"]),
                "objects": objects,
                "classes": classes,
                "relation": relation,
                "record": i,
            }
        )
    if not out:
        raise DataError(f"{path}: 'data' is empty")
    return out
