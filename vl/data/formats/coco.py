"""COCO captions JSON (``captions_{split}.json``): ``{"images": [...], "annotations": [...]}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vl.data.formats.jsonl import read_json
from vl.errors import DataError

__all__ = ["load_coco_captions", "read_coco_json"]


def read_coco_json(path: str | Path) -> dict[str, Any]:
    """A COCO-layout JSON (captions or instances) -> its object, checked to hold lists `images` and `annotations`."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing top-level list {key!r}")
    return data


def load_coco_captions(path: str | Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Read a COCO captions file -> ``(images, annotations)``.

    ``images`` maps image id -> the image record (``id``, ``file_name``, and ``width``/``height`` when present);
    ``annotations`` is the list of ``{"id", "image_id", "caption"}`` records, each referring to a listed image.
    """
    path = Path(path)
    data = read_coco_json(path)

    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        _check_object(path, f"images[{i}]", img, ("id", "file_name"))
        if not isinstance(img["id"], int):
            raise DataError(f"{path}: images[{i}] field 'id' is not an integer")
        if img["id"] in images:
            raise DataError(f"{path}: images[{i}] repeats image id {img['id']}")
        images[img["id"]] = img

    annotations: list[dict[str, Any]] = data["annotations"]
    for i, ann in enumerate(annotations):
        _check_object(path, f"annotations[{i}]", ann, ("image_id", "caption"))
        if not isinstance(ann["caption"], str) or not ann["caption"].strip():  # an empty text would train as one
            raise DataError(f"{path}: annotations[{i}] field 'caption' is empty or not a string")
        if ann["image_id"] not in images:
            raise DataError(f"{path}: annotations[{i}] refers to unknown image id {ann['image_id']!r}")
    return images, annotations


def _check_object(path: Path, where: str, obj: Any, fields: tuple[str, ...]) -> None:
    """DataError naming ``path`` and ``where`` unless ``obj`` is a JSON object holding every one of ``fields``."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {where} is not an object")
    for field in fields:
        if field not in obj:
            raise DataError(f"{path}: {where} has no {field!r}")
