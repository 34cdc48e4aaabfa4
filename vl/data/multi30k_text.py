"""MM-BERT's text side shared by the Multi30k data module and the MT system: the tokenizer (`load_multi30k_tokenizer`,
with the [STOP] token), how generated ids become a hypothesis (`detokenize`, `data.mt_detokenize`) and the seed's BLEU
(`seed_bleu`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vl.errors import ConfigError, DataError

__all__ = ["MT_DETOKENIZE", "detokenize", "seed_bleu", "load_multi30k_tokenizer"]

#: how MT token ids become the hypothesis string (`detokenize`)
MT_DETOKENIZE = ("seed", "hf")


def detokenize(tokenizer: Any, ids: Sequence[int], mode: str = "seed") -> str:
    """Token ids -> an MT hypothesis. "seed" (MM-BERT's generate module): ``' '.join(tokens).replace(' ##', '')`` of
    the vocabulary's token strings, special tokens and [UNK] kept as written, no other clean-up (so "man ' s",
    "Hand - in"); "hf": ``tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)`` (special
    tokens dropped, " 's" -> "'s", " ." -> ".")."""
    if mode == "seed":
        return " ".join(tokenizer.convert_ids_to_tokens(list(ids))).replace(" ##", "")
    if mode == "hf":
        return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True)
    raise ConfigError(f"data.mt_detokenize: '{mode}' is not one of {MT_DETOKENIZE}")


def seed_bleu(hypotheses: list[str], references: list[str]) -> float:
    """MM-BERT's MT metric: ``sacrebleu.corpus_bleu`` with the references passed through ``unidecode`` (accents
    stripped) and ß -> ss in the hypotheses, as the seed's evaluation does."""
    import sacrebleu
    from unidecode import unidecode

    return sacrebleu.corpus_bleu([h.replace("ß", "ss") for h in hypotheses], [[unidecode(r) for r in references]]).score


def load_multi30k_tokenizer(name_or_path: str, corpus_dir: Path | None = None, *, lowercase: bool = True) -> Any:
    """A `BertTokenizerFast` with a `[STOP]` token: ``"corpus"`` = the embedded corpus's trained WordPiece vocabulary
    (``<corpus>/tokenizer/vocab.txt``), else a local M-BERT dir ([STOP] added when absent). ``lowercase`` True (the
    seed's): lower-cased and accents stripped before WordPiece, whatever the dir's tokenizer config says, as the seed's
    ``BertTokenizer.from_pretrained(<M-BERT dir>)`` (pytorch_pretrained_bert: ``do_lower_case=True`` by default, with
    M-BERT's cased vocabulary); False: case and accents kept (vl's earlier tokenisation)."""
    from transformers import BertTokenizerFast

    case = {"do_lower_case": bool(lowercase), "strip_accents": bool(lowercase)}

    if name_or_path == "corpus":
        if corpus_dir is None:
            raise ConfigError("data.tokenizer=corpus needs the embedded corpus (data.root=null); give an M-BERT dir")
        vocab = corpus_dir / "tokenizer" / "vocab.txt"
        if not vocab.is_file():
            raise DataError(f"{vocab}: tokenizer vocabulary not found")
        tok = BertTokenizerFast.from_pretrained(str(vocab.parent), **case)
    else:
        from vl.pretrained import resolve_model_dir

        tok = BertTokenizerFast.from_pretrained(str(resolve_model_dir(name_or_path)), **case)
    tok.add_special_tokens({"additional_special_tokens": ["[STOP]"]})  # added when absent; never split
    return tok
