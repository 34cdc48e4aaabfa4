"""Retrieval evaluation memory and time, the three ways `vl` can rank a gallery.

1. Ranking machinery (synthetic dual-encoder scorer, dot products), at three captions x images sizes:
   - naive: the whole captions x images score matrix, then ranks from it (what a torchmetrics.retrieval-style
     evaluation holds);
   - chunked: `vl.eval.retrieval.chunked_ranks` (exhaustive, one caption chunk x all images at a time);
   - shortlist: `vl.eval.retrieval.shortlist_ranks` (cheap similarity per caption chunk, top k kept, re-ranked).
   Peak memory is traced with `tracemalloc` (numpy buffers; vl keeps every array that grows with the gallery in
   numpy so that it is traced). Asserts chunked == naive ranks, and shortlist == min(naive, k + 1) (its cheap
   similarity is the scorer here, so the shortlist holds the gold exactly when its rank is <= k).
2. Exhaustive vs shortlist with a real cross-encoder (`vilbert_tiny`, random init, its ITM head; `zero_shot_retrieval`'s
   defaults: 256 pairs per forward, text chunk 16, image chunk 128) on a synthetic gallery of `--cross-images` images:
   wall time of each over the same captions, both modes interleaved `--repeats` times; prints each pair's ratio and
   their min / median.

Timings are wall-clock on whatever the machine runs besides; quote the ratios.

    python bench/retrieval_memory.py [--sizes 5000x1000,10000x2000,25000x5000] [--k 20]
                                     [--cross-images 1000] [--cross-captions 32] [--repeats 3] [--threads 1]
                                     [--skip-cross]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _table import emit  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")

from vl.eval.retrieval import chunked_ranks, gallery_scorer, pooled_similarity, shortlist_ranks  # noqa: E402


def traced(fn):
    """(result, seconds, traced peak bytes) of fn()."""
    tracemalloc.start()
    try:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        return result, seconds, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def machinery(n_texts: int, n_images: int, *, k: int, dim: int, text_chunk: int, image_chunk: int) -> dict:
    rng = np.random.default_rng(0)
    text_emb = rng.standard_normal((n_texts, dim)).astype(np.float32)
    image_emb = rng.standard_normal((n_images, dim)).astype(np.float32)
    gold = (np.arange(n_texts) % n_images).tolist()
    text_emb += 0.5 * image_emb[gold]  # captions resemble their image: ranks spread from 1 upwards

    def score_block(texts: list[int], images: list[int]) -> torch.Tensor:
        return torch.from_numpy(text_emb[texts] @ image_emb[images].T)

    def naive() -> np.ndarray:
        scores = text_emb @ image_emb.T  # (T, I)
        gold_scores = scores[np.arange(n_texts), gold]
        return (scores >= gold_scores[:, None] - 1e-9).sum(1)  # ties count against the gold, as in vl

    def chunked() -> np.ndarray:
        return chunked_ranks(score_block, n_texts, n_images, gold, text_chunk=text_chunk, image_chunk=image_chunk)

    def shortlist() -> np.ndarray:
        def cheap(texts: list[int]) -> np.ndarray:
            return text_emb[texts] @ image_emb.T

        return shortlist_ranks(score_block, cheap, gold, k=k, text_chunk=text_chunk, n_images=n_images)

    out = {name: traced(fn) for name, fn in (("naive", naive), ("chunked", chunked), ("shortlist", shortlist))}
    assert np.array_equal(out["naive"][0], out["chunked"][0]), "chunked ranks differ from the naive ones"
    assert np.array_equal(np.minimum(out["naive"][0], k + 1), out["shortlist"][0]), "shortlist ranks differ"
    return out


def cross_encoder(n_images: int, n_captions: int, *, k: int, repeats: int, data_dir: str) -> None:
    from hydra import compose, initialize_config_dir

    import vl.build  # noqa: F401
    from vl.pipeline import build_datamodule, build_model

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train",
            overrides=["experiment=vilbert_pretrain_tiny", f"paths.data_dir={data_dir}", "paths.output_dir=/tmp/vl"],
        )
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, dm).eval()
    collator = dm.scoring_collator()
    dim = int(dm.info["visual_dim"])
    rng = np.random.default_rng(0)
    visuals = []
    for _ in range(n_images):
        n = int(rng.integers(4, 2 * dm.max_regions))
        boxes = np.sort(rng.uniform(0, 1, size=(n, 4)).astype(np.float32), axis=1)
        visuals.append({"features": rng.standard_normal((n, dim)).astype(np.float32), "boxes_norm": boxes})
    words = "a the man woman dog cat red blue sits runs on in near street table grass ball two small".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(5, 14)))) for _ in range(n_captions)]
    torch.set_grad_enabled(False)
    # gold = each caption's most similar image by the cheap similarity, so that the shortlist re-ranks every caption
    # (a caption whose gold is not shortlisted costs no cross-encoder forward: random golds would flatter it)
    cheap = pooled_similarity(model, collator, texts, visuals, 256)
    gold = [int(np.argmax(cheap([t])[0])) for t in range(n_captions)]
    score = gallery_scorer(model, collator, texts, visuals, batch_size=256)

    def exhaustive() -> np.ndarray:
        return chunked_ranks(score, n_captions, n_images, gold, text_chunk=16, image_chunk=128)

    def shortlist() -> np.ndarray:
        cheap = pooled_similarity(model, collator, texts, visuals, 256)
        return shortlist_ranks(score, cheap, gold, k=k, text_chunk=16, n_images=n_images)

    shortlist()  # warm-up (allocator, kernels), not timed
    ratios, times = [], {"exhaustive": [], "shortlist": []}
    for _ in range(repeats):  # interleaved pairs: a slow patch of the machine hits both sides of a pair
        pair = {}
        for name, fn in (("exhaustive", exhaustive), ("shortlist", shortlist)):
            start = time.perf_counter()
            fn()
            pair[name] = time.perf_counter() - start
            times[name].append(pair[name])
        ratios.append(pair["exhaustive"] / pair["shortlist"])
    forwards = {"exhaustive": n_captions * n_images, "shortlist": n_images + n_captions + n_captions * k}
    print(
        f"\ncross-encoder vilbert_tiny, {n_captions} captions x {n_images} images, k = {k}, "
        f"{torch.get_num_threads()} threads"
    )
    for name in times:
        per_caption = statistics.median(times[name]) / n_captions
        print(
            f"  {name:10s}: median {statistics.median(times[name]):7.2f} s  ({per_caption * 1000:7.1f} ms per caption;"
            f" at most {forwards[name]} pair/encoder rows)  runs: {', '.join(f'{t:.2f}' for t in times[name])}"
        )
    emit(f"exhaustive / shortlist time, vilbert_tiny, {n_images} images", ratios, goal=10, higher_is_better=True)
    print(
        f"  exhaustive / shortlist time: min {min(ratios):.1f}x  median {statistics.median(ratios):.1f}x  "
        f"(pairs: {', '.join(f'{r:.1f}' for r in ratios)})"
    )
    image_pass = n_images / (n_images + n_captions + n_captions * k)
    print(
        f"  the shortlist's one-off image pass is {image_pass:.0%} of its rows; per further caption it costs "
        f"1 + k rows against {n_images} exhaustive"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", default="5000x1000,10000x2000,25000x5000", help="captions x images, comma-separated ('' for none)"
    )
    parser.add_argument("--k", type=int, default=20, help="shortlist length")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--text-chunk", type=int, default=500)
    parser.add_argument("--image-chunk", type=int, default=500)
    parser.add_argument("--cross-images", type=int, default=1000)
    parser.add_argument("--cross-captions", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 on a shared 2-core machine: 20x slower)"
    )
    parser.add_argument("--skip-cross", action="store_true", help="only the ranking machinery")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "vl-bench-data"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"ranking machinery (synthetic scorer): traced peak memory and time; shortlist k = {args.k}, "
        f"caption chunk {args.text_chunk}"
    )
    print(
        "| captions x images | naive matrix | chunked | shortlist | shortlist / chunked | time naive / chunked / "
        "shortlist |"
    )
    print("|---|---|---|---|---|---|")
    growth: list[tuple[int, float]] = []
    for size in filter(None, args.sizes.split(",")):
        n_texts, n_images = (int(x) for x in size.lower().split("x"))
        r = machinery(
            n_texts, n_images, k=args.k, dim=args.dim, text_chunk=args.text_chunk, image_chunk=args.image_chunk
        )
        mib = {name: r[name][2] / 2**20 for name in r}
        growth.append((n_images, mib["shortlist"]))
        print(
            f"| {n_texts} x {n_images} | {mib['naive']:.1f} MiB | {mib['chunked']:.1f} MiB | {mib['shortlist']:.1f} MiB"
            f" | {mib['shortlist'] / mib['chunked']:.2f} | {r['naive'][1]:.2f} / {r['chunked'][1]:.2f} / "
            f"{r['shortlist'][1]:.2f} s |",
            flush=True,
        )
    print("ranks: chunked == naive, shortlist == min(naive, k + 1) at every size")
    if len(growth) >= 2:  # O(chunk): memory per image stays flat as the gallery grows (captions grow with it)
        (n0, m0), (n1, m1) = growth[0], growth[-1]
        emit(
            f"shortlist peak memory growth / image growth ({n0} -> {n1} images)",
            [(m1 / m0) / (n1 / n0)],
            goal=1.05,
            why="per caption chunk: O(chunk x images + captions x k), never captions x images",
        )
    if not args.skip_cross:
        cross_encoder(args.cross_images, args.cross_captions, k=args.k, repeats=args.repeats, data_dir=args.data_dir)


if __name__ == "__main__":
    main()
