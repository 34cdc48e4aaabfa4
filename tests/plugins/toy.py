"""A sixth system written as files outside `vl` only (the contract new systems follow; README: "Adding things").

- a corpus in its own format, `toy/{split}.tsv` (`<colour word>\t<r> <g> <b>`: a word and a noisy RGB "image"), with
  its reader and writer, and a DataModule that composes the shared collate helpers and declares its label key;
- an architecture: a tiny dual encoder (mean word embedding | MLP over the image), injected into the shared
  `VLSystem` by `conf/model/toy_dual.yaml`;
- a head: in-batch contrastive matching of the text and image embeddings, declaring what it needs and consumes.

Configs live in `tests/plugins/conf/` (put on Hydra's search path: `--config-dir tests/plugins/conf` or
`hydra.searchpath=[file://...]`); nothing under `vl/` or `conf/` knows about any of this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics import Metric

from vl.batch import EncoderOutput
from vl.data.base import VLDataModule
from vl.data.samplers import split_key
from vl.errors import DataError
from vl.heads import HeadContext, Objective, ObjectiveResult
from vl.metrics import Accuracy

COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
}
NAMES = sorted(COLOURS)
NO_BOX = np.zeros((1, 4), np.float32)


# ------------------------------------------------------------------------------------------------ format
def write_toy_corpus(root: Path, *, sizes: dict[str, int], noise: float = 0.15, seed: int = 0) -> Path:
    """Write `root/toy/{split}.tsv`: one `<colour>\t<r> <g> <b>` line per example (RGB = the colour + noise)."""
    rng = np.random.default_rng(seed)
    (root / "toy").mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        lines = []
        for _ in range(n):
            name = NAMES[int(rng.integers(len(NAMES)))]
            rgb = np.asarray(COLOURS[name]) + noise * rng.standard_normal(3)
            lines.append(f"{name}\t{' '.join(f'{v:.4f}' for v in rgb)}\n")
        (root / "toy" / f"{split}.tsv").write_text("".join(lines))
    return root


def read_toy_tsv(path: Path) -> list[tuple[str, np.ndarray]]:
    """The reader of the format; a bad line fails naming file and line."""
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        word, _, rgb = line.partition("\t")
        values = rgb.split()
        if word not in COLOURS or len(values) != 3:
            raise DataError(f"{path}:{lineno}: expected '<colour>\\t<r> <g> <b>'")
        out.append((word, np.asarray([float(v) for v in values], np.float32)))
    return out


# ------------------------------------------------------------------------------------------------ corpus
class ToyPairs(Dataset):
    def __init__(self, rows: list[tuple[str, np.ndarray]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        word, rgb = self.rows[index]
        visual = {"features": rgb.reshape(1, 3), "boxes_norm": NO_BOX}  # one "region": the whole image
        return {"text": word, "visual": visual, "colour_id": NAMES.index(word), "index": index, "epoch": epoch}


class ToyColoursDataModule(VLDataModule):
    """`data=toy_colours`: (colour word, RGB) pairs; the shared collator tokenises and pads, this corpus declares its
    label key. `baselines`: the chance accuracy of in-batch matching on the test batches."""

    label_keys = {"colour_id": ("colour_ids", "long")}

    def __init__(self, *, tsv: str = "toy/{split}.tsv", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tsv = tsv

    def required_files(self) -> list[Path]:
        return [self.path(self.tsv, split) for split in ("train", "val", "test")]

    def build_dataset(self, split: str) -> ToyPairs:
        return ToyPairs(read_toy_tsv(self.path(self.tsv, split)))

    @property
    def info(self) -> dict[str, Any]:
        return {"visual_dim": 3}

    def baselines(self, split: str = "test") -> dict[str, float]:
        """Random scores pick a same-colour image of the batch with probability (same-colour rows) / batch size."""
        ids = [NAMES.index(w) for w, _ in read_toy_tsv(self.path(self.tsv, split))]
        hits = 0.0
        for start in range(0, len(ids), self.batch_size_per_device):
            batch = np.asarray(ids[start : start + self.batch_size_per_device])
            hits += float((batch[:, None] == batch[None, :]).mean(1).sum())
        return {f"{split}/toy_acc_chance": hits / len(ids)}


# ------------------------------------------------------------------------------------------------ architecture
class ToyDualEncoder(nn.Module):
    """Text: mean of (projected) word embeddings over the real tokens; image: MLP over the region feature. Returns
    `EncoderOutput(text (B,T,H), visual (B,1,H) image embedding, pooled (B,H) text embedding)`."""

    visual_input = "global"

    def __init__(self, *, data_info: dict[str, Any], hidden_size: int = 16, vocab_size: int = 30522) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, hidden_size)
        self.image = nn.Sequential(
            nn.Linear(int(data_info["visual_dim"]), hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.pooled_size = self.text_size = self.visual_size = hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        tokens = self.embeddings(batch["input_ids"])  # (B,T,H)
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        text = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        image = self.image(batch["visual_feats"][:, 0])  # (B,H)
        return EncoderOutput(text=tokens, visual=image.unsqueeze(1), pooled=text)


# ------------------------------------------------------------------------------------------------ head
class ToyContrastive(Objective):
    """In-batch text -> image matching: cosine similarities / temperature, cross-entropy over the batch's images with
    every same-colour image a positive. `toy_acc`: the best-scoring image has the text's colour."""

    name = "toy_contrastive"
    needs = ("image",)
    requires = ("colour_ids",)

    def __init__(self, *, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    @classmethod
    def build(cls, ctx: HeadContext, **options: Any) -> ToyContrastive:
        return cls(**options)  # no parameters: it compares the encoder's two embeddings

    def forward(self, out: EncoderOutput, batch: dict[str, Any]) -> ObjectiveResult:
        text = F.normalize(out.pooled, dim=-1)
        image = F.normalize(out.visual[:, 0], dim=-1)
        logits = text @ image.T / self.temperature  # (B, B)
        ids = batch["colour_ids"]
        positive = ids[:, None] == ids[None, :]
        loss = -(torch.logsumexp(logits.masked_fill(~positive, -1e4), 1) - torch.logsumexp(logits, 1)).mean()
        hit = ids[logits.argmax(1)] == ids
        return ObjectiveResult(loss, hit.long(), torch.ones_like(ids))

    def make_metrics(self) -> dict[str, Metric]:
        return {"toy_acc": Accuracy()}

    def update_metrics(self, metrics: nn.ModuleDict, result: ObjectiveResult) -> None:
        metrics["toy_acc"].update(result.logits, result.target)
