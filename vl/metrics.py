"""torchmetrics `Metric`s shared by all architectures (states are sums, so they sync correctly under DDP)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class Accuracy(Metric):
    """Fraction of correct predictions. `update(preds (N,), target (N,))`; entries with target == ignore_index skipped."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.add_state("correct", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        keep = target != self.ignore_index
        self.correct += (preds[keep] == target[keep]).sum().float()
        self.total += keep.sum().float()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


class VQAAccuracy(Metric):
    """Soft VQA accuracy: the soft score (0/0.3/0.6/0.9/1) of the arg-max answer, averaged over questions.

    `update(logits (N, A), scores (N, A))`.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("score", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, scores: torch.Tensor) -> None:
        pred = logits.argmax(dim=-1, keepdim=True)
        self.score += scores.gather(1, pred).sum().float()
        self.total += float(logits.shape[0])

    def compute(self) -> torch.Tensor:
        return self.score / self.total.clamp(min=1)


class RetrievalRecall(Metric):
    """Recall@k, median and mean rank from the rank (1 = best) of each query's gold item.

    `update(ranks (N,))`: ranks are computed by the caller in chunks (`vl.eval.retrieval.chunked_ranks`), so memory grows
    with the number of queries, never with queries x items (torchmetrics.retrieval keeps every score).

    `median`: how `median_rank` is computed. "seed" (default): ViLBERT's `eval_retrieval.py`,
    `floor(np.median(rank0) + 1)` on 0-based ranks, i.e. for an even N the mean of the two middle ranks, then floored
    (ranks 1, 1, 5, 5 -> 3). "lower": `torch.median`, the lower of the two middle ranks (1, 1, 5, 5 -> 1).
    """

    full_state_update = False
    higher_is_better = True

    MEDIANS = ("seed", "lower")

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10), median: str = "seed") -> None:
        super().__init__()
        if median not in self.MEDIANS:
            raise ValueError(f"RetrievalRecall: median '{median}' is not one of {self.MEDIANS}")
        self.ks = ks
        self.median = median
        self.add_state("ranks", default=[], dist_reduce_fx="cat")

    def update(self, ranks: torch.Tensor) -> None:
        self.ranks.append(ranks.flatten().float())

    def compute(self) -> dict[str, torch.Tensor]:
        ranks = torch.cat(self.ranks) if isinstance(self.ranks, list) else self.ranks
        out = {f"recall@{k}": (ranks <= k).float().mean() for k in self.ks}
        out["median_rank"] = median_rank(ranks) if self.median == "seed" else ranks.median()
        out["mean_rank"] = ranks.mean()
        return out


def median_rank(ranks: torch.Tensor) -> torch.Tensor:
    """ViLBERT's medR of 1-based `ranks` (N,): `floor(np.median(ranks - 1) + 1)` (the mean of the two middle values
    for an even N, then floored); NaN for N = 0."""
    values = ranks.flatten().double().sort().values
    n = len(values)
    if n == 0:
        return torch.tensor(float("nan"), device=ranks.device)
    middle = (values[(n - 1) // 2] + values[n // 2]) / 2  # the two middle values (the same one for an odd N)
    return middle.floor().to(ranks.dtype if ranks.is_floating_point() else torch.float32)  # median(r-1)+1 = median(r)
