"""The Multi30k layout as MM-BERT reads it (phaedonmit/VL-BERT ``data/flickr30k/``), relative to that directory::

    {split}.en, {split}.de          one caption a line, line-aligned with
    utils/{split}.txt               the image file names (``1000092795.jpg``); splits train (29000 lines), val (1014),
                                    test_2016_flickr (1000), test_2018_flickr (1071)
    {split}_frcnn.json              annotation JSONL (despite ``.json``): {"image": "<split>_image.zip@/<id>.jpg",
                                    "caption_en", "caption_de", "frcnn": "<split>_frcnn.zip@/<id>.json"}
    {split}_MLT_frcnn.json          the same + "word_en", "word_de" (MLT; from MLTD_ende_*.txt)
    utils/MLT_vocab.txt             the MLT output vocabulary (German words, one a line)
    {split}_frcnn/<id>.json         per-image Faster R-CNN JSON (``vl.data.features.FrcnnJsonRegionReader``)
    task1/raw/{split}.{en,de}.gz    the upstream multi30k/dataset raw files (gzip, one caption a line)
    WMT JSONL                       text-only parallel data {"caption_en", "caption_de"}

``zip@/`` paths: in non-zip mode the loader strips ``.zip@`` (``val_frcnn.zip@/1.json`` -> ``val_frcnn/1.json``).
Every reader error names the file and line.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.formats.jsonl import load_jsonl
from vl.errors import DataError

__all__ = [
    "ANNOTATION_KEYS",
    "MLT_KEYS",
    "SPLIT_FILES",
    "read_lines",
    "read_parallel",
    "read_annotations",
    "read_raw_gz",
    "read_mlt_vocab",
    "strip_zip",
    "frcnn_location",
    "select_regions",
]

#: vl split -> Multi30k file split
SPLIT_FILES = {"train": "train", "val": "val", "test": "test_2016_flickr", "test2018": "test_2018_flickr"}
ANNOTATION_KEYS = ("image", "caption_en", "caption_de", "frcnn")
MLT_KEYS = (*ANNOTATION_KEYS, "word_en", "word_de")
WMT_KEYS = ("caption_en", "caption_de")


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file without their newline (a trailing empty line is not a line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    return text.splitlines()


def read_parallel(root: str | Path, split: str) -> list[dict[str, str]]:
    """``[{"image", "caption_en", "caption_de"}]`` from ``{split}.en``, ``{split}.de`` and ``utils/{split}.txt``
    (``split``: the file split, e.g. ``test_2016_flickr``); DataError when their line counts differ."""
    root = Path(root)
    files = {
        "caption_en": root / f"{split}.en",
        "caption_de": root / f"{split}.de",
        "image": root / "utils" / f"{split}.txt",
    }
    lines = {key: read_lines(path) for key, path in files.items()}
    counts = {key: len(v) for key, v in lines.items()}
    if len(set(counts.values())) != 1:
        listing = ", ".join(
            f"{files[k].name if k != 'image' else 'utils/' + files[k].name}: {n}" for k, n in counts.items()
        )
        raise DataError(f"{root}: Multi30k {split} files are not line-aligned ({listing} lines)")
    for lineno, image in enumerate(lines["image"], 1):
        if not image.strip():
            raise DataError(f"{files['image']}:{lineno}: empty image name")
    return [{key: lines[key][i] for key in files} for i in range(counts["image"])]


def read_annotations(path: str | Path, keys: tuple[str, ...] = ANNOTATION_KEYS) -> list[dict[str, Any]]:
    """The annotation JSONL (``*_frcnn.json``, ``*_MLT_frcnn.json``, WMT JSONL): one object per line, each with
    ``keys``; DataError ``<path>:<line>: ...`` for a malformed line or a missing key."""
    texts = tuple(k for k in keys if k in ("caption_en", "caption_de", "word_en", "word_de"))
    return load_jsonl(path, required=tuple(keys), record="Multi30k record", texts=texts)


def read_raw_gz(path: str | Path) -> list[str]:
    """Lines of an upstream ``task1/raw/*.gz`` file (gzip, UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable gzip text file ({e})") from None


def read_mlt_vocab(path: str | Path) -> list[str]:
    """``MLT_vocab.txt``: the German words, in index order; DataError for a repeated word."""
    words = [w.strip() for w in read_lines(path)]
    seen: dict[str, int] = {}
    for lineno, word in enumerate(words, 1):
        if word in seen:
            raise DataError(f"{path}:{lineno}: word {word!r} repeats line {seen[word]}")
        seen[word] = lineno
    return words


def strip_zip(value: str) -> str:
    """MM-BERT's zip path convention in non-zip mode: ``a.zip@/b`` -> ``a/b``."""
    return value.replace(".zip@", "")


def frcnn_location(value: str) -> tuple[str, str]:
    """``"val_frcnn.zip@/1018148011.json"`` -> (directory ``"val_frcnn"``, image id ``"1018148011"``)."""
    path = strip_zip(value)
    directory, _, name = path.rpartition("/")
    return directory, name[: -len(".json")] if name.endswith(".json") else name


def select_regions(item: dict[str, Any], max_regions: int = 100) -> dict[str, Any]:
    """A region reader's dict with its regions sorted by max class confidence, descending, and at most
    ``max_regions`` kept (MM-BERT keeps 10..100 detections per image; fewer than 10 is accepted here)."""
    cls = item.get("cls_prob")
    n = int(item["features"].shape[0])
    order = (
        np.argsort(-cls.max(1), kind="stable")[:max_regions]
        if cls is not None and n
        else np.arange(min(n, max_regions))
    )
    out = dict(item)
    for key in ("features", "boxes", "boxes_norm", "cls_prob"):
        if out.get(key) is not None:
            out[key] = out[key][order]
    out["num_boxes"] = int(len(order))
    return out
