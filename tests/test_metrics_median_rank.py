"""`RetrievalRecall`'s median rank against ViLBERT's `eval_retrieval.py` formula, computed with numpy here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vl.metrics import RetrievalRecall


def seed_medr(ranks: np.ndarray) -> float:
    """vilbert_beta / vilbert-multi-task `eval_retrieval.py`: `rank_matrix` holds 0-based ranks,
    `medr = np.floor(np.median(rank_matrix) + 1)`."""
    rank_matrix = ranks - 1
    return float(np.floor(np.median(rank_matrix) + 1))


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 999, 1000, 5001])
def test_median_rank_is_the_seeds_formula_on_even_and_odd_n(n: int) -> None:
    rng = np.random.default_rng(n)
    ranks = rng.integers(1, 60, size=n)
    metric = RetrievalRecall()
    for part in np.array_split(ranks, 3):  # several updates, as the chunked evaluation makes them
        metric.update(torch.from_numpy(part))
    assert float(metric.compute()["median_rank"]) == seed_medr(ranks)


def test_even_n_takes_the_mean_of_the_middle_ranks_then_floors() -> None:
    for ranks, expected in (([1, 1, 5, 5], 3.0), ([1, 2], 1.0), ([2, 5], 3.0), ([3, 3, 4, 8], 3.0)):
        metric = RetrievalRecall()
        metric.update(torch.tensor(ranks))
        got = float(metric.compute()["median_rank"])
        assert got == expected == seed_medr(np.array(ranks)), ranks


def test_lower_median_option_keeps_torch_median() -> None:
    ranks = [1, 1, 5, 5, 7, 2]
    metric = RetrievalRecall(median="lower")
    metric.update(torch.tensor(ranks))
    assert float(metric.compute()["median_rank"]) == float(sorted(ranks)[(len(ranks) - 1) // 2])
    with pytest.raises(ValueError, match="median"):
        RetrievalRecall(median="upper")
