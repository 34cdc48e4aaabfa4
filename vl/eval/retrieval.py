"""Image-text retrieval with a cross-encoder: rank every image for each caption by the ITM head's aligned
probability, in chunks, keeping only each caption's gold rank (memory O(text chunk x images + captions), never
O(captions x images))."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from vl.data.captions import CaptionsDataModule, load_captions
from vl.data.collate import Collator
from vl.errors import ConfigError
from vl.metrics import RetrievalRecall
from vl.models.ranking import ScoreBlock, chunked_ranks, gallery_scorer

log = logging.getLogger(__name__)


def shortlist_ranks(
    score_block: ScoreBlock, cheap: np.ndarray, gold: list[int], *, k: int, text_chunk: int = 16
) -> np.ndarray:
    """Shortlist-then-rerank: per text, the top-`k` images by a cheap similarity (T, I) are re-scored by the
    cross-encoder; rank = 1 + shortlisted images scoring above the gold one, or k + 1 when the gold image is not
    shortlisted (a miss for every R@j with j <= k). With k = number of images this equals `chunked_ranks` exactly."""
    n_texts, n_images = cheap.shape
    k = min(k, n_images)
    shortlist = np.argsort(-cheap, axis=1, kind="stable")[:, :k]  # (T, k)
    ranks = np.full(n_texts, k + 1, dtype=np.int64)
    for t0 in range(0, n_texts, text_chunk):
        for t in range(t0, min(t0 + text_chunk, n_texts)):
            candidates = shortlist[t].tolist()
            if gold[t] not in candidates:
                continue
            scores = score_block([t], candidates)[0].double().cpu().numpy()
            gold_score = scores[candidates.index(gold[t])]
            ranks[t] = 1 + int((scores > gold_score + 1e-9).sum())
    return ranks


@torch.no_grad()
def pooled_similarity(
    model: Any, collator: Collator, texts: list[str], visuals: list[dict], batch_size: int
) -> np.ndarray:
    """The cheap dual-encoder similarity: cosine between each text encoded alone (all regions masked) and each image
    encoded alone (an empty caption). Two passes of O(T + I) forwards instead of O(T x I)."""

    def encode(examples: list[dict], drop_regions: bool) -> torch.Tensor:
        out = []
        for start in range(0, len(examples), batch_size):
            batch = collator(examples[start : start + batch_size])
            if drop_regions:
                batch["visual_mask"] = torch.zeros_like(batch["visual_mask"])
            out.append(torch.nn.functional.normalize(model(batch).pooled, dim=-1))
        return torch.cat(out)

    text_emb = encode([{"text": t, "visual": visuals[0]} for t in texts], drop_regions=True)
    image_emb = encode([{"text": "", "visual": v} for v in visuals], drop_regions=False)
    return (text_emb @ image_emb.T).numpy()


def zero_shot_retrieval(
    *,
    cfg: DictConfig,
    run_cfg: DictConfig,
    output_dir: Path,
    max_images: int | None = None,
    captions_per_image: int = 1,
    batch_size: int = 256,
    text_chunk: int = 16,
    image_chunk: int = 128,
    shortlist_k: int | None = None,
) -> dict[str, float]:
    """`evaluate.py task=zero_shot_retrieval`: image retrieval (caption -> image) on `split` of the run's data: the
    captions of an image-caption corpus (data=captions), or the gallery of a retrieval corpus (data=retrieval).

    Options (`task.<name>=...`): `max_images`, `captions_per_image` (captions corpus), `batch_size` (pairs per
    forward), `text_chunk` / `image_chunk` (exhaustive scoring blocks), `shortlist_k` (shortlist the top k images per
    caption by the dual-encoder cosine, then re-rank them with the cross-encoder; k = all images equals the
    exhaustive ranking)."""
    from vl.build import build_datamodule, build_model

    opts = {
        "max_images": max_images,
        "captions_per_image": captions_per_image,
        "batch_size": batch_size,
        "text_chunk": text_chunk,
        "image_chunk": image_chunk,
        "shortlist_k": shortlist_k,
    }
    split = str(cfg.get("split", "test"))
    dm = build_datamodule(run_cfg)
    gallery = dm.gallery(split)
    if gallery is not None:  # data=retrieval: its own query/gallery layout
        texts, gold, visuals = gallery["texts"], list(gallery["gold"]), gallery["visuals"]  # lazy: read per image
    elif isinstance(dm, CaptionsDataModule):
        texts, gold, visuals = _caption_queries(dm, split, opts)
    else:
        raise ConfigError(
            "task=zero_shot_retrieval: the run's data must be an image-caption corpus (data=captions) or a retrieval "
            "corpus (data=retrieval)"
        )
    n_images = len(visuals)
    model = build_model(run_cfg, dm)
    state = torch.load(str(cfg.ckpt_path), map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.eval()
    # fixed shapes: a pair's score must not depend on which other pairs share its batch (exact rank comparisons)
    collator = dm.scoring_collator()
    batch_size = int(opts.get("batch_size", 256))
    score = gallery_scorer(model, collator, texts, visuals, batch_size=batch_size)
    k = opts.get("shortlist_k")
    text_chunk = int(opts.get("text_chunk", 16))
    log.info(
        "zero-shot retrieval: %d captions x %d images%s",
        len(texts),
        n_images,
        f", shortlist top {k} by dual-encoder cosine then cross-encoder re-rank" if k else " (exhaustive)",
    )
    if k:
        cheap = pooled_similarity(model, collator, texts, visuals, batch_size)
        ranks = shortlist_ranks(score, cheap, gold, k=int(k), text_chunk=text_chunk)
    else:
        ranks = chunked_ranks(
            score,
            len(texts),
            n_images,
            gold,
            text_chunk=text_chunk,
            image_chunk=int(opts.get("image_chunk", 128)),
        )
    metric = RetrievalRecall()
    metric.update(torch.from_numpy(ranks))
    metrics = {f"{split}/{key}": float(v) for key, v in metric.compute().items()}
    metrics[f"{split}/recall@1_chance"] = 1.0 / n_images
    metrics[f"{split}/num_images"] = float(n_images)
    metrics[f"{split}/num_captions"] = float(len(texts))
    assert math.isfinite(metrics[f"{split}/mean_rank"])
    return metrics


def _caption_queries(dm: Any, split: str, opts: dict[str, Any]) -> tuple[list[str], list[int], list[dict]]:
    """(caption texts, gold image position, image region dicts) of a captions corpus split: the first `max_images`
    images (sorted ids), `captions_per_image` captions each."""
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
    return [q["caption"] for q in queries], [position[q["image_id"]] for q in queries], visuals
