"""The embedded scene corpus as an image-text retrieval corpus (the layout of ``vl.data.formats.retrieval``)."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vl.data.formats.jsonl import write_atomically, write_jsonl
from vl.data.formats.retrieval import HARD_NEGATIVE_K, build_hard_negative_pool, retrieval_paths
from vl.data.scenes.generator import SPLITS, Scene, SceneSettings, clip_embedding

__all__ = ["write_retrieval_corpus"]


def write_retrieval_corpus(root: str | Path, scenes: Sequence[Scene], settings: SceneSettings) -> list[Path]:
    """Write ``retrieval/{train,val,test}.jsonl`` (img_path ``f"{image_id}.jpg"``, sentences = the scene's captions,
    in scene order) and ``retrieval/hard_negative.pkl`` for train (pool by cosine similarity of ``clip_embedding``,
    K = min(20, N_train - 1)); hard_negative.pkl last, each file atomically. Features are the corpus's existing
    ``regions.lmdb`` (keys ``str(image_id)``); none are written here. Returns the written paths."""
    paths = retrieval_paths(root)
    paths["hard_negatives"].parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for s in SPLITS:
        lines = [{"img_path": f"{sc.image_id}.jpg", "sentences": list(sc.captions)} for sc in scenes if sc.split == s]
        write_atomically(paths[s], lambda tmp, lines=lines: write_jsonl(tmp, lines))
        written.append(paths[s])
    train = [sc for sc in scenes if sc.split == "train"]
    ids = [str(sc.image_id) for sc in train]
    dim = settings.clip_dim
    emb = np.stack([clip_embedding(sc, settings) for sc in train]) if train else np.zeros((0, dim), np.float32)
    pool = build_hard_negative_pool(ids, emb, min(HARD_NEGATIVE_K, max(len(ids) - 1, 0)))

    def dump(tmp: Path) -> None:
        with tmp.open("wb") as f:
            pickle.dump({"train_image_list": ids, "train_hard_pool": pool}, f, protocol=4)

    write_atomically(paths["hard_negatives"], dump)
    return written + [paths["hard_negatives"]]
