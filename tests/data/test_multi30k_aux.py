"""MM-BERT's aux text corpus (`data.aux_windows`): ``seed`` compared with a transcription of the seed's
``GeneralCorpus`` (pretrain/data/datasets/general_corpus.py: ``load_corpus`` + the token gathering of
``__getitem__``) over pytorch_pretrained_bert's ``BasicTokenizer``, written out here; ``chunks`` by hand."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import torch

from vl.data.multi30k import Multi30kDataModule
from vl.data.multi30k_collate import Multi30kCollator
from vl.errors import ConfigError, DataError


# ------------------------------------------------------------------------------------------------ the seed, transcribed
def _is_whitespace(c: str) -> bool:
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_control(c: str) -> bool:
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c).startswith("P")


def _is_chinese(cp: int) -> bool:
    ranges = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F)]
    ranges += [(0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]
    return any(lo <= cp <= hi for lo, hi in ranges)


def seed_basic_tokenize(text: str, do_lower_case: bool = True) -> list[str]:
    """pytorch_pretrained_bert's BasicTokenizer.tokenize: clean text, space around CJK characters, whitespace split,
    lower case and accents stripped (NFD, Mn dropped), split on punctuation, whitespace split again."""
    never_split = ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")
    text = "".join(" " if _is_whitespace(c) else c for c in text if ord(c) not in (0, 0xFFFD) and not _is_control(c))
    text = "".join(f" {c} " if _is_chinese(ord(c)) else c for c in text)
    split_tokens = []
    for token in text.strip().split():
        if do_lower_case and token not in never_split:
            token = "".join(c for c in unicodedata.normalize("NFD", token.lower()) if unicodedata.category(c) != "Mn")
        if token in never_split:
            split_tokens.append(token)
            continue
        pieces, start_new = [], True
        for c in token:
            if _is_punctuation(c):
                pieces.append(c)
                start_new = True
            else:
                if start_new:
                    pieces.append("")
                start_new = False
                pieces[-1] += c
        split_tokens += pieces
    return " ".join(split_tokens).strip().split()


def seed_corpus(path: Path) -> list[str]:
    """GeneralCorpus.load_corpus for one file."""
    with open(path, encoding="utf-8") as f:
        corpus = [line.strip("\n").strip("\r").strip("\n") for line in f.readlines()]
    return [line.strip() for line in corpus if line.strip() != ""]


def seed_window(corpus: list[str], item: int, min_seq_len: int) -> list[str]:
    """GeneralCorpus.__getitem__ up to the masking: the line's basic tokens, then the next lines' until >= min."""
    tokens = seed_basic_tokenize(corpus[item])
    cur = (item + 1) % len(corpus)
    while len(tokens) < min_seq_len:
        tokens.extend(seed_basic_tokenize(corpus[cur]))
        cur = (cur + 1) % len(corpus)
    return tokens


def seed_wordpiece(tokens: list[str], vocab: dict[str, int]) -> list[int]:
    """WordpieceTokenizer.tokenize per token (greedy longest match, [UNK] for a word it cannot split) -> ids."""
    from tests.data.test_multi30k import seed_wordpiece_pieces

    return [vocab[p] for word in tokens for p in seed_wordpiece_pieces(word, vocab)]


# ------------------------------------------------------------------------------------------------ tests
LINES = [
    "A man in a red shirt is riding a bike.",
    "",
    "   ",
    "Two dogs, a cat & three birds -- don't they look happy?",
    "Zwei grüne Männer spielen Fußball im Park.",
    "short",
    "",
    "Prices went up by $5 (about 4%) + tax; a=b, c<d> [e] {f} ~g^h|i`j.",
    " ".join(f"word{i}" for i in range(130)) + ".",  # longer than min_seq_len and aux_seq_len on its own
    "The last line wraps to the first ones.",
]


def _module(data_dir: Path, aux: Path, **kwargs) -> Multi30kDataModule:
    return Multi30kDataModule(
        cache_dir=str(data_dir), corpus={"num_images": 150}, aux_text=str(aux), objectives=["mlm"], **kwargs
    )


@pytest.mark.parametrize("min_words", [1, 12, 96, 400])
def test_seed_windows_are_the_seeds_general_corpus(tmp_path, data_dir, min_words) -> None:
    """One example per non-empty line; its basic tokens = the seed's window (the line, then the next lines, wrapping,
    until >= min_seq_len; 400 > the whole corpus: several wraps); its collated ids (no MLM) = the seed's WordPiece ids
    of the window truncated to seq_len (96)."""
    aux = tmp_path / "aux.txt"
    aux.write_bytes(("\r\n".join(LINES) + "\n").encode("utf-8"))  # CRLF line ends, as a Windows-written corpus
    dm = _module(data_dir, aux, aux_min_words=min_words)
    assert dm.aux_windows == "seed"  # the default
    ds = dm.aux_dataset()
    corpus = seed_corpus(aux)
    assert len(corpus) == 7 and len(ds) == len(corpus)
    vocab = dm.tokenizer.get_vocab()
    collate = Multi30kCollator(dm.tokenizer, max_text_len=dm.aux_seq_len, add_special_tokens=False, aux_text=True)
    for i in range(len(corpus)):
        want = seed_window(corpus, i, min_words)
        ex = ds[(0, i)]
        assert ex["index"] == i and "visual" not in ex
        assert seed_basic_tokenize(ex["text"]) == want
        ids = collate([ex])["input_ids"][0].tolist()
        assert ids == seed_wordpiece(want, vocab)[: dm.aux_seq_len]
    if min_words == 12:  # by hand: "short" (1 token) takes the next line whole; the long line is alone
        assert ds.rows[3]["text"].startswith("short Prices went up") and ds.rows[3]["image"] is None
        assert ds[(0, 5)]["text"] == LINES[8]


def test_seed_windows_over_the_embedded_corpus_aux_file(data_dir) -> None:
    dm = Multi30kDataModule(
        cache_dir=str(data_dir), corpus={"num_images": 150}, objectives=["mlm"], aux_text="../aux/train.txt"
    )
    assert dm.aux_text and dm.uses_aux
    path = dm.path(dm.aux_text, "train")
    ds, corpus = dm.aux_dataset(), seed_corpus(path)
    assert len(ds) == len(corpus) > 10
    for i in list(range(5)) + list(range(len(corpus) - 5, len(corpus))):  # the last ones wrap
        assert seed_basic_tokenize(ds[(0, i)]["text"]) == seed_window(corpus, i, 96)


def test_chunks_keep_vl_s_earlier_rule(tmp_path, data_dir) -> None:
    """``chunks``: the lines' whitespace words concatenated, cut after >= aux_min_words (the rest one last chunk)."""
    aux = tmp_path / "aux.txt"
    aux.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    ds = _module(data_dir, aux, aux_windows="chunks", aux_min_words=12).aux_dataset()
    words = [w for line in LINES for w in line.split()]
    texts = [r["text"] for r in ds.rows]
    assert " ".join(texts).split() == words
    assert [len(t.split()) >= 12 for t in texts[:-1]] == [True] * (len(texts) - 1)
    assert texts[0] == " ".join(LINES[0].split() + LINES[3].split())  # 10 words + 11 (empty lines add none)


def test_bad_aux_windows_and_empty_corpus(tmp_path, data_dir) -> None:
    with pytest.raises(ConfigError, match=r"^data\.aux_windows: 'lines' is not one of"):
        _module(data_dir, tmp_path / "aux.txt", aux_windows="lines")
    aux = tmp_path / "aux.txt"
    aux.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        _module(data_dir, aux).aux_dataset()
    aux.write_text("\x00\n", encoding="utf-8")  # a line of no tokens: the seed would loop forever
    with pytest.raises(DataError, match="no tokens"):
        _module(data_dir, aux).aux_dataset()


def test_plus_joined_aux_files_are_one_corpus_as_the_seeds_general_corpus(tmp_path, data_dir) -> None:
    """``aux_text: a.txt+b.txt`` (the seed's ``ann_file.split('+')``): the files' lines one after another as one
    corpus; windows (seed) wrap across the file boundary and from b's last line to a's first, as the seed's
    ``load_corpus`` + ``__getitem__`` over both; chunks (vl's earlier) run across files; a missing file fails in
    ``check_files`` (before any compute) naming it."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(LINES[:6]), encoding="utf-8")  # no newline at its end: its last line stays a line
    b.write_text("\n".join(LINES[6:]) + "\n", encoding="utf-8")
    joined = f"{a}+{b}"
    corpus = seed_corpus(a) + seed_corpus(b)  # GeneralCorpus.load_corpus: extend file by file, then drop empties
    assert len(corpus) == 7
    for min_words in (1, 40, 96):
        dm = _module(data_dir, joined, aux_min_words=min_words)
        assert dm.aux_paths() == [a, b] and set(dm.aux_paths()) <= set(dm.required_files())
        ds = dm.aux_dataset()
        assert len(ds) == len(corpus)
        for i in range(len(corpus)):
            assert seed_basic_tokenize(ds[(0, i)]["text"]) == seed_window(corpus, i, min_words), (min_words, i)
    assert ds[(0, 3)]["text"].startswith(LINES[5] + " " + LINES[7])  # "short" (the end of a) + b's first line
    chunks = _module(data_dir, joined, aux_windows="chunks", aux_min_words=12).aux_dataset()
    assert " ".join(r["text"] for r in chunks.rows).split() == [w for line in LINES for w in line.split()]
    missing = tmp_path / "books.txt"
    with pytest.raises(DataError, match=f"^{missing}"):
        _module(data_dir, f"{a}+{missing}").check_files()
    with pytest.raises(DataError, match=f"^{missing}: file not found"):
        _module(data_dir, f"{a}+{missing}").aux_dataset()


# ------------------------------------------------------------------------------------------------ aux loader epochs
class SeedMultiTaskDataLoader:
    """common/utils/multi_task_dataloader.py's MultiTaskDataLoader, transcribed: the first loader is the master (its
    iterator restarted by each `iter()`, its length the epoch's); the others keep their iterators across epochs and
    restart when exhausted, with `set_epoch(global_idx // len)` first."""

    def __init__(self, loaders: list) -> None:
        self.loaders = loaders
        self.iters = [iter(loader) for loader in loaders]
        self.lens = [len(loader) for loader in loaders]
        self.global_idx_in_cycle = 0

    def __iter__(self) -> SeedMultiTaskDataLoader:
        if self.global_idx_in_cycle > 0:
            self.iters[0] = iter(self.loaders[0])
        return self

    def __next__(self) -> tuple:
        out = (next(self.iters[0]),)
        for k, loader in enumerate(self.loaders[1:]):
            loader.sampler.set_epoch(int(self.global_idx_in_cycle / self.lens[k + 1]))
            try:
                out += (next(self.iters[k + 1]),)
            except StopIteration:
                self.iters[k + 1] = iter(loader)
                out += (next(self.iters[k + 1]),)
        self.global_idx_in_cycle += 1
        return out

    def __len__(self) -> int:
        return self.lens[0]


class _Keys(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        return key


def _loaders(n_main: int, n_aux: int, kind: str = "vl"):
    from torch.utils.data import DataLoader

    from vl.data.samplers import ContinuingDataLoader, EpochShuffleSampler, ResumableDataLoader

    def sampler(n: int) -> EpochShuffleSampler:
        return EpochShuffleSampler(_Keys(n), num_replicas=1, rank=0, shuffle=True, seed=7)

    main_cls, aux_cls = (ResumableDataLoader, ContinuingDataLoader) if kind == "vl" else (DataLoader, DataLoader)
    main = main_cls(_Keys(n_main), batch_size=3, sampler=sampler(n_main), collate_fn=list)
    aux = aux_cls(_Keys(n_aux), batch_size=2, sampler=sampler(n_aux), collate_fn=list)
    return main, aux


def _vl_epochs(main, aux, epochs: range, first_batches: int | None = None, done: int = 0) -> list:
    """What Lightning's fit loop does: `set_epoch` on every loader's sampler, then one `iter()` of the CombinedLoader
    (min_size) per epoch, its length the number of batches (``done`` of the first epoch's already run: a resume)."""
    from lightning.pytorch.utilities import CombinedLoader

    aux.epoch_batches = len(main)
    combined = CombinedLoader({"main": main, "aux": aux}, mode="min_size")
    out = []
    for epoch in epochs:
        main.sampler.set_epoch(epoch)
        aux.sampler.set_epoch(epoch)
        iter(combined)
        assert len(combined) == len(main)
        for _ in range(len(combined) - (done if epoch == epochs[0] else 0)):
            if first_batches is not None and len(out) == first_batches:
                return out
            batch, _, _ = next(combined)
            out.append((batch["main"], batch["aux"]))
    return out


@pytest.mark.parametrize(("n_main", "n_aux"), [(10, 23), (10, 5), (10, 7)])  # aux longer / shorter / as long
def test_seed_aux_epoch_is_the_seeds_multi_task_loader(n_main, n_aux) -> None:
    """``aux_epoch: seed``: 3 epochs of (image, aux) batches = the seed's MultiTaskDataLoader over the same samplers
    (epoch = the image loader's 4 batches; the aux loader continues across epochs, pass p shuffled with epoch p)."""
    seed_main, seed_aux = _loaders(n_main, n_aux, kind="seed")
    seed = SeedMultiTaskDataLoader([seed_main, seed_aux])
    want = []
    for epoch in range(3):
        seed_main.sampler.set_epoch(epoch)  # the seed's train loop: train_sampler.set_epoch(epoch)
        want += [tuple(b) for b in seed]
    assert len(want) == 12
    got = _vl_epochs(*_loaders(n_main, n_aux), range(3))
    assert got == want
    if n_aux == 23:  # by hand: the aux loader's second epoch starts mid-pass (12 batches a pass, 4 an epoch)
        assert [b[1][0][0] for b in got] == [0] * 12


@pytest.mark.parametrize("stop", [2, 4, 7])  # mid-epoch, at an epoch boundary, mid-epoch 1 (the aux mid-pass)
def test_seed_aux_epoch_resumes_exactly(stop) -> None:
    """The saved positions (image loader: epoch + batches; aux: pass + batches) restore the uninterrupted sequence."""
    straight = _vl_epochs(*_loaders(10, 7), range(3))
    main, aux = _loaders(10, 7)
    first = _vl_epochs(main, aux, range(3), first_batches=stop)
    states = [main.state_dict(), aux.state_dict()]
    resumed_main, resumed_aux = _loaders(10, 7)
    resumed_main.load_state_dict(states[0])
    resumed_aux.load_state_dict(states[1])
    # Lightning resumes at the saved epoch, after its done batches (a checkpoint at an epoch's end: the next epoch)
    rest = _vl_epochs(resumed_main, resumed_aux, range(stop // 4, 3), done=stop % 4)
    assert len(first) == stop and first + rest == straight


def test_the_data_module_wires_aux_epoch(data_dir) -> None:
    from lightning.pytorch.utilities import CombinedLoader

    from vl.data.samplers import ContinuingDataLoader

    kwargs = {"cache_dir": str(data_dir), "corpus": {"num_images": 150}, "aux_text": "../aux/train.txt"}
    seed = Multi30kDataModule(**kwargs)
    seed.setup("fit")
    loader = seed.train_dataloader()
    assert isinstance(loader, CombinedLoader) and loader._mode == "min_size"
    iter(loader)
    assert isinstance(loader.iterables["aux"], ContinuingDataLoader) and len(loader) == len(loader.iterables["main"])
    aux, main = loader.iterables["aux"], loader.iterables["main"]
    assert torch.utils.data.DataLoader.__len__(aux) > len(main)  # here a pass of the aux loader is the longer
    cycle = Multi30kDataModule(**kwargs, aux_epoch="cycle")
    cycle.setup("fit")
    loader = cycle.train_dataloader()
    iter(loader)
    assert loader._mode == "max_size_cycle" and not isinstance(loader.iterables["aux"], ContinuingDataLoader)
    assert len(loader) == max(len(loader.iterables["main"]), len(loader.iterables["aux"]))
    with pytest.raises(ConfigError, match=r"^data\.aux_epoch: 'min' is not one of"):
        Multi30kDataModule(**kwargs, aux_epoch="min")


@pytest.mark.parametrize("n_aux", [23, 5])
def test_seed_aux_epoch_through_lightnings_fit_loop(tmp_path, n_aux) -> None:
    """3 epochs of a real `Trainer.fit` over the min_size CombinedLoader: the training steps see the seed's
    MultiTaskDataLoader's (image, aux) batches."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import CombinedLoader

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.seen = torch.nn.Parameter(torch.zeros(1)), []

        def training_step(self, batch, batch_idx):
            self.seen.append((batch["main"], batch["aux"]))
            return (self.w**2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    main, aux = _loaders(10, n_aux)
    aux.epoch_batches = len(main)
    model = Recorder()
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, train_dataloaders=CombinedLoader({"main": main, "aux": aux}, mode="min_size"))
    seed_main, seed_aux = _loaders(10, n_aux, kind="seed")
    seed, want = SeedMultiTaskDataLoader([seed_main, seed_aux]), []
    for epoch in range(3):
        seed_main.sampler.set_epoch(epoch)
        want += [tuple(b) for b in seed]
    assert len(model.seen) == 12 and model.seen == want
