"""Retrieval ranking machinery (vl/models/ranking.py, vl/eval/retrieval.py): exact rank semantics in the scores' own dtype, the shortlist's
top k and its memory (traced: never captions x images), and the gallery scorer against per-pair collation."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from vl.eval.retrieval import _top_k_mask, chunked_ranks, gallery_scorer, shortlist_ranks


def _block_of(scores: np.ndarray):
    def block(texts: list[int], images: list[int]) -> torch.Tensor:
        return torch.from_numpy(scores[np.ix_(texts, images)])

    return block


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_chunked_ranks_in_own_dtype_keep_the_float64_tie_rule(dtype) -> None:
    """Ranks from rows kept in float16/32 equal the float64 rule #(x >= gold - 1e-9) (gold included: ties, near-ties
    within 1e-9 too, count against the gold)."""
    rng = np.random.default_rng(3)
    n_texts, n_images = 41, 19
    base = rng.integers(0, 6, size=(n_texts, n_images)).astype(np.float64) * 1e-3  # many exact ties
    step = np.spacing(np.asarray(1e-3, dtype=dtype)).item()
    scores = (base + rng.integers(-2, 3, size=base.shape) * step).astype(dtype)  # neighbours of the tie values
    scores[:3] = 1e-6  # the 1e-9 tolerance is many float32 steps there
    scores[0, 5] = np.asarray(1e-6 - 5e-10, dtype=dtype)  # below gold by less than 1e-9 (float32/64): a tie
    scores[1] = np.asarray(1e-6 - 4e-9, dtype=dtype)  # below gold by more than 1e-9: worse
    scores[1, 0] = 1e-6
    gold = rng.integers(0, n_images, size=n_texts).tolist()
    gold[0], gold[1], gold[2] = 0, 0, 0
    s64 = scores.astype(np.float64)
    expected = (s64 >= s64[np.arange(n_texts), gold][:, None] - 1e-9).sum(1)  # independent, in float64
    got = chunked_ranks(_block_of(scores), n_texts, n_images, gold, text_chunk=6, image_chunk=5)
    assert (got == expected).all()
    assert got[2] == n_images  # row 2 is constant: every image ties with the gold, which ranks last
    if dtype is not np.float16:
        assert got[1] == 1
        assert got[0] == n_images  # all of row 0 is within 1e-9 of the gold


@pytest.mark.parametrize("k", [1, 4, 20])
def test_chunked_ranks_list_each_texts_best_images_as_a_stable_sort(k: int) -> None:
    """`top`: each text's k best images, best first, ties in image order: the first k of a stable argsort of -scores
    (numpy's, independent of vl's partition); a gallery smaller than k fills only its first n_images columns."""
    rng = np.random.default_rng(5)
    n_texts, n_images = 13, 9
    scores = rng.integers(0, 4, size=(n_texts, n_images)).astype(np.float32)  # many ties
    top = np.full((n_texts, k), -1, dtype=np.int64)
    gold = rng.integers(0, n_images, size=n_texts).tolist()
    ranks = chunked_ranks(_block_of(scores), n_texts, n_images, gold, text_chunk=4, image_chunk=5, top=top)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    assert (top[:, : min(k, n_images)] == expected).all()
    assert (top[:, n_images:] == -1).all()
    assert (ranks == chunked_ranks(_block_of(scores), n_texts, n_images, gold, text_chunk=4, image_chunk=5)).all()


def _tiny_vilbert_scoring(make_cfg, region_counts: tuple[int, ...]):
    """(`vilbert_pretrain_tiny` in eval mode, its scoring collator, random region records of those sizes)."""
    from vl.pipeline import build_datamodule, build_model

    cfg = make_cfg("experiment=vilbert_pretrain_tiny")
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, dm).eval()
    rng = np.random.default_rng(0)
    visuals = [
        {
            "features": rng.normal(size=(n, 2048)).astype(np.float32),
            "boxes_norm": np.sort(rng.uniform(0, 1, size=(n, 4)).astype(np.float32), axis=1),
            "cls_prob": rng.dirichlet(np.ones(33), size=n).astype(np.float32),
        }
        for n in region_counts
    ]
    return model, dm.scoring_collator(), visuals


def test_gallery_scores_are_float32_under_bf16_autocast(make_cfg) -> None:
    """Under `precision=bf16-mixed` (autocast) the score head runs in float32 on the encoder's pooled output: scores
    equal the float32 head applied to the autocast pooled vectors, not bfloat16-rounded ones (which tie, and every
    tie counts against the gold)."""
    model, collator, visuals = _tiny_vilbert_scoring(make_cfg, (3, 8, 5, 6))
    texts = ["a dog on a red sofa", "two people", "x"]
    head = model.pair_scorer()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = gallery_scorer(model, collator, texts, visuals, batch_size=4)([0, 1, 2], [0, 1, 2, 3])
        pooled = [[model(collator([{"text": t, "visual": v}])).pooled for v in visuals] for t in texts]
        rounded = torch.tensor([[head(p).float().item() for p in row] for row in pooled])
    exact = torch.tensor([[head(p.float()).item() for p in row] for row in pooled])
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-5)
    assert (rounded == rounded.bfloat16().float()).all() and not (got == got.bfloat16().float()).all()


def test_a_collapsed_scorer_ranks_every_gold_last() -> None:
    """The same score for every image (e.g. dead ReLU poolers: the head's bias alone) gives R@1 = 0, never 1; the
    shortlist (k = N) agrees."""
    n_texts, n_images = 7, 11
    scores = np.full((n_texts, n_images), 0.25, dtype=np.float32)
    gold = list(range(n_texts))
    ranks = chunked_ranks(_block_of(scores), n_texts, n_images, gold, text_chunk=3, image_chunk=4)
    assert (ranks == n_images).all()
    short = shortlist_ranks(_block_of(scores), np.zeros((n_texts, n_images)), gold, k=n_images)
    assert (short == ranks).all()


def test_top_k_mask_is_the_stable_sort_top_k_with_ties() -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 4, size=(50, 13)).astype(np.float32)  # heavy ties at the k-th value
    for k in (1, 3, 7, 12, 13, 20):
        expected = np.zeros(rows.shape, dtype=bool)
        order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
        np.put_along_axis(expected, order, True, axis=1)
        assert (_top_k_mask(rows, k) == expected).all(), k


def test_shortlist_ranks_match_brute_force_and_chunked_cheap_rows() -> None:
    rng = np.random.default_rng(5)
    n_texts, n_images, k = 33, 21, 6
    scores = rng.normal(size=(n_texts, n_images))
    cheap = rng.integers(0, 5, size=(n_texts, n_images)).astype(np.float32)  # ties in the cheap similarity
    gold = rng.integers(0, n_images, size=n_texts).tolist()
    expected = np.full(n_texts, k + 1)
    for t, g in enumerate(gold):  # independent: stable sort, then count within the shortlist
        shortlist = np.argsort(-cheap[t], kind="stable")[:k]
        if g in shortlist:
            expected[t] = 1 + (scores[t, shortlist] > scores[t, g] + 1e-9).sum()
    block = _block_of(scores)
    assert (shortlist_ranks(block, cheap, gold, k=k, text_chunk=4) == expected).all()
    rows = shortlist_ranks(block, lambda ts: cheap[ts], gold, k=k, text_chunk=5, n_images=n_images)
    assert (rows == expected).all()
    calls = []

    def pairs(texts: list[int], images: list[int]) -> torch.Tensor:  # the batched re-rank path (gallery_scorer's)
        calls.append(len(texts))
        return torch.from_numpy(scores[texts, images])

    block.pairs = pairs
    assert (shortlist_ranks(block, cheap, gold, k=k, text_chunk=8) == expected).all()
    assert len(calls) <= 5 and sum(calls) == k * int((expected <= k).sum())  # one call per chunk, k pairs per hit
    del block.pairs
    exhaustive = chunked_ranks(block, n_texts, n_images, gold, text_chunk=7, image_chunk=4)
    full = shortlist_ranks(block, lambda ts: cheap[ts], gold, k=n_images, text_chunk=5, n_images=n_images)
    assert (full == exhaustive).all()  # k = N is the exhaustive ranking
    bad = cheap.copy()
    bad[9, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite cheap similarity among texts 8..11"):
        shortlist_ranks(block, bad, gold, k=k, text_chunk=4)


def _shortlist_peak(n_texts: int, n_images: int, *, text_chunk: int, k: int = 10) -> int:
    """Traced peak bytes (tracemalloc: numpy buffers) of `shortlist_ranks` with a synthetic dual encoder."""
    rng = np.random.default_rng(0)
    text_emb = rng.standard_normal((n_texts, 16)).astype(np.float32)
    image_emb = rng.standard_normal((n_images, 16)).astype(np.float32)
    gold = (np.arange(n_texts) % n_images).tolist()

    def block(texts: list[int], images: list[int]) -> torch.Tensor:
        return torch.from_numpy(text_emb[texts] @ image_emb[images].T)

    tracemalloc.start()
    try:
        shortlist_ranks(
            block, lambda ts: text_emb[ts] @ image_emb.T, gold, k=k, text_chunk=text_chunk, n_images=n_images
        )
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_shortlist_memory_is_one_caption_chunk_times_images() -> None:
    """At a fixed caption chunk, the traced peak grows at most linearly in images and (beyond the O(captions) rank
    vector) not with captions: far below the captions x images matrix of float32 the old shortlist built."""
    chunk = 64
    base = _shortlist_peak(1024, 500, text_chunk=chunk)
    four_x_images = _shortlist_peak(1024, 2000, text_chunk=chunk)
    four_x_captions = _shortlist_peak(4096, 500, text_chunk=chunk)
    assert four_x_images <= 4.5 * base, (base, four_x_images)
    assert four_x_captions <= base + 3 * 1024 * 8 * 2, (base, four_x_captions)  # + the int64 ranks of 3072 captions
    assert four_x_captions < 0.1 * 4096 * 500 * 4, four_x_captions


class _CountingTokenizer:
    """Wraps a tokenizer and counts how often each text is tokenised."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.counts = tokenizer, {}

    def __call__(self, texts, *args, **kwargs):
        for t in texts:
            self.counts[t] = self.counts.get(t, 0) + 1
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_gallery_scorer_equals_per_pair_collation_and_tokenises_once(make_cfg) -> None:
    """Scores from cached tokens and padded images equal each pair collated and scored alone (the path before), and
    the exhaustive ranking tokenises each caption once, not once per image chunk."""
    model, collator, visuals = _tiny_vilbert_scoring(make_cfg, (3, 8, 12, 5, 1, 8, 9))  # fewer / more than max_regions
    rng = np.random.default_rng(1)
    texts = ["a dog on a red sofa", "two people", "a very long caption " * 8, "x", "the cat sat on the mat"]
    head = model.pair_scorer()
    with torch.no_grad():
        alone = torch.tensor(
            [[head(model(collator([{"text": t, "visual": v}])).pooled).item() for v in visuals] for t in texts]
        )
    counting = _CountingTokenizer(collator.tokenizer)
    collator.tokenizer = counting
    score = gallery_scorer(model, collator, texts, visuals, batch_size=4)
    got = torch.cat([torch.cat([score([t], [i]) for i in range(len(visuals))], 1) for t in range(len(texts))])
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
    pick_t, pick_i = rng.integers(0, len(texts), size=23).tolist(), rng.integers(0, len(visuals), size=23).tolist()
    torch.testing.assert_close(score.pairs(pick_t, pick_i), alone[pick_t, pick_i], rtol=0, atol=1e-5)
    ranks = chunked_ranks(score, len(texts), len(visuals), [0, 1, 2, 3, 4], text_chunk=2, image_chunk=3)
    # each caption tokenised once in all of the above (the collator keeps each text's ids: `Collator.encode`), not
    # once per image chunk
    assert counting.counts == {t: 1 for t in texts}
    expected = 1 + (alone > alone[torch.arange(5), torch.arange(5)][:, None] + 1e-9).sum(1)
    assert ranks.tolist() == expected.tolist()


def _bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_bench(name: str, *args: str, data: Path, monkeypatch, capsys) -> str:
    """What `python bench/<name>.py <args> --repeats 1` prints (its corpus under `data`; torch's thread count, which
    the bench sets, restored)."""
    monkeypatch.setattr("sys.argv", [name, *args, "--repeats", "1", "--data-dir", str(data / "data")])
    threads = torch.get_num_threads()
    try:
        _bench(name).main()
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_retrieval_bench_ranks_agree_at_a_small_size() -> None:
    """bench/retrieval_memory.py's table asserts chunked == naive and shortlist == min(naive, k + 1); no timings."""
    out = _bench("retrieval_memory").machinery(300, 70, k=5, dim=8, text_chunk=40, image_chunk=30)
    assert set(out) == {"naive", "chunked", "shortlist"}
    assert out["shortlist"][2] < out["naive"][2]  # traced peak: one chunk x images, not captions x images


@pytest.mark.slow
def test_train_step_bench_runs_every_variant(tmp_path, monkeypatch, capsys) -> None:
    """bench/train_step.py end to end at a few steps (its numbers are not checked: tests never assert timings)."""
    printed = _run_bench(
        "train_step", "--steps", "6", "--warmup", "2", data=tmp_path, monkeypatch=monkeypatch, capsys=capsys
    )
    assert "real / bare per step" in printed and "minimal / bare per step" in printed
    assert "lightning / bare per step" in printed


@pytest.mark.slow
def test_train_step_bench_unguarded_variant_runs_without_the_guard(tmp_path, monkeypatch, capsys) -> None:
    """`--variants unguarded` (the guard's cost: minimal - unguarded) really fits with the divergence guard off, and
    `minimal` with it on: the guard's check (`all_finite`) counted in each fit."""
    import vl.models.reliable as reliable

    calls = {"n": 0}
    real_check = reliable.all_finite

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real_check(*args, **kwargs)

    monkeypatch.setattr(reliable, "all_finite", counted)
    bench = _bench("train_step")
    seen = {}
    for variant in ("unguarded", "minimal"):
        calls["n"] = 0
        cfg = bench.compose_cfg(str(tmp_path / "data"), str(tmp_path / variant))
        ratios = bench.paired_fit(cfg, 6, 2, variant=variant, output_dir=str(tmp_path / variant))
        seen[variant] = calls["n"]
        assert ratios and all(r > 0 for r in ratios)
    assert seen == {"unguarded": 0, "minimal": 6}
    printed = _run_bench(
        "train_step",
        "--steps",
        "6",
        "--warmup",
        "2",
        "--variants",
        "unguarded",
        "--set",
        "model.encoder.text_encoder.intermediate_size=128",  # --set: another size than the tiny default
        data=tmp_path,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert "unguarded / bare per step" in printed
    assert '"Lightning (unguarded) / bare loop per step (model.encoder.text_encoder.intermediate_size=128)"' in printed


@pytest.mark.slow
def test_step_parts_bench_times_the_guard_both_ways(tmp_path, monkeypatch, capsys) -> None:
    """bench/step_parts.py end to end at one epoch (numbers not checked)."""
    printed = _run_bench(
        "step_parts", "--epochs", "1", "--warmup", "2", data=tmp_path, monkeypatch=monkeypatch, capsys=capsys
    )
    assert "module guard (on_before_optimizer_step)" in printed and "Throughput.on_train_batch_end" in printed
    assert "looked-up rows / read in full" in printed


@pytest.mark.parametrize("bad", [0, -3])
def test_zero_shot_retrieval_rejects_a_bad_shortlist_k_before_compute(bad, tmp_path) -> None:
    """Types are checked by the task schema while Hydra composes (tests/test_configs.py); the range here."""
    from omegaconf import OmegaConf

    from vl.errors import ConfigError
    from vl.eval.retrieval import zero_shot_retrieval

    with pytest.raises(ConfigError, match="task.shortlist_k: must be an integer >= 1"):
        zero_shot_retrieval(  # no data, no model built
            cfg=OmegaConf.create({}), run_cfg=OmegaConf.create({}), output_dir=tmp_path, shortlist_k=bad
        )
