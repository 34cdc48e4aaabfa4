"""Image-text retrieval with a cross-encoder: rank every image for each caption by the ITM head's aligned
probability, in chunks, keeping only each caption's gold rank (memory O(text chunk x images + captions), never
O(captions x images))."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from vl.data.captions import CaptionsDataModule, load_captions
from vl.data.collate import Collator, text_fields
from vl.errors import ConfigError
from vl.metrics import RetrievalRecall
from vl.models.ranking import ScoreBlock, _as_numpy, chunked_ranks, gallery_scorer
from vl.progress import progress

log = logging.getLogger(__name__)

#: cheap(text_indices) -> (len(texts), images) similarity rows, higher = more similar
CheapRows = Callable[[list[int]], np.ndarray]


def shortlist_ranks(
    score_block: ScoreBlock,
    cheap: np.ndarray | CheapRows,
    gold: list[int],
    *,
    k: int,
    text_chunk: int = 16,
    n_images: int | None = None,
) -> np.ndarray:
    """Shortlist-then-rerank: per text, the top-`k` images by a cheap similarity are re-scored by the cross-encoder;
    rank = shortlisted images scoring at least the gold's score - 1e-9, the gold included (ties count against it, as
    in `chunked_ranks`), or k + 1
    when the gold image is not shortlisted (a miss for every R@j with j <= k). With k = number of images this equals
    `chunked_ranks` exactly.

    `cheap` is a (texts, images) array, or a function giving the rows of a chunk of texts (`pooled_similarity`; then
    `n_images` is required): the similarity is taken `text_chunk` texts at a time and only each text's top k kept, so
    memory is O(text_chunk x images + texts), never texts x images. Ties at the k-th similarity go to the lower image
    index (the top k of a stable descending sort). A `score_block` with a `pairs(text_indices, image_indices) -> (n,)`
    method (`gallery_scorer`'s) is asked for all shortlisted pairs of a text chunk at once (full forward batches);
    otherwise for one (1, k) block per text.
    """
    n_texts = len(gold)
    if k < 1:
        raise ValueError(f"shortlist_ranks: k must be >= 1, got {k}")
    if isinstance(cheap, np.ndarray):
        if cheap.shape[0] != n_texts:
            raise ValueError(f"shortlist_ranks: cheap similarity has {cheap.shape[0]} rows for {n_texts} texts")
        matrix = cheap
        n_images = cheap.shape[1]

        def cheap_rows(texts: list[int]) -> np.ndarray:
            return matrix[texts[0] : texts[-1] + 1]

    elif n_images is None:
        raise ValueError("shortlist_ranks: n_images is required when `cheap` is a function of text indices")
    else:
        cheap_rows = cheap
    k = min(k, n_images)
    pairs = getattr(score_block, "pairs", None)
    ranks = np.full(n_texts, k + 1, dtype=np.int64)
    for t0 in progress(range(0, n_texts, text_chunk), desc="retrieval: shortlist re-rank", unit="chunk"):
        texts = list(range(t0, min(t0 + text_chunk, n_texts)))
        rows = np.asarray(cheap_rows(texts))
        if rows.shape != (len(texts), n_images):
            raise ValueError(
                f"shortlist_ranks: cheap similarity rows of texts {t0}..{texts[-1]} have shape {rows.shape}, "
                f"expected {(len(texts), n_images)}"
            )
        if not np.isfinite(rows).all():
            raise ValueError(f"shortlist_ranks: non-finite cheap similarity among texts {t0}..{texts[-1]}")
        keep = _top_k_mask(rows, k)  # (chunk, images) bool
        del rows
        hits = [j for j, t in enumerate(texts) if keep[j, gold[t]]]  # a text whose gold is not shortlisted: k + 1
        candidates = [np.flatnonzero(keep[j]) for j in hits]
        if pairs is not None and hits:  # every shortlisted pair of the chunk in one call: full batches
            flat = _as_numpy(
                pairs(
                    np.repeat([texts[j] for j in hits], [len(c) for c in candidates]).tolist(),
                    np.concatenate(candidates).tolist(),
                )
            ).astype(np.float64)
            per_text = np.split(flat, np.cumsum([len(c) for c in candidates])[:-1])
        else:
            per_text = [
                _as_numpy(score_block([texts[j]], c.tolist()))[0].astype(np.float64) for j, c in zip(hits, candidates)
            ]
        for j, cand, scores in zip(hits, candidates, per_text):
            t = texts[j]
            gold_score = scores[int(np.flatnonzero(cand == gold[t])[0])]
            ranks[t] = int((scores >= gold_score - 1e-9).sum())  # the gold included
    return ranks


def _top_k_mask(rows: np.ndarray, k: int) -> np.ndarray:
    """(n, m) bool: each row's k largest entries, ties at the k-th value to the lowest indices (the first k of
    `np.argsort(-rows, kind="stable")`), in O(n x m) time (a partition, not a sort)."""
    m = rows.shape[1]
    if k >= m:
        return np.ones(rows.shape, dtype=bool)
    kth = np.partition(rows, m - k, axis=1)[:, [m - k]]  # (n, 1): each row's k-th largest value (a copy)
    keep = rows > kth
    tied = rows == kth
    room = k - keep.sum(1, keepdims=True)  # how many tied entries still fit, lowest index first
    over = np.flatnonzero(tied.sum(1, keepdims=True) > room)  # rows whose ties straddle the k-th place
    tied[over] &= np.cumsum(tied[over], axis=1, dtype=np.int32) <= room[over]
    keep |= tied
    return keep


@torch.no_grad()
def pooled_similarity(model: Any, collator: Collator, texts: list[Any], visuals: Any, batch_size: int) -> CheapRows:
    """The cheap dual-encoder similarity: cosine between each text encoded alone (all regions masked) and each image
    encoded alone (an empty caption). O(T + I) forwards instead of O(T x I). The images are encoded here, once
    ((I, H) float32); the returned function encodes a chunk of texts and gives their (chunk, I) cosine rows, so no
    (T, I) matrix is ever built."""
    device = getattr(model, "device", torch.device("cpu"))

    def encode(examples: list[dict], drop_regions: bool) -> np.ndarray:
        out = []
        for start in range(0, len(examples), batch_size):
            batch = collator(examples[start : start + batch_size])
            if drop_regions:
                batch["visual_mask"] = torch.zeros_like(batch["visual_mask"])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            pooled = torch.nn.functional.normalize(model(batch).pooled.float(), dim=-1)
            out.append(pooled.cpu().numpy())
        return np.concatenate(out)

    image_emb = encode([{"text": "", "visual": visuals[i]} for i in range(len(visuals))], drop_regions=False)
    blank = visuals[0]

    @torch.no_grad()
    def cheap_rows(text_idx: list[int]) -> np.ndarray:
        return encode([{**text_fields(texts[t]), "visual": blank} for t in text_idx], drop_regions=True) @ image_emb.T

    return cheap_rows


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
    from vl.build import build_datamodule, build_model, model_from_checkpoint

    opts = {
        "max_images": max_images,
        "captions_per_image": captions_per_image,
        "batch_size": batch_size,
        "text_chunk": text_chunk,
        "image_chunk": image_chunk,
        "shortlist_k": shortlist_k,
    }
    if shortlist_k is not None and shortlist_k < 1:
        raise ConfigError(f"task.shortlist_k: must be an integer >= 1 (images per caption), got {shortlist_k!r}")
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
    from vl.checkpoint import check_architecture, read_checkpoint

    state = read_checkpoint(cfg.ckpt_path, "ckpt_path")  # weights_only: a file that would run code is refused
    hparams = state.get("hyper_parameters") or {}
    if "objectives" in hparams and "data_info" in hparams:  # the heads as trained, also on another corpus
        model = model_from_checkpoint(run_cfg, state, cfg.ckpt_path)
    else:  # a checkpoint without them: the heads the run's data module says
        model = build_model(run_cfg, dm)
        check_architecture(state, model, cfg.ckpt_path)
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
    if k is not None:
        cheap = pooled_similarity(model, collator, texts, visuals, batch_size)
        ranks = shortlist_ranks(score, cheap, gold, k=int(k), text_chunk=text_chunk, n_images=n_images)
    else:
        ranks = chunked_ranks(
            score,
            len(texts),
            n_images,
            gold,
            text_chunk=text_chunk,
            image_chunk=int(opts.get("image_chunk", 128)),
            desc="retrieval: ranking",
        )
    metric = RetrievalRecall()
    metric.update(torch.from_numpy(ranks))
    metrics = {f"{split}/{key}": float(v) for key, v in metric.compute().items()}
    metrics[f"{split}/recall@1_chance"] = 1.0 / n_images
    metrics[f"{split}/num_images"] = float(n_images)
    metrics[f"{split}/num_captions"] = float(len(texts))
    assert math.isfinite(metrics[f"{split}/mean_rank"])
    return metrics


def _id_order(image_id: int | str) -> tuple[int, int, str]:
    """Sort key of image ids that may be ints (COCO) or strings (a TSV's "img055", "007"): numbers by value first,
    then the other strings (sorting a mix of int and str directly is a TypeError)."""
    text = str(image_id)
    return (0, int(text), text) if text.isdigit() else (1, 0, text)


def _caption_queries(dm: Any, split: str, opts: dict[str, Any]) -> tuple[list[str], list[int], list[dict]]:
    """(caption texts, gold image position, image region dicts) of a captions corpus split: the first `max_images`
    images (sorted ids), `captions_per_image` captions each."""
    annotations = load_captions(dm.path(dm.captions_file, split))
    image_ids = sorted({a["image_id"] for a in annotations}, key=_id_order)[: opts.get("max_images") or None]
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    per_image = int(opts.get("captions_per_image", 1))
    seen: dict[int | str, int] = {}
    queries = []
    for a in annotations:
        if a["image_id"] in position and seen.get(a["image_id"], 0) < per_image:
            seen[a["image_id"]] = seen.get(a["image_id"], 0) + 1
            queries.append(a)
    visuals = [dm.regions[str(i)] for i in image_ids]
    return [q["caption"] for q in queries], [position[q["image_id"]] for q in queries], visuals
