"""MM-BERT's aux text corpus (`data.aux_text`; the seed's ``general_corpus``: English Wiki + BooksCorpus lines, in the
embedded corpus the scenes' English captions): one sentence a line, read as text-only rows (no [CLS] / [SEP], the aux
visual embedding, no regions) that `Multi30kDataModule` batches jointly with the image data in pretraining, or alone
(``data=aux_text``, a file per split). ``data.aux_text`` may join several files with ``+`` (the seed's
``general_corpus`` ann_file, e.g. ``wiki.txt+books.txt``): read one after another as one corpus.

- Windows (``aux_windows``): ``seed``, the seed's ``GeneralCorpus`` (`AuxWindows`, `seed_windows`): one window per
  non-empty line, that line's basic-tokeniser tokens and the next lines' (wrapping) until >= ``aux_min_words``;
  ``chunks`` (`word_chunks`): the lines concatenated and cut into non-overlapping chunks of >= ``aux_min_words``
  whitespace words (vl's earlier).
- Epochs (``aux_epoch``, `combine_with_aux`): ``seed``, an epoch is the image loader's length and the aux loader
  continues across epochs, pass after pass (the seed's ``MultiTaskDataLoader``); ``cycle``, Lightning's
  ``max_size_cycle`` (vl's earlier).
- `AuxTextCorpus`: the DataModule's side (a mixin of `Multi30kDataModule`): whether the corpus is used, its files,
  dataset and collator, and the training loader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vl.data.formats.multi30k import read_lines
from vl.data.multi30k_collate import Multi30kCollator
from vl.data.multi30k_examples import Multi30kExamples
from vl.data.samplers import global_seed, split_key
from vl.errors import DataError

AUX_WINDOWS = ("seed", "chunks")
AUX_EPOCHS = ("seed", "cycle")


class AuxWindows(Dataset):
    """The aux text corpus as the seed's ``GeneralCorpus``: one example per non-empty (stripped) line ``i``, the line's
    basic-tokeniser tokens followed by those of the next lines (wrapping past the end) until there are at least
    ``min_tokens``; the example's ``text`` is those lines joined by a space (its basic tokens are the window's; the
    collator truncates to ``aux_seq_len`` WordPiece tokens, as the seed does after tokenising). ``counts``: basic
    tokens per line; ``path``: the corpus file(s), named by the DataError of a corpus without tokens."""

    def __init__(self, lines: list[str], counts: list[int], min_tokens: int, path: str | Path) -> None:
        n, total = len(lines), sum(counts)
        if n == 0 or total == 0:
            raise DataError(f"{path}: the aux text corpus has no tokens")
        prefix = np.concatenate([[0], np.cumsum(counts)])

        def upto(k: int) -> int:  # tokens of the unwrapped lines [0, k)
            return (k // n) * total + int(prefix[k % n])

        self.lines, self.stops, stop = lines, [], 0
        for i in range(n):  # the seed's `while len(tokens) < min_seq_len` over the lines after i, as a sliding end
            stop = max(stop, i + 1)
            while upto(stop) - upto(i) < min_tokens:
                stop += 1
            self.stops.append(stop)
        self.rows = _WindowRows(self)

    def text(self, index: int) -> str:
        n = len(self.lines)
        return " ".join(self.lines[k % n] for k in range(index, self.stops[index]))

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        return {"text": self.text(index), "index": index, "epoch": epoch}


class _WindowRows(Sequence):
    """``AuxWindows.rows``: the windows as ``{"text", "image": None}`` rows, built on access."""

    def __init__(self, windows: AuxWindows) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {"text": self.windows.text(i), "image": None}


def _as_files(paths: Path | Sequence[Path]) -> list[Path]:
    """One corpus path, or the list `data.aux_text` joins with ``+``, as a list of paths."""
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def _read_corpus(paths: Path | Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The corpus files in order (one path, or the list `data.aux_text` joins with ``+``, as the seed's
    ``ann_file.split('+')``) and their lines read one after another (the seed's ``readlines()``: universal newlines).
    DataError naming a missing file."""
    files = _as_files(paths)
    lines: list[str] = []
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        with open(path, encoding="utf-8") as f:
            lines += f.readlines()
    return files, lines


def _named(files: list[Path]) -> str:
    return " + ".join(str(f) for f in files)


def seed_windows(paths: Path | Sequence[Path], tokenizer: Any, min_tokens: int) -> AuxWindows:
    """``aux_windows: seed``: the non-empty lines (stripped) of the file, or of the files in order (the seed's
    ``GeneralCorpus.load_corpus`` over ``+``-joined files: one corpus, windows wrap across files and from the last
    line to the first), as `AuxWindows`, each line's tokens counted by the tokenizer's basic tokeniser. DataError
    naming the file(s) when one is missing, or the corpus is empty or without tokens."""
    files, read = _read_corpus(paths)
    lines = [line.strip() for line in read if line.strip()]
    if not lines:
        raise DataError(f"{_named(files)}: the aux text corpus is empty")
    backend = tokenizer.backend_tokenizer  # BertNormalizer + BertPreTokenizer = the basic tokeniser
    counts = [len(backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(s))) for s in lines]
    return AuxWindows(lines, counts, min_tokens, _named(files))


def word_chunks(paths: Path | Sequence[Path], min_words: int) -> list[str]:
    """``aux_windows: chunks``: the whitespace words of the file(s), in order, concatenated and cut after each
    >= ``min_words`` (the rest one last chunk). DataError naming the file(s) when one is missing or there are no
    words."""
    files = _as_files(paths)
    chunks, current = [], []
    for line in (line for path in files for line in read_lines(path)):
        current += line.split()
        if len(current) >= min_words:
            chunks.append(" ".join(current))
            current = []
    if current:
        chunks.append(" ".join(current))
    if not chunks:
        raise DataError(f"{_named(files)}: the aux text corpus is empty")
    return chunks


def combine_with_aux(
    main: DataLoader,
    aux_dataset: Dataset,
    collate_fn: Callable[[list[dict[str, Any]]], Any],
    *,
    aux_epoch: str,
    batch_size: int,
    num_workers: int,
    trainer: Any,
) -> Any:
    """The image data's training loader `main` and the aux text corpus batched jointly (Lightning
    ``CombinedLoader``). ``aux_epoch`` seed: an epoch is the image loader's length and the aux loader continues
    across epochs, pass after pass (``ContinuingDataLoader``, ``min_size``; the seed's ``MultiTaskDataLoader``);
    cycle: ``max_size_cycle``, the longer loader sets the epoch and the shorter restarts within it (vl's
    earlier)."""
    from lightning.pytorch.utilities import CombinedLoader

    from vl.data.samplers import ContinuingDataLoader, EpochShuffleSampler, ResumableDataLoader

    sampler = EpochShuffleSampler(
        aux_dataset,
        num_replicas=trainer.world_size if trainer else 1,
        rank=trainer.global_rank if trainer else 0,
        shuffle=True,
        seed=global_seed(),
    )
    seed_epoch = aux_epoch == "seed"
    sampler.set_epoch(0 if seed_epoch else trainer.current_epoch if trainer else 0)
    aux = (ContinuingDataLoader if seed_epoch else ResumableDataLoader)(
        aux_dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(global_seed()),
        num_workers=num_workers,
        collate_fn=collate_fn,
    )
    if seed_epoch:
        aux.epoch_batches = len(main)
        return CombinedLoader({"main": main, "aux": aux}, mode="min_size")
    return CombinedLoader({"main": main, "aux": aux}, mode="max_size_cycle")


class AuxTextCorpus:
    """Mixin of `Multi30kDataModule` (listed before `VLDataModule` in its bases): the aux text corpus in pretraining,
    batched jointly with the image data (`uses_aux`) or alone (`aux_alone`): its files, dataset, collator, and the
    training loader that combines the two."""

    @property
    def uses_aux(self) -> bool:
        """The aux text corpus batched jointly with the image data (pretraining with some of Tasks A / B / C)."""
        return self.task == "pretrain" and bool(self.aux_text) and bool(self.pretrain_tasks)

    @property
    def aux_alone(self) -> bool:
        """`data=aux_text`: pretraining on the aux text corpus only (``pretrain_tasks: []``), ``aux_text`` per split."""
        return self.task == "pretrain" and bool(self.aux_text) and not self.pretrain_tasks

    @property
    def examples_per_device_step(self) -> int:
        """Examples one device sees per micro-batch: the image data plus the aux text batch (MM-BERT's [8, 8])."""
        return self.batch_size_per_device + (self.aux_batch_size if self.uses_aux else 0)

    def aux_paths(self, split: str = "train") -> list[Path]:
        """The aux corpus files of `split`: ``aux_text`` relative to ``root``, several joined with ``+`` (the seed's
        ``general_corpus`` ann_file, e.g. ``wiki.txt+books.txt``), read in that order as one corpus."""
        return [self.path(part, split) for part in str(self.aux_text).split("+")]

    def aux_dataset(self, split: str = "train") -> Dataset:
        """The aux text corpus (one sentence a line), no [CLS] / [SEP], the aux visual embedding and no regions, read
        as ``aux_windows`` says (`vl.data.aux_text`): seed, the seed's ``GeneralCorpus`` windows (`seed_windows`);
        chunks, non-overlapping chunks of >= ``aux_min_words`` whitespace words (`word_chunks`, vl's earlier)."""
        paths = self.aux_paths(split)
        if self.aux_windows == "seed":
            return seed_windows(paths, self.tokenizer, self.aux_min_words)
        chunks = word_chunks(paths, self.aux_min_words)
        return Multi30kExamples([{"text": c, "image": None} for c in chunks], self.max_regions)

    def train_dataloader(self) -> Any:
        """Pretraining with ``aux_text``: the image data and the aux text corpus batched jointly, an epoch as
        ``aux_epoch`` says (`vl.data.aux_text.combine_with_aux`: seed, the seed's ``MultiTaskDataLoader``; cycle,
        ``max_size_cycle``)."""
        main = self.loader("train")
        if not self.uses_aux:
            return main
        if "aux" not in self.datasets:
            self.datasets["aux"] = self.aux_dataset()
        return combine_with_aux(
            main,
            self.datasets["aux"],
            self.loader_collate(self.aux_collator()),
            aux_epoch=self.aux_epoch,
            batch_size=self.aux_batch_size,
            num_workers=self.num_workers,
            trainer=self.trainer,
        )

    def aux_collator(self) -> Multi30kCollator:
        """Aux text chunks: ``aux_seq_len`` tokens, no [CLS] / [SEP], whole-word MLM."""
        return Multi30kCollator(
            self.tokenizer,
            max_text_len=self.aux_seq_len,
            mlm="mlm" in self.objectives,
            mlm_probability=self.mlm_probability,
            add_special_tokens=False,
            aux_text=True,
        )
