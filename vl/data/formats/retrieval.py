"""Image-text retrieval files (ViLBERT Flickr30k / COCO retrieval layout): reading, checking.

Files (relative to a corpus root)::

    retrieval/{train,val,test}.jsonl   one image a line: {"img_path": "<image_id>.jpg", "sentences": [captions]}
    retrieval/hard_negative.pkl        {"train_image_list": [image ids], "train_hard_pool": int (N_images, K)}
                                       row i = indices into train_image_list of the K images most similar to image i

The feature id of an image is the stem of its ``img_path`` (``image_key``); region features are looked up under it in
the corpus's region LMDB (``regions.lmdb``, keys ``str(image_id)``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.formats.safe_pickle import read_pickle_file
from vl.errors import DataError

__all__ = [
    "HARD_NEGATIVE_K",
    "RETRIEVAL_DIR",
    "image_key",
    "load_retrieval_jsonl",
    "load_hard_negatives",
    "build_hard_negative_pool",
    "retrieval_paths",
]

#: neighbours per train image in the written hard-negative pool (ViLBERT's pool has 100; 20 suffices for small corpora)
HARD_NEGATIVE_K = 20
RETRIEVAL_DIR = "retrieval"
SPLITS: tuple[str, ...] = ("train", "val", "test")


def image_key(img_path: str) -> str:
    """Feature id of an image: the file stem (``"flickr30k_images/1000092795.jpg"`` -> ``"1000092795"``)."""
    return Path(str(img_path)).stem


def load_retrieval_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a retrieval JSONL -> ``[{"img_path": str, "sentences": [str, ...]}]`` (blank lines skipped).

    DataError ``"<path>:<line>: ..."`` for invalid JSON, a missing/mistyped ``img_path`` or ``sentences`` field (a
    non-empty list of non-empty strings), or an image listed twice; ``"<path>: file not found"`` / ``"... no images"``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            img_path, sentences = obj.get("img_path"), obj.get("sentences")
            if "img_path" not in obj:
                raise DataError(f"{where}: missing field 'img_path'")
            if not isinstance(img_path, str) or not image_key(img_path):
                raise DataError(
                    f"{where}: field 'img_path' must be a non-empty string like '<id>.jpg', got {img_path!r}"
                )
            if "sentences" not in obj:
                raise DataError(f"{where}: missing field 'sentences'")
            if not isinstance(sentences, list) or not sentences:
                raise DataError(f"{where}: field 'sentences' must be a non-empty list of captions, got {sentences!r}")
            bad = next((s for s in sentences if not isinstance(s, str) or not s.strip()), None)
            if bad is not None:
                raise DataError(f"{where}: field 'sentences' holds {bad!r}; every caption must be a non-empty string")
            key = image_key(img_path)
            if key in seen:
                raise DataError(f"{where}: field 'img_path' {img_path!r} repeats the image of line {seen[key]}")
            seen[key] = lineno
            records.append({"img_path": img_path, "sentences": list(sentences)})
    if not records:
        raise DataError(f"{path}: no images (expected one {{'img_path', 'sentences'}} object a line)")
    return records


def load_hard_negatives(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read ``hard_negative.pkl`` -> (train_image_list: image keys (str), train_hard_pool: int64 (N_images, K)).

    List entries may be ids (int/str) or image paths; they are normalised with ``image_key``. DataError naming the file
    and field when the pickle is unreadable, a key is missing, the pool is not 2-D integer with one row per image, or
    an index is outside [0, N_images)."""
    path = Path(path)
    obj = read_pickle_file(path)  # plain data only: a pickle that would run code is refused
    if not isinstance(obj, dict):
        raise DataError(
            f"{path}: expected a dict with 'train_image_list' and 'train_hard_pool', got {type(obj).__name__}"
        )
    for field in ("train_image_list", "train_hard_pool"):
        if field not in obj:
            raise DataError(f"{path}: missing field {field!r}")
    raw_list = obj["train_image_list"]
    if isinstance(raw_list, np.ndarray):
        raw_list = raw_list.tolist()
    if not isinstance(raw_list, list | tuple) or not raw_list:
        raise DataError(f"{path}: field 'train_image_list' must be a non-empty list of image ids")
    images = [image_key(x.decode() if isinstance(x, bytes) else str(x)) for x in raw_list]
    if len(set(images)) != len(images):
        dup = next(x for x in images if images.count(x) > 1)
        raise DataError(f"{path}: field 'train_image_list' lists image {dup!r} more than once")
    try:
        pool = np.asarray(obj["train_hard_pool"])
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: field 'train_hard_pool' is not an array ({e})") from None
    if pool.ndim != 2 or pool.shape[0] != len(images):
        raise DataError(
            f"{path}: field 'train_hard_pool' has shape {pool.shape}, expected (len(train_image_list)={len(images)}, K)"
        )
    if pool.size and not np.issubdtype(pool.dtype, np.integer):
        if not np.issubdtype(pool.dtype, np.floating) or not np.all(pool == np.round(pool)):
            raise DataError(f"{path}: field 'train_hard_pool' must hold integer indices, got dtype {pool.dtype}")
    pool = pool.astype(np.int64)
    if pool.size and (pool.min() < 0 or pool.max() >= len(images)):
        bad = int(pool.min()) if pool.min() < 0 else int(pool.max())
        raise DataError(f"{path}: field 'train_hard_pool' holds index {bad} outside [0, {len(images)})")
    return images, pool


def build_hard_negative_pool(image_ids: Sequence[str], embeddings: np.ndarray, k: int) -> np.ndarray:
    """int64 (N, k): row i = the k images most cosine-similar to image i, most similar first, never i itself (ties go
    to the lower index). ``embeddings`` (N, D); rows are scored in blocks, so memory is O(block x N)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(image_ids):
        raise ValueError(f"embeddings have shape {emb.shape}, expected ({len(image_ids)}, D)")
    n = emb.shape[0]
    if not 0 <= k <= max(n - 1, 0):
        raise ValueError(f"k={k} hard negatives need 0 <= k <= N - 1 = {n - 1}")
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    pool = np.empty((n, k), dtype=np.int64)
    block = 1024
    for start in range(0, n, block):
        stop = min(start + block, n)
        sim = unit[start:stop] @ unit.T  # (b, N)
        sim[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # never the image itself
        pool[start:stop] = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return pool


def retrieval_paths(root: str | Path) -> dict[str, Path]:
    """Paths of the retrieval files in ``root``: ``train``/``val``/``test`` (JSONL) and ``hard_negatives`` (pickle)."""
    base = Path(root) / RETRIEVAL_DIR
    return {**{s: base / f"{s}.jsonl" for s in SPLITS}, "hard_negatives": base / "hard_negative.pkl"}
