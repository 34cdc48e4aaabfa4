"""Ranking a retrieval gallery with a cross-encoder, in chunks: each caption's gold rank among all images, never a
captions x images score matrix. Used by the system's val/test retrieval step and by `vl.eval.retrieval`; and both
directions at once (`exhaustive_retrieval`: image and caption retrieval over N aligned pairs, MM-BERT's protocol).
`recall_at_k` ranks a dual encoder's (N, N) similarity matrix of N aligned pairs (VG-BERT's whole-split retrieval)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vl.data.collate import Collator, text_fields
from vl.data.region_batch import pad_regions
from vl.metrics import median_rank
from vl.progress import progress

__all__ = [
    "ScoreBlock",
    "chunked_ranks",
    "exhaustive_retrieval",
    "gallery_scorer",
    "recall_at_k",
    "translation_retrieval",
]

#: score_block(text_indices, image_indices) -> (len(texts), len(images)) scores, higher = better match
ScoreBlock = Callable[[list[int], list[int]], torch.Tensor]


def chunked_ranks(
    score_block: ScoreBlock,
    n_texts: int,
    n_images: int,
    gold: list[int],
    *,
    text_chunk: int,
    image_chunk: int,
    desc: str | None = None,
    top: np.ndarray | None = None,
) -> np.ndarray:
    """Rank (1 = best) of `gold[t]` among all images for each text t, scoring (text_chunk x image_chunk) blocks.

    Rank = number of images scoring at least the gold's score - 1e-9, the gold included: every other image within
    1e-9 of the gold (a tie) counts as ranked above it. Ties count against the gold so that a collapsed scorer
    (the same score for every image, e.g. dead poolers) ranks every gold last instead of first (R@1 = 0, not 1); with
    no ties this is 1 + the number of images scoring higher. One chunk of texts is held against every image at a time, in the scores' own dtype: memory
    O(text_chunk x images), never texts x images, and the gold score is the one from the same pass (no extra
    forwards). `desc`: show a progress bar (`vl.progress`) over the text chunks under that name. `top`: an
    (n_texts, k) integer array to fill with each text's k best images, best first (ties in image order), from the same
    rows (only its first n_images columns when k is larger): the seed's result file lists each caption's top 20
    (`eval_retrieval.py`).
    """
    gold_arr = np.asarray(gold, dtype=np.int64)
    ranks = np.empty(n_texts, dtype=np.int64)
    starts = range(0, n_texts, text_chunk)
    for t0 in progress(starts, desc=desc, unit="chunk") if desc else starts:
        texts = list(range(t0, min(t0 + text_chunk, n_texts)))
        rows: np.ndarray | None = None
        for i0 in range(0, n_images, image_chunk):
            images = list(range(i0, min(i0 + image_chunk, n_images)))
            block = _as_numpy(score_block(texts, images))
            if rows is None:  # numpy, so that tracemalloc sees it (bench/retrieval_memory.py, tests)
                rows = np.empty((len(texts), n_images), dtype=block.dtype)
            rows[:, i0 : i0 + len(images)] = block
        assert rows is not None
        own = np.arange(len(texts))
        g = gold_arr[t0 : t0 + len(texts)]
        ranks[t0 : t0 + len(texts)] = (rows >= _tie_threshold(rows[own, g])[:, None]).sum(1)  # gold included
        if top is not None and top.shape[1]:
            best = _best(rows, top.shape[1])  # fewer columns when the gallery is smaller than k
            top[t0 : t0 + len(texts), : best.shape[1]] = best
    return ranks


def _best(rows: np.ndarray, k: int) -> np.ndarray:
    """(texts, min(k, images)) indices of each row's k highest scores, best first, ties in index order (a stable sort:
    a partition would pick any of the images tied at the k-th score)."""
    return np.argsort(-rows, axis=1, kind="stable")[:, :k]


def _as_numpy(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    """Scores as a numpy array in their own floating dtype (bfloat16, which numpy lacks, and integers -> float32 /
    float64)."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu()
        if scores.dtype == torch.bfloat16:
            scores = scores.float()
        scores = scores.numpy()
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    return scores


def _tie_threshold(gold_scores: np.ndarray) -> np.ndarray:
    """The smallest value t of the scores' dtype with t >= float64(gold) - 1e-9, so that for any score x of that dtype
    `x >= t` is exactly `float64(x) >= float64(gold) - 1e-9`, without a float64 copy of the rows."""
    exact = gold_scores.astype(np.float64) - 1e-9
    t = exact.astype(gold_scores.dtype)
    under = t.astype(np.float64) < exact
    t[under] = np.nextafter(t[under], np.asarray(np.inf, dtype=t.dtype))
    return t


def _head_in_float32(head: Callable[[torch.Tensor], torch.Tensor], pooled: torch.Tensor, model: Any) -> torch.Tensor:
    """`head(pooled)` in float32 (the model's own dtype when its weights are lower: `precision=*-true`), outside any
    autocast: under `bf16-mixed` the head's Linear would round the scores to bfloat16 (steps of ~0.03 at a logit of 5),
    and the rank counts every tie against the gold; the seed scores in float32."""
    dtype = getattr(model, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    with torch.autocast(pooled.device.type, enabled=False):
        return head(pooled.to(dtype)).float()


def _pad_images(collator: Any, images: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The images' batch keys, padded as the collator pads them (its `visual_batch` when its images give more keys
    than the regions)."""
    if hasattr(collator, "visual_batch"):
        return collator.visual_batch(images)
    return pad_regions(images, collator.max_regions, fixed=collator.fixed_shapes)


def _pair_scores(model: Any, head: Any, collator: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) the pair scorer's scores of a batch of pair rows (text keys + image keys), on the model's device, the head
    in float32; the collator's `pair_batch` applies a limit on a pair's joint length (MM-BERT's seq_len)."""
    batch = {**batch, "index": torch.zeros(len(batch["input_ids"]), dtype=torch.long)}
    if hasattr(collator, "pair_batch"):
        batch = collator.pair_batch(batch)
    batch = {n: v.to(model.device) for n, v in batch.items()}
    return _head_in_float32(head, model(batch).pooled, model).cpu()


def gallery_scorer(model: Any, collator: Collator, texts: list[Any], visuals: Any, *, batch_size: int) -> ScoreBlock:
    """A `ScoreBlock` from a system's `pair_scorer()`: its fine-tuned retrieval head (`vil_logit`), else the ITM
    head's aligned probability (1 = aligned in vl) as its log-odds (`RetrievalEvaluation.pair_scorer`), the head in
    float32 (`_head_in_float32`).

    Each call tokenises its texts once and pads its images once (the last call's tokens are kept, so the image chunks
    of one text chunk reuse them), then forms the pair batches by indexing: a caption is tokenised once per text
    chunk, not once per image. `score_block.pairs(text_indices, image_indices)` scores a list of pairs the same way
    (the shortlist's re-rank). With the scoring collator (`fixed_shapes`) a pair's batch rows are exactly those the
    collator would give it. A text may be a dict of a row's text fields (``{"text", "text_b"}``: MM-BERT's joint
    ``[CLS] EN [SEP] DE [SEP]`` queries), collated as the training rows are."""
    head = model.pair_scorer()
    cache: dict[str, Any] = {"texts": None, "tokens": None}

    def tokens(text_idx: list[int]) -> dict[str, torch.Tensor]:
        key = tuple(text_idx)
        if cache["texts"] != key:
            enc = collator([text_fields(texts[t]) for t in text_idx])
            cache["texts"], cache["tokens"] = key, {n: v for n, v in enc.items() if n != "index"}
        return cache["tokens"]

    def forward(text: dict, image: dict, t_rows: torch.Tensor, i_rows: torch.Tensor) -> torch.Tensor:
        """Scores of the pairs (text row t_rows[p], image row i_rows[p]), `batch_size` pairs per forward."""
        out = torch.empty(len(t_rows))
        for start in range(0, len(t_rows), batch_size):
            t, i = t_rows[start : start + batch_size], i_rows[start : start + batch_size]
            batch = {n: v[t] for n, v in text.items()} | {n: v[i] for n, v in image.items()}
            out[start : start + len(t)] = _pair_scores(model, head, collator, batch)
        return out

    def regions(image_idx: list[int]) -> dict[str, torch.Tensor]:
        return _pad_images(collator, [visuals[i] for i in image_idx])

    @torch.no_grad()
    def score_block(text_idx: list[int], image_idx: list[int]) -> torch.Tensor:
        pair = torch.arange(len(text_idx) * len(image_idx))
        scores = forward(tokens(text_idx), regions(image_idx), pair // len(image_idx), pair % len(image_idx))
        return scores.view(len(text_idx), len(image_idx))

    @torch.no_grad()
    def score_pairs(text_idx: list[int], image_idx: list[int]) -> torch.Tensor:
        """(n,) scores of the pairs zip(text_idx, image_idx); each distinct text tokenised, each image padded once."""
        t_uniq, t_rows = np.unique(np.asarray(text_idx, dtype=np.int64), return_inverse=True)
        i_uniq, i_rows = np.unique(np.asarray(image_idx, dtype=np.int64), return_inverse=True)
        text, image = tokens(t_uniq.tolist()), regions(i_uniq.tolist())
        return forward(text, image, torch.from_numpy(t_rows.reshape(-1)), torch.from_numpy(i_rows.reshape(-1)))

    score_block.pairs = score_pairs  # type: ignore[attr-defined]  # used by shortlist_ranks
    return score_block


@torch.no_grad()
def exhaustive_retrieval(
    model: Any,
    collator: Any,
    texts: list[Any],
    visuals: Any,
    *,
    batch_size: int = 256,
    text_chunk: int = 16,
    scores_path: Path | None = None,
    tolerance: float = 0.0,
    ties: str = "index",
) -> dict[str, float]:
    """Caption i belongs to image i. Scores all N x N pairs, one chunk of captions against every image at a time
    (scored O(text_chunk x N) at a time; the caption direction holds the earlier rows' scores of the columns whose gold
    is not yet scored, at most N^2 / 4 floats), and ranks both ways: image retrieval (``t2i``: the images for each caption)
    and caption retrieval (``i2t``: the captions for each image). Rank = 1 + the number of others scoring more than the
    gold pair's score + ``tolerance``, + with ``ties="index"`` (default, MM-BERT's seed ``retrieval/evaluate.py``: its
    ``max`` / stable ``sorted`` over the scores file's order put the lower index first) the others within
    ``tolerance`` of the gold at a lower index (image index for ``t2i``, caption index for ``i2t``); ``ties="gold"``
    (vl's earlier rule): ties count in the gold's favour. The gold score is the pair's entry in its own block, the
    same float as the scores it is compared with, so ``tolerance=0`` (default, the seed's rule) ranks the exact
    scores: only equal scores tie. Near 1.0 distinct float32 sigmoids are ~6e-8 apart, so any tolerance above that
    merges a confident model's distinct scores into ties; a tolerance > 0 is an opt-in (not the seed's) that treats
    scores within it of the gold as ties. ``scores_path``: the seed's scores file
    ``[{"caption_id", "image_ids", "logit": [p]}]``, one entry per pair, streamed."""
    score = gallery_scorer(model, collator, texts, visuals, batch_size=batch_size)
    return _rank_both_ways(
        score,
        len(texts),
        names=("t2i", "i2t"),
        keys=("caption_id", "image_ids"),
        text_chunk=text_chunk,
        scores_path=scores_path,
        tolerance=tolerance,
        ties=ties,
    )


@torch.no_grad()
def translation_retrieval(
    model: Any,
    collator: Any,
    en: list[str],
    de: list[str],
    visuals: Any,
    *,
    batch_size: int = 256,
    text_chunk: int = 16,
    scores_path: Path | None = None,
    tolerance: float = 0.0,
    ties: str = "index",
) -> dict[str, float]:
    """MM-BERT's translation retrieval (the seed's ``test_translation.py`` + ``evaluate_translation.py``): EN caption i
    and DE caption j scored as ``[CLS] EN_i [SEP] DE_j [SEP]`` on image i (EN's image: ``visuals[i]``; None: no image)
    by the system's pair scorer, for all N x N pairs, one chunk of EN rows at a time; gold = the same line. ``de_*``:
    for each EN caption the DE captions ranked (the seed's "German caption retrieval"), ``en_*``: the transpose.
    Ranks, ties and ``tolerance`` as ``exhaustive_retrieval`` (the exact scores, the seed's ``max`` / stable ``sorted``
    over its file's order: the lower index first); ``scores_path``: the seed's file
    ``[{"caption_en_index", "caption_de_index", "logit": [p]}]``."""
    if len(en) != len(de):
        raise ValueError(f"translation retrieval: {len(en)} EN captions but {len(de)} DE captions")
    head = model.pair_scorer()

    def forward(pairs: list[tuple[int, int]], image: dict[str, torch.Tensor], where: torch.Tensor) -> torch.Tensor:
        """Scores of the pairs (EN i, DE j), `batch_size` per forward; `image`: padded images, pair p's at `where[p]`."""
        out = torch.empty(len(pairs))
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            enc = collator([{"text": en[i], "text_b": de[j]} for i, j in chunk])
            batch = {n: v for n, v in enc.items() if n != "index"}
            batch |= {n: v[where[start : start + len(chunk)]] for n, v in image.items()}
            out[start : start + len(chunk)] = _pair_scores(model, head, collator, batch)
        return out

    def regions(en_idx: list[int]) -> dict[str, torch.Tensor]:
        """EN lines' images padded once (none without vision)."""
        images = [visuals[i] for i in en_idx] if visuals is not None else []
        return _pad_images(collator, images) if images and images[0] is not None else {}

    def score_block(en_idx: list[int], de_idx: list[int]) -> torch.Tensor:
        where = torch.arange(len(en_idx)).repeat_interleave(len(de_idx))
        pairs = [(i, j) for i in en_idx for j in de_idx]
        return forward(pairs, regions(en_idx), where).view(len(en_idx), len(de_idx))

    return _rank_both_ways(
        score_block,
        len(en),
        names=("de", "en"),
        keys=("caption_en_index", "caption_de_index"),
        text_chunk=text_chunk,
        scores_path=scores_path,
        tolerance=tolerance,
        ties=ties,
    )


def _rank_both_ways(
    score: Any,
    n: int,
    *,
    names: tuple[str, str],
    keys: tuple[str, str],
    text_chunk: int,
    scores_path: Path | None,
    tolerance: float,
    ties: str,
) -> dict[str, float]:
    """N x N scores `score(rows, cols)` (gold: row i with column i), chunk by chunk of rows: each row's rank among the
    columns (``names[0]``) and each column's among the rows (``names[1]``), R@1/5/10 and median rank; the scores file
    ``[{keys[0]: row, keys[1]: col, "logit": [p]}]`` streamed (see `exhaustive_retrieval` for ranks and ties).

    Every gold score is the diagonal entry of its own row's block, the same value the other scores of that row and
    column are compared with (and the value written to the scores file): no separate pass that float noise could set
    apart. A row is ranked within its block; a column's gold is known only once its row's chunk is scored, so the
    scores of the rows before it are held until then (the rows scored so far x the columns not yet reached: at most
    N^2 / 4 values in the scores' dtype)."""
    if ties not in ("index", "gold"):
        raise ValueError(f"exhaustive ranking: ties '{ties}' is not 'index' or 'gold'")
    if not tolerance >= 0:
        raise ValueError(f"exhaustive ranking: tolerance {tolerance} is not >= 0")

    def beats(scores: np.ndarray, gold: np.ndarray, first: np.ndarray | bool) -> np.ndarray:
        """Others ranked above their gold: higher by more than the tolerance, or (``ties="index"``) within it and first
        in index order. float64 of the scores' own values: exact (no rounding of gold + tolerance)."""
        scores, gold = scores.astype(np.float64), gold.astype(np.float64)
        wins = scores > gold + tolerance
        if ties == "index":
            wins |= (np.abs(scores - gold) <= tolerance) & first
        return wins

    gold = np.empty(n, dtype=np.float64)  # the diagonal, from the blocks
    row_better = np.zeros(n, dtype=np.int64)
    col_better = np.zeros(n, dtype=np.int64)
    index = np.arange(n)
    held: np.ndarray | None = None  # (rows scored so far, columns from the current chunk's first row on)
    out = open(scores_path, "w", encoding="utf-8") if scores_path is not None else None  # noqa: SIM115
    try:
        if out is not None:
            out.write("[")
        first = True
        for r0 in range(0, n, text_chunk):
            r1 = min(n, r0 + text_chunk)
            rows_idx = list(range(r0, r1))
            block = _as_numpy(score(rows_idx, list(range(n))))  # (c, N), the scores' own dtype
            rows = index[r0:r1]
            gold[r0:r1] = block[np.arange(r1 - r0), rows]  # the gold itself never beats itself: not >, not first
            # rows: column j before row r's gold column r when j < r
            row_better[r0:r1] += beats(block, gold[r0:r1, None], index[None, :] < rows[:, None]).sum(1)
            # columns up to this chunk's last row (their gold known): row r before column j's gold row j when r < j
            col_better[:r1] += beats(block[:, :r1], gold[None, :r1], rows[:, None] < index[None, :r1]).sum(0)
            if held is not None:  # the earlier rows, all before these columns' gold rows
                col_better[r0:r1] += beats(held[:, : r1 - r0], gold[None, r0:r1], True).sum(0)
                held = np.concatenate([held[:, r1 - r0 :], block[:, r1:]])
            else:
                held = block[:, r1:].copy()
            if out is not None:
                for r, row in enumerate(rows_idx):
                    for col in range(n):
                        sep = "" if first else ","
                        first = False
                        out.write(f'{sep}{{"{keys[0]}": {row}, "{keys[1]}": {col}, "logit": [{float(block[r, col])}]}}')
        if out is not None:
            out.write("]")
    finally:
        if out is not None:
            out.close()
    metrics: dict[str, float] = {}
    for name, better in zip(names, (row_better, col_better)):
        ranks = torch.from_numpy(better + 1).double()
        for k in (1, 5, 10):
            metrics[f"{name}_recall@{k}"] = float((ranks <= k).double().mean())
        metrics[f"{name}_median_rank"] = float(median_rank(ranks))  # the same medR as every vl retrieval metric
    return metrics


def recall_at_k(sim: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """sim (N, N), image i <-> caption i gold: R@k image->text (rows) and text->image (columns), and their mean.

    A gold's rank is the number of candidates scoring at least its score - 1e-9, itself included: ties count against
    the gold, as in every vl ranking (`chunked_ranks`), so a collapsed scorer (one score for
    every pair) ranks every gold last (R@k = 0 for k < N), not first (R@k = 1)."""
    gold = torch.arange(sim.shape[0])
    sim = sim.float().cpu()
    rank_i2t = (sim >= sim[gold, gold][:, None] - 1e-9).sum(1)
    rank_t2i = (sim >= sim[gold, gold][None, :] - 1e-9).sum(0)
    out: dict[str, float] = {}
    for k in ks:
        out[f"r{k}_i2t"] = float((rank_i2t <= k).float().mean())
        out[f"r{k}_t2i"] = float((rank_t2i <= k).float().mean())
        out[f"r{k}_mean"] = (out[f"r{k}_i2t"] + out[f"r{k}_t2i"]) / 2
    return out
