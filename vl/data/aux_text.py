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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vl.data.formats.multi30k import read_lines
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
