"""Ranking a retrieval gallery with a cross-encoder, in chunks: each caption's gold rank among all images, never a
captions x images score matrix. Used by the system's val/test retrieval step and by `vl.eval.retrieval`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vl.data.collate import Collator

__all__ = ["ScoreBlock", "chunked_ranks", "gallery_scorer"]

#: score_block(text_indices, image_indices) -> (len(texts), len(images)) scores, higher = better match
ScoreBlock = Callable[[list[int], list[int]], torch.Tensor]


def chunked_ranks(
    score_block: ScoreBlock, n_texts: int, n_images: int, gold: list[int], *, text_chunk: int, image_chunk: int
) -> np.ndarray:
    """Rank (1 = best) of `gold[t]` among all images for each text t, scoring (text_chunk x image_chunk) blocks.

    Rank = 1 + number of images scoring strictly higher than the gold image (ties count in the gold's favour). One
    chunk of texts is held against every image at a time: memory O(text_chunk x images), never texts x images, and
    the gold score is the one from the same pass (no extra forwards).
    """
    gold_arr = np.asarray(gold, dtype=np.int64)
    ranks = np.empty(n_texts, dtype=np.int64)
    for t0 in range(0, n_texts, text_chunk):
        texts = list(range(t0, min(t0 + text_chunk, n_texts)))
        rows = np.empty((len(texts), n_images))
        for i0 in range(0, n_images, image_chunk):
            images = list(range(i0, min(i0 + image_chunk, n_images)))
            rows[:, i0 : i0 + len(images)] = score_block(texts, images).double().cpu().numpy()
        own = np.arange(len(texts))
        g = gold_arr[t0 : t0 + len(texts)]
        better = rows > rows[own, g][:, None] + 1e-9
        better[own, g] = False  # never count the gold itself
        ranks[t0 : t0 + len(texts)] = better.sum(1) + 1
    return ranks


def gallery_scorer(
    model: Any, collator: Collator, texts: list[str], visuals: list[dict], *, batch_size: int
) -> ScoreBlock:
    """A `ScoreBlock` from a system's `pair_scorer()`: its fine-tuned retrieval head (`vil_logit`), else the ITM
    head's aligned probability softmax(logits)[:, 1] (1 = aligned in vl)."""
    head = model.pair_scorer()

    @torch.no_grad()
    def score_block(text_idx: list[int], image_idx: list[int]) -> torch.Tensor:
        pairs = [(t, i) for t in text_idx for i in image_idx]
        out = torch.empty(len(pairs))
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = collator([{"text": texts[t], "visual": visuals[i]} for t, i in chunk])
            batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out[start : start + len(chunk)] = head(model(batch).pooled).float().cpu()
        return out.view(len(text_idx), len(image_idx))

    return score_block
