"""MM-BERT's cosine-distance translation retrieval (`evaluate.py task=distance_translation`): no training; each EN
caption and each DE caption of a Multi30k split is encoded on its own by a trained MM-BERT, its vector is the last
layer's state at [CLS], and captions are ranked across languages by the cosine of the two vectors.

The seed's pieces (phaedonmit/VL-BERT, reference only):
- rows (`retrieval/data/datasets/distance_translation_multi30k*.py`): `[CLS] caption [SEP]`, token type 0, one row per
  annotation line, EN (`LANGUAGES_USED: first`) and DE (`second`) in two passes; no masking, no flip;
- vectors (`retrieval/modules/resnet_vlbert_for_distance_translation_{no,with}_vision.py`, `cls_output =
  text_out[:, 0, :]`): without vision the row's text visual embedding is the learned aux-text embedding and it has no
  objects (as the aux text corpus's rows: `aux_text` in vl's batch); with vision the row carries its line's image
  (the same image for EN i and DE i), as a retrieval row;
- files (`retrieval/function/test_distance_translation.py`): `[{caption_en_index, caption_de_index, logit: [H
  floats]}]` per language, vl's `distance_<en|de>_<split>.json` in the run's output dir;
- scores (`retrieval/evaluate_distance.py`): the EN x DE cosine matrix in float64, `np.argsort(cos, axis=1)[:, ::-1]`,
  R@1 / 5 / 10 with the gold at the same index: "German caption retrieval" (an EN query ranks every DE caption:
  `<split>/distance_de_recall@k`) and "English caption retrieval" (the transpose: `distance_en_recall@k`), as
  fractions (the seed prints percentages); `..._chance` = k / N.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from vl.errors import ConfigError

__all__ = ["RECALL_AT", "caption_vectors", "distance_recalls", "distance_translation", "write_vectors"]

RECALL_AT = (1, 5, 10)


def distance_recalls(en: np.ndarray, de: np.ndarray, prefix: str = "test") -> dict[str, float]:
    """`evaluate_distance.py` on (N, H) EN and DE vectors (row i of each: line i): R@k of DE retrieval (EN queries) and
    EN retrieval (DE queries), and their chance k / N."""
    x, y = np.asarray(en, dtype=np.float64), np.asarray(de, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or not len(x):
        raise ValueError(f"distance_recalls: EN vectors {x.shape} and DE vectors {y.shape} must both be (N, H), N > 0")
    cos = (x @ y.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1))
    answers = np.arange(len(x))
    metrics: dict[str, float] = {}
    for gallery, scores in (("de", cos), ("en", cos.T)):
        order = np.argsort(scores, axis=1)[:, ::-1]
        for k in RECALL_AT:
            hits = sum(int(np.sum(order[:, position] == answers)) for position in range(min(k, len(x))))
            metrics[f"{prefix}/distance_{gallery}_recall@{k}"] = hits / len(x)
            metrics[f"{prefix}/distance_{gallery}_recall@{k}_chance"] = min(k, len(x)) / len(x)
    return metrics


@torch.no_grad()
def caption_vectors(
    model: torch.nn.Module, collator: Any, examples: Sequence[dict[str, Any]], *, batch_size: int, device: str
) -> np.ndarray:
    """(N, H) float32: the encoder's last-layer state at each row's [CLS] (text position 0), rows in `batch_size`
    blocks of fixed shape (a row's vector does not depend on the rows beside it); `examples` is indexed one block at
    a time, so a dataset reads only that block's images."""
    out = []
    for start in range(0, len(examples), batch_size):
        batch = collator([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out.append(model(batch).text[:, 0].float().cpu().numpy())
    return np.concatenate(out)


def write_vectors(path: Path, vectors: np.ndarray) -> Path:
    """The seed's result file: `[{"caption_en_index": i, "caption_de_index": i, "logit": [H floats]}]`."""
    rows = [{"caption_en_index": i, "caption_de_index": i, "logit": v.tolist()} for i, v in enumerate(vectors)]
    path.write_text(json.dumps(rows))
    return path


def distance_translation(
    *,
    cfg: DictConfig,
    run_cfg: DictConfig,
    output_dir: Path,
    vision: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, float]:
    """`evaluate.py ckpt_path=<MM-BERT run> task=distance_translation [task.vision=true]` on `split` (default test)
    of the run's Multi30k data (see the module docstring). `vision`: false (the seed's `translate_distance_no_vision`
    config: captions alone, the aux-text visual embedding), true (`translate_distance_with_vision`: each caption with
    its line's image). Writes `distance_<en|de>_<split>.json` (the seed's format) into `output_dir`."""
    from vl.build import build_datamodule, model_from_checkpoint
    from vl.checkpoint import read_checkpoint
    from vl.data.multi30k import Multi30kDataModule
    from vl.data.multi30k_collate import Multi30kCollator
    from vl.data.multi30k_examples import Multi30kExamples
    from vl.models.mm_bert import MMBertEncoder

    if int(batch_size) < 1:
        raise ConfigError(f"task.batch_size: must be an integer >= 1, got {batch_size!r}")
    split = str(cfg.get("split", "test"))
    dm = build_datamodule(run_cfg)
    if not isinstance(dm, Multi30kDataModule):
        raise ConfigError(
            f"task=distance_translation: the run's data must be a Multi30k corpus (data=multi30k*, MM-BERT), got "
            f"{type(dm).__name__}"
        )
    state = read_checkpoint(cfg.ckpt_path, "ckpt_path")  # weights_only: a file that would run code is refused
    model = model_from_checkpoint(run_cfg, state, cfg.ckpt_path)
    if not isinstance(getattr(model, "encoder", None), MMBertEncoder):
        raise ConfigError(f"task=distance_translation: {cfg.ckpt_path} is not an MM-BERT run (model=mm_bert)")
    model.eval().to(device)
    _, records, images = dm.records(split, mlt=False)  # the plain annotation file (a line per image), as the seed's
    collator = Multi30kCollator(
        dm.tokenizer,
        max_text_len=dm.max_text_len,
        max_regions=dm.max_regions,
        fixed_shapes=True,
        aux_text=not vision,
        seq_len=dm.seq_len,
    )
    vectors = {}
    for language in ("en", "de"):
        rows = [{"text": r[f"caption_{language}"], "image": im if vision else None} for r, im in zip(records, images)]
        examples = Multi30kExamples(rows, dm.max_regions)
        vectors[language] = caption_vectors(model, collator, examples, batch_size=int(batch_size), device=device)
        write_vectors(Path(output_dir) / f"distance_{language}_{split}.json", vectors[language])
    return distance_recalls(vectors["en"], vectors["de"], prefix=split)
