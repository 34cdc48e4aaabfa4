"""Retrieval evaluation memory/time: `vl.eval.retrieval.chunked_ranks` (blocks of captions x images, only each caption's
gold rank kept) against the naive method (the whole captions x images score matrix, then ranks from it), in one run.

Scores come from a synthetic dual encoder (text/image embeddings, dot product) so that the benchmark isolates the
ranking machinery; both methods call the same scorer. Peak memory is traced with `tracemalloc` (numpy buffers are
tracked; the score blocks are numpy-backed). Prints the ratios; asserts the ranks are identical.

    python bench/retrieval_memory.py [--texts 25000] [--images 5000]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import torch

from vl.eval.retrieval import chunked_ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=25000, help="captions (Flickr30k/COCO test: 5 per image)")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--text-chunk", type=int, default=500)
    parser.add_argument("--image-chunk", type=int, default=500)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    text_emb = rng.standard_normal((args.texts, args.dim)).astype(np.float32)
    image_emb = rng.standard_normal((args.images, args.dim)).astype(np.float32)
    gold = (np.arange(args.texts) % args.images).tolist()
    text_emb += 0.5 * image_emb[gold]  # captions resemble their image: ranks spread from 1 upwards

    def score_block(texts: list[int], images: list[int]) -> torch.Tensor:
        return torch.from_numpy(text_emb[texts] @ image_emb[images].T)

    def naive() -> np.ndarray:
        scores = text_emb @ image_emb.T  # (T, I): what a torchmetrics.retrieval-style evaluation holds
        gold_scores = scores[np.arange(args.texts), gold]
        return 1 + (scores > gold_scores[:, None] + 1e-9).sum(1)

    def chunked() -> np.ndarray:
        return chunked_ranks(
            score_block,
            args.texts,
            args.images,
            gold,
            text_chunk=args.text_chunk,
            image_chunk=args.image_chunk,
        )

    results = {}
    for name, fn in (("naive", naive), ("chunked", chunked)):
        tracemalloc.start()
        start = time.perf_counter()
        ranks = fn()
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        results[name] = (ranks, seconds, peak)
        print(f"{name:8s}: peak {peak / 2**20:8.1f} MiB   {seconds:6.2f} s   R@1 {(ranks <= 1).mean():.4f}")
    assert np.array_equal(results["naive"][0], results["chunked"][0]), "chunked ranks differ from the naive ones"
    print(f"{args.texts} captions x {args.images} images: ranks identical")
    print(f"peak memory, chunked / naive: {results['chunked'][2] / results['naive'][2]:.4f}")
    print(f"time, chunked / naive:        {results['chunked'][1] / results['naive'][1]:.2f}")


if __name__ == "__main__":
    main()
