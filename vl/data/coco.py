"""COCO captions JSON (``captions_{split}.json``): ``{"images": [...], "annotations": [...]}``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vl.errors import DataError

__all__ = ["load_coco_captions"]


def load_coco_captions(path: str | Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Read a COCO captions file -> ``(images, annotations)``.

    ``images`` maps image id -> the image record (``id``, ``file_name``, and ``width``/``height`` when present);
    ``annotations`` is the list of ``{"id", "image_id", "caption"}`` records, each referring to a listed image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing top-level list {key!r}")

    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise DataError(f"{path}: images[{i}] is not an object")
        for field in ("id", "file_name"):
            if field not in img:
                raise DataError(f"{path}: images[{i}] has no {field!r}")
        if not isinstance(img["id"], int):
            raise DataError(f"{path}: images[{i}] field 'id' is not an integer")
        if img["id"] in images:
            raise DataError(f"{path}: images[{i}] repeats image id {img['id']}")
        images[img["id"]] = img

    annotations: list[dict[str, Any]] = data["annotations"]
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{i}] is not an object")
        for field in ("image_id", "caption"):
            if field not in ann:
                raise DataError(f"{path}: annotations[{i}] has no {field!r}")
        if not isinstance(ann["caption"], str):
            raise DataError(f"{path}: annotations[{i}] field 'caption' is not a string")
        if ann["image_id"] not in images:
            raise DataError(f"{path}: annotations[{i}] refers to unknown image id {ann['image_id']!r}")
    return images, annotations
