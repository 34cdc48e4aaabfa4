"""MM-BERT's test stage (a mixin of `MMBertSystem`, listed before `VLSystem` in its bases): greedy MT decoding and
BLEU on MT data (`vl.models.translation.greedy_translate`), and the exhaustive caption x image retrieval test with
its seed-layout scores files on retrieval data (`vl.models.ranking.exhaustive_retrieval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vl.models.ranking import exhaustive_retrieval, translation_retrieval
from vl.models.translation import greedy_translate


class MMBertTestStage:
    """`test_step` and `on_test_epoch_end` of `MMBertSystem` (module docstring)."""

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """MT data: translate the batch's sources greedily (`vl.models.translation.greedy_translate`); other data: the
        shared test step."""
        dm = self._datamodule()
        if getattr(dm, "task", None) != "mt":
            return super().test_step(batch, batch_idx)
        examples = [dm.datasets["test"][int(i)] for i in batch["index"]]
        hypotheses = greedy_translate(
            self,
            dm.collator("test"),
            examples,
            dm.tokenizer,
            max_steps=int(getattr(dm, "mt_max_steps", 49)),
            seq_len=getattr(dm, "mt_seq_len", 150),
            detokenize=getattr(dm, "mt_detokenize", "seed"),
        )
        self.predictions.extend(
            {
                "key": int(i),
                "index": int(i),
                "hypothesis": h,
                "reference": ex["reference"],
                "image_dependent": bool(ex.get("image_dependent")),
            }
            for i, h, ex in zip(batch["index"], hypotheses, examples)
        )
        return torch.zeros((), device=self.device)

    def on_test_epoch_end(self) -> None:
        """MT data: BLEU of the greedy translations (the seed's `seed_bleu` and plain sacrebleu; also over the records
        marked ``image_dependent``, when there are any); hypotheses file via
        the data module. Retrieval data: also score every caption x image pair of the test split per language (both
        directions, R@1/5/10, median rank: ``test/<en|de>_<t2i|i2t>_*``) and write the seed-layout scores file
        ``retrieval_scores_<lang>.json``; with joint rows (``data.both_layout: joint``) one matrix of the
        ``[CLS] EN [SEP] DE [SEP]`` captions x images, as the seed's test writes for both languages: ``test/both_*``,
        ``retrieval_scores_both.json``. Translation data: every EN x DE caption pair of the test split on EN's image
        (``test/translation_<de|en>_*``, the seed's ``translation_scores.json``; `translation_retrieval`)."""
        dm = self._datamodule()
        if getattr(dm, "task", None) == "mt":
            import sacrebleu

            from vl.data.multi30k_text import seed_bleu

            preds = sorted(self.gathered_predictions(), key=lambda p: p["index"])
            hyps, refs = [p["hypothesis"] for p in preds], [p["reference"] for p in preds]
            if hyps:
                self.log("test/bleu", seed_bleu(hyps, refs), sync_dist=False)
                self.log("test/bleu_plain", sacrebleu.corpus_bleu(hyps, [refs]).score, sync_dist=False)
            subset = [p for p in preds if p.get("image_dependent")]
            if subset:  # sentences whose German needs the image (the embedded corpus marks them)
                hyps, refs = [p["hypothesis"] for p in subset], [p["reference"] for p in subset]
                self.log("test/bleu_image_dependent", seed_bleu(hyps, refs), sync_dist=False)
        super().on_test_epoch_end()
        if dm is None or not getattr(dm, "exhaustive_test", False):
            return
        if getattr(dm, "task", None) == "translation":  # every EN x DE pair on EN's image, ranked both ways
            en, de, visuals = dm.translation_pairs("test")
            root = Path(self.trainer.default_root_dir)
            metrics = translation_retrieval(
                self,
                dm.scoring_collator(),
                en,
                de,
                visuals,
                batch_size=self.retrieval_batch_size,
                scores_path=root / "translation_scores.json" if self.trainer.is_global_zero else None,
            )
            for key, value in metrics.items():
                self.log(f"test/translation_{key}", value, sync_dist=False)
            return
        if getattr(dm, "task", None) != "retrieval":
            return
        # the joint layout (the seed's `LANGUAGES_USED: both`): one matrix, [CLS] EN [SEP] DE [SEP] caption x image
        for lang in ("both",) if getattr(dm, "joint", False) else ("en", "de"):
            gallery = dm.gallery("test", language=lang)
            scores_path = None
            if self.trainer.is_global_zero:
                scores_path = Path(self.trainer.default_root_dir) / f"retrieval_scores_{lang}.json"
            metrics = exhaustive_retrieval(
                self,
                dm.scoring_collator(),
                gallery["texts"],
                gallery["visuals"],
                batch_size=self.retrieval_batch_size,
                scores_path=scores_path,
            )
            for key, value in metrics.items():
                self.log(f"test/{lang}_{key}", value, sync_dist=False)
