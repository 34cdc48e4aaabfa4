"""Image-text retrieval with a cross-encoder: rank every image for each caption by the ITM head's aligned
probability, in chunks, keeping only each caption's gold rank (memory O(captions), not O(captions x images))."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from vl.data.collate import Collator
from vl.errors import ConfigError
from vl.metrics import RetrievalRecall

log = logging.getLogger(__name__)

#: score_block(text_indices, image_indices) -> (len(texts), len(images)) scores, higher = better match
ScoreBlock = Callable[[list[int], list[int]], torch.Tensor]


def chunked_ranks(
    score_block: ScoreBlock, n_texts: int, n_images: int, gold: list[int], *, text_chunk: int, image_chunk: int
) -> np.ndarray:
    """Rank (1 = best) of `gold[t]` among all images for each text t, scoring (text_chunk x image_chunk) blocks.

    Rank = 1 + number of images scoring strictly higher than the gold image (ties count in the gold's favour).
    """
    gold_scores = np.empty(n_texts)
    for start in range(0, n_texts, text_chunk):
        idx = list(range(start, min(start + text_chunk, n_texts)))
        for t in idx:  # one pair per text: cheap next to the full pass
            gold_scores[t] = float(score_block([t], [gold[t]])[0, 0])
    better = np.zeros(n_texts, dtype=np.int64)
    for t0 in range(0, n_texts, text_chunk):
        texts = list(range(t0, min(t0 + text_chunk, n_texts)))
        for i0 in range(0, n_images, image_chunk):
            images = list(range(i0, min(i0 + image_chunk, n_images)))
            scores = score_block(texts, images).double().cpu().numpy()  # (t, i)
            better[t0 : t0 + len(texts)] += (scores > gold_scores[texts, None] + 1e-9).sum(1)
    return better + 1


def itm_scorer(model: Any, collator: Collator, texts: list[str], visuals: list[dict], *, batch_size: int) -> ScoreBlock:
    """A `ScoreBlock` from a system with an `itm` head: softmax(ITM logits)[:, 1] (1 = aligned in vl)."""
    if "itm" not in model.objectives:
        raise ConfigError("task=zero_shot_retrieval: the checkpoint's model has no 'itm' head (train with itm)")

    @torch.no_grad()
    def score_block(text_idx: list[int], image_idx: list[int]) -> torch.Tensor:
        pairs = [(t, i) for t in text_idx for i in image_idx]
        out = torch.empty(len(pairs))
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = collator([{"text": texts[t], "visual": visuals[i]} for t, i in chunk])
            enc = model(batch)
            out[start : start + len(chunk)] = model.objectives["itm"].classifier(enc.pooled).softmax(-1)[:, 1]
        return out.view(len(text_idx), len(image_idx))

    return score_block


def zero_shot_retrieval(*, cfg: DictConfig, run_cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """`evaluate.py task=zero_shot_retrieval`: image retrieval (caption -> image) on the captions of `split`."""
    from vl.pipeline import build_datamodule, build_model

    opts = dict(cfg.get("task_cfg") or {})
    split = str(cfg.get("split", "test"))
    dm = build_datamodule(run_cfg)
    if not hasattr(dm, "regions") or not hasattr(dm, "captions_file"):
        raise ConfigError("task=zero_shot_retrieval: the run's data must be an image-caption corpus (data=captions)")
    model = build_model(run_cfg, dm)
    state = torch.load(str(cfg.ckpt_path), map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.eval()

    from vl.data.captions import load_captions

    annotations = load_captions(dm.path(dm.captions_file, split))
    image_ids = sorted({a["image_id"] for a in annotations})[: opts.get("max_images") or None]
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    per_image = int(opts.get("captions_per_image", 1))
    seen: dict[int, int] = {}
    queries = []
    for a in annotations:
        if a["image_id"] in position and seen.get(a["image_id"], 0) < per_image:
            seen[a["image_id"]] = seen.get(a["image_id"], 0) + 1
            queries.append(a)
    visuals = [dm.regions[str(i)] for i in image_ids]
    collator = Collator(dm.tokenizer, max_text_len=dm.max_text_len, max_regions=dm.max_regions)
    score = itm_scorer(
        model, collator, [q["caption"] for q in queries], visuals, batch_size=int(opts.get("batch_size", 256))
    )
    log.info("zero-shot retrieval: %d captions x %d images", len(queries), len(image_ids))
    ranks = chunked_ranks(
        score,
        len(queries),
        len(image_ids),
        [position[q["image_id"]] for q in queries],
        text_chunk=int(opts.get("text_chunk", 16)),
        image_chunk=int(opts.get("image_chunk", 128)),
    )
    metric = RetrievalRecall()
    metric.update(torch.from_numpy(ranks))
    metrics = {f"{split}/{k}": float(v) for k, v in metric.compute().items()}
    metrics[f"{split}/recall@1_chance"] = 1.0 / len(image_ids)
    metrics[f"{split}/num_images"] = float(len(image_ids))
    metrics[f"{split}/num_captions"] = float(len(queries))
    assert math.isfinite(metrics[f"{split}/mean_rank"])
    return metrics
