"""VG-BERT's whole-split retrieval (a mixin of `VGBertSystem`, listed before `VLSystem` in its bases): validation and
test keep each batch's image and caption embeddings from the retrieval head (`vg_contrastive` in stage 2,
`vg_transfer` in transfer), and at the epoch's end rank the whole split (images <-> captions, gathered from every rank)
with the head's similarity: `<stage>/r1_i2t`, `r5_i2t`, `r10_i2t`, `r1_t2i`, ... and `r*_mean`
(`vl.models.ranking.recall_at_k`), and `<stage>/retrieval_size`."""

from __future__ import annotations

from typing import Any

import torch

from vl.batch import EncoderOutput
from vl.heads.vg_bert import GroundingContrastive
from vl.models.ranking import recall_at_k


class VGBertSplitRetrieval:
    """`forward` keeps the encoder output of an evaluation batch; `store_retrieval_embeddings` (called by the system's
    `shared_step`) turns it into the head's embeddings; the epoch-end hooks rank them (module docstring)."""

    RETRIEVAL_HEADS = ("vg_contrastive", "vg_transfer")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_out: EncoderOutput | None = None
        self._store: dict[str, list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]] = {}

    def _retrieval_head(self) -> Any:
        for name in self.RETRIEVAL_HEADS:
            if name in self.objectives:
                return self.objectives[name]
        return None

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        out = self.encoder(batch)
        self._last_out = out if not self.training else None
        return out

    def store_retrieval_embeddings(self, batch: dict[str, Any], stage: str) -> None:
        """Outside training: the retrieval head's (image, caption) embeddings of the batch just run, on the CPU."""
        head = self._retrieval_head()
        if stage != "train" and head is not None and self._last_out is not None:
            with torch.no_grad():
                parts = head.embeddings(self._last_out, batch)
            if isinstance(head, GroundingContrastive):
                item = ((parts[0].detach().cpu(),), (parts[1].detach().cpu(), parts[2].detach().cpu()))
            else:
                item = ((parts[0].detach().cpu(),), (parts[1].detach().cpu(),))
            self._store.setdefault(stage, []).append(item)
        self._last_out = None

    def _log_split_retrieval(self, stage: str) -> None:
        items = self._store.pop(stage, [])
        head = self._retrieval_head()
        if head is None:
            return
        items = self.from_all_ranks(items)
        if not items:
            return
        images = tuple(torch.cat([it[0][i] for it in items]) for i in range(len(items[0][0])))
        texts = tuple(torch.cat([it[1][i] for it in items]) for i in range(len(items[0][1])))
        with torch.no_grad():
            sim = head.score(images, texts)
        for key, value in recall_at_k(sim).items():
            self.log(f"{stage}/{key}", value, sync_dist=False, prog_bar=key == "r1_mean")
        self.log(f"{stage}/retrieval_size", float(sim.shape[0]), sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()  # type: ignore[misc]
        self._log_split_retrieval("val")

    def on_test_epoch_end(self) -> None:
        self._log_split_retrieval("test")
        super().on_test_epoch_end()  # type: ignore[misc]
