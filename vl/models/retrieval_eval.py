"""Retrieval evaluation inside validation and test (`RetrievalEvaluation`, a LightningModule base
`vl.models.system.VLSystem` builds on).

When the data module says a stage's examples are retrieval queries (its `gallery(split)` hook, asked once per epoch),
each query batch ranks its gold image among the whole gallery of the split by cross-encoder scores, in chunks
(`vl.models.ranking`), instead of computing losses; `<stage>/recall@k`, median and mean rank are logged at the
epoch's end, and the test ranks join the run's predictions with each query's `TOP_IMAGES` best images. The scorer is
the fine-tuned `retrieval` head, else ITM's aligned probability, ranked by its log-odds (`pair_scorer`; a system may
override it).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from vl.errors import ConfigError
from vl.metrics import RetrievalRecall
from vl.models.ranking import chunked_ranks, gallery_scorer

__all__ = ["TOP_IMAGES", "RetrievalEvaluation", "aligned_logit"]

#: images listed per test query in the predictions file, best first (the seed's `eval_retrieval.py` writes 20)
TOP_IMAGES = 20


def aligned_logit(logits: torch.Tensor) -> torch.Tensor:
    """(N, 2) ITM logits (1 = aligned) -> (N,) the log-odds of "aligned", whose order is softmax(logits)[:, 1]'s."""
    return logits[:, 1] - logits[:, 0]


class RetrievalEvaluation(L.LightningModule):
    """Gallery ranking for val/test retrieval queries (see the module docstring). Needs `objectives` (the heads),
    `predictions` (the test predictions list) and `_datamodule()` from the system; `init_retrieval()` sets up its own
    state."""

    def init_retrieval(self) -> None:
        """The gallery per stage (filled on first use), the scoring batch size and the rank metrics (metric states,
        no parameters)."""
        self._gallery: dict[str, Any] = {}
        self.retrieval_batch_size = 256  # (text, image) pairs per forward when ranking a retrieval gallery
        self.retrieval_metrics = nn.ModuleDict({f"{stage}_": RetrievalRecall() for stage in ("val", "test")})

    def pair_scorer(self) -> Any:
        """(pooled (N, H)) -> (N,) image-text match score: the fine-tuned `retrieval` head, else ITM's aligned
        probability ranked by its logit, logit(aligned) - logit(not aligned): the same order as softmax(.)[:, 1]
        (a monotone function of it), without its float32 saturation (past a gap of ~16.6 the probability is exactly
        1.0, so confident pairs tied, and a tie counts against the gold)."""
        if "retrieval" in self.objectives:
            return self.objectives["retrieval"].score
        if "itm" in self.objectives:
            return lambda pooled: aligned_logit(self.objectives["itm"].classifier(pooled))
        raise ConfigError("retrieval needs a model with a 'retrieval' or 'itm' head")

    @torch.no_grad()
    def retrieval_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        """Rank each query's gold image among the whole gallery of the split (`datamodule.gallery(split)`) by
        cross-encoder scores, in chunks; updates `<stage>/recall@k`, median and mean rank."""
        gallery, collator = self._stage_gallery(stage)
        texts = [gallery["texts"][int(q)] for q in batch["query_index"]]
        score = gallery_scorer(self, collator, texts, gallery["visuals"], batch_size=self.retrieval_batch_size)
        top = np.zeros((len(texts), TOP_IMAGES), dtype=np.int64) if stage == "test" else None
        ranks = chunked_ranks(
            score,
            len(texts),
            len(gallery["visuals"]),
            batch["gold"].tolist(),
            text_chunk=len(texts),
            image_chunk=max(1, self.retrieval_batch_size // max(1, len(texts))),
            top=top,
        )
        metric = self.retrieval_metrics[f"{stage}_"]
        metric.update(torch.as_tensor(ranks, device=self.device))
        if stage == "test":
            self.predictions.extend(
                {"key": int(q), "query_index": int(q), "rank": int(r), "top": best[: len(gallery["visuals"])].tolist()}
                for q, r, best in zip(batch["query_index"], ranks, top)
            )
        return torch.zeros((), device=self.device)

    def _stage_gallery(self, stage: str) -> tuple[dict[str, Any], Any] | None:
        """(gallery, scoring collator) when the data module says `stage`'s examples are retrieval queries (its
        `gallery(split)` hook), else None; asked once per epoch."""
        if stage not in self._gallery:
            dm = self._datamodule()
            gallery = dm.gallery(stage) if dm is not None else None
            self._gallery[stage] = None if gallery is None else (gallery, dm.scoring_collator())
        return self._gallery[stage]

    def _log_retrieval(self, stage: str) -> None:
        metric = self.retrieval_metrics[f"{stage}_"]
        if metric.update_called:
            for key, value in metric.compute().items():
                self.log(f"{stage}/{key}", value, prog_bar=key == "recall@1", sync_dist=False)
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")
        self._gallery.pop("val", None)
