"""MM-BERT MT hypotheses as strings: the default is a transcription of the seed's generate module
(`MT/modules/resnet_vlbert_for_pretraining_generate.py`: each step's arg-max appended as
``tokenizer.ids_to_tokens[id]`` until ``[STOP]``, then ``' '.join(sentence).replace(' ##', '')``), on random id
sequences with ##-pieces, [UNK], [SEP], [MASK], [PAD] and the stop token; ``hf`` is the tokenizer's ``decode`` (vl's
earlier strings); the copy-the-source BLEU baseline is detokenised as the model's hypotheses."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vl.data.multi30k import Multi30kDataModule
from vl.data.multi30k_text import detokenize, seed_bleu
from vl.errors import ConfigError
from vl.models.translation import greedy_translate

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[STOP]", "ein", "mann", "hund", "läuft", "##e", "##n", "##s", "'",
    "s", ".", ",", "-", "weiß", "?", "n't",
]  # fmt: skip


@pytest.fixture
def tokenizer(tmp_path: Path):
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(tmp_path), do_lower_case=False)  # as vl's load_multi30k_tokenizer


def seed_ids_to_tokens(path: Path) -> dict[int, str]:
    """pytorch_pretrained_bert's ``load_vocab`` reversed: line index -> the line's token (the seed's ids_to_tokens)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return {i: line.strip() for i, line in enumerate(lines) if line.strip()}


def seed_generate(steps: list[list[int]], ids_to_tokens: dict[int, str], max_len: int = 48) -> list[str]:
    """Transcription of the seed's loop and join: ``steps[t][n]`` is sentence n's arg-max at step t."""
    generated: list[list[str]] = []
    stop = [False] * len(steps[0])
    curr_len = 0
    while not all(stop) and curr_len <= max_len:
        for nid, ele in enumerate(steps[curr_len]):
            if curr_len == 0:
                generated.append([])
            if not stop[nid]:
                if ids_to_tokens[ele] == "[STOP]":
                    stop[nid] = True
                else:
                    generated[nid].append(ids_to_tokens[ele])
        curr_len += 1
    return [" ".join(sentence).replace(" ##", "") for sentence in generated]


class ScriptedCollator:
    """Rows -> a batch whose [MASK] sits at attention_mask.sum - 2, carrying each row's sentence and step."""

    seq_len, max_text_len = 64, 40

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["text_b_ids"]) for r in rows) + 2
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            mask[j, : len(r["text_b_ids"]) + 2] = 1
        return {
            "input_ids": torch.zeros_like(mask),
            "attention_mask": mask,
            "sentence": [r["index"] for r in rows],
            "step": [len(r["text_b_ids"]) - 1 for r in rows],
        }


class ScriptedModel(torch.nn.Module):
    """Predicts ``steps[step][sentence]`` at every row's [MASK] (states carry the id; the head one-hot encodes it)."""

    device = torch.device("cpu")

    def __init__(self, steps: list[list[int]], vocab: int) -> None:
        super().__init__()
        self.steps = steps
        self.objectives = {"mlm": SimpleNamespace(logits=lambda s: torch.nn.functional.one_hot(s[:, 0].long(), vocab))}

    def forward(self, batch: dict) -> SimpleNamespace:
        ids = [self.steps[t][n] for n, t in zip(batch["sentence"], batch["step"])]
        text = torch.tensor(ids, dtype=torch.float)[:, None, None].expand(*batch["attention_mask"].shape, 1)
        return SimpleNamespace(text=text)


def random_steps(rng: random.Random, sentences: int, max_steps: int) -> list[list[int]]:
    stop = VOCAB.index("[STOP]")
    others = [i for i in range(len(VOCAB)) if i != stop]
    steps = [[rng.choice(others) for _ in range(sentences)] for _ in range(max_steps)]
    for n in range(sentences - 1):  # the last sentence never stops: it runs all the steps
        steps[rng.randrange(max_steps)][n] = stop
    return steps


def test_seed_hypotheses_are_the_seeds_join_on_random_ids(tokenizer, tmp_path) -> None:
    ids_to_tokens = seed_ids_to_tokens(tmp_path / "vocab.txt")
    rng = random.Random(0)
    examples = [{"text": "a"} for _ in range(6)]
    for _ in range(20):
        steps = random_steps(rng, len(examples), 49)
        model = ScriptedModel(steps, len(VOCAB))
        want = seed_generate(steps, ids_to_tokens)
        assert greedy_translate(model, ScriptedCollator(), examples, tokenizer) == want  # the default: seed
        assert greedy_translate(model, ScriptedCollator(), examples, tokenizer, detokenize="seed") == want
        got_hf = greedy_translate(model, ScriptedCollator(), examples, tokenizer, detokenize="hf")
        for n, hyp in enumerate(got_hf):  # vl's earlier strings: the tokenizer's decode of the ids before [STOP]
            ids = []
            for row in steps:
                if row[n] == VOCAB.index("[STOP]"):
                    break
                ids.append(row[n])
            assert hyp == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    assert any("[UNK]" in h or "[SEP]" in h for h in want)


def test_seed_and_hf_strings_by_hand(tokenizer) -> None:
    """The seed keeps special tokens and the spaces around punctuation ("mann ' s"), which sacrebleu's 13a tokeniser
    does not undo for apostrophes; hf drops the special tokens and cleans up ("mann's")."""
    ids = tokenizer.convert_tokens_to_ids(["##e", "ein", "hund", "##e", "##n", "[UNK]", "mann", "'", "s", "[SEP]", "."])
    assert detokenize(tokenizer, ids) == "##e ein hunden [UNK] mann ' s [SEP] ."
    assert detokenize(tokenizer, ids, "hf") == "##e ein hunden mann's."
    with pytest.raises(ConfigError, match="data.mt_detokenize"):
        detokenize(tokenizer, ids, "moses")


@pytest.mark.parametrize("mode", ["seed", "hf"])
def test_the_copy_source_baseline_is_detokenised_as_the_hypotheses(data_dir, mode) -> None:
    dm = Multi30kDataModule(
        cache_dir=str(data_dir), corpus={"num_images": 150}, task="mt", objectives=["mlm"], mt_detokenize=mode
    )
    dm.setup("test")
    _, records, _ = dm.records("test")
    tok = dm.tokenizer
    if mode == "seed":
        copies = [" ".join(tok.tokenize(r["caption_en"])).replace(" ##", "") for r in records]
    else:
        hf = {"skip_special_tokens": True, "clean_up_tokenization_spaces": True}
        copies = [tok.decode(tok.encode(r["caption_en"], add_special_tokens=False), **hf) for r in records]
    refs = [r["caption_de"] for r in records]
    assert dm.baselines("test")["test/bleu_copy_source"] == pytest.approx(seed_bleu(copies, refs))
    with pytest.raises(ConfigError, match="data.mt_detokenize"):
        Multi30kDataModule(cache_dir=str(data_dir), task="mt", objectives=["mlm"], mt_detokenize="moses")


def test_the_option_composes(make_cfg) -> None:
    assert make_cfg("experiment=mm_bert_mt", tiny=False).data.mt_detokenize == "seed"
    assert make_cfg("experiment=mm_bert_mt_tiny", "data.mt_detokenize=hf").data.mt_detokenize == "hf"
