"""Tokenisation, MLM masking, region padding and masking, label collation: the picklable collator every data
module composes. The shared batch keys are listed in `vl.batch`; a corpus declares its own label keys
(`VLDataModule.label_keys`: example key -> (batch key, kind)), so nothing here knows any task:

  "long"     one int per example -> (B,) long               e.g. question_id, itm_label -> itm_labels
  "float"    one float per example -> (B,) float            e.g. refer_image_iou
  "vector"   one float array per example -> (B, A) float    e.g. vqa_target -> vqa_targets (soft scores)
  "regions"  one float per region -> (B, R) float, padded to the batch's regions (refer_targets)
  "str"      one string per example -> list[str]            e.g. annot_id

Multiple-choice examples (`choices`: K*C rows, `mc_labels`: K ints, -1 = unlabelled) are flattened into B*K*C rows,
block-major, plus `mc_labels` (B, K) long. An example key that is neither shared nor declared is an error (never
silently dropped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vl.batch import IGNORE_INDEX
from vl.data.draws import example_keys, global_seed, uniforms
from vl.data.region_batch import mask_regions, masked_global, pad_regions
from vl.errors import ConfigError
from vl.pretrained import resolve_model_dir

#: example keys every collator reads itself
SHARED_EXAMPLE_KEYS = frozenset(
    {"text", "text_b", "visual", "index", "epoch", "choices", "mc_labels", "max_text_len", "choice_of", "choice"}
)
LABEL_KINDS = ("long", "float", "vector", "regions", "str")
#: objectives whose labels come from masked regions (the collator masks regions when the data lists one)
REGION_MASKING = ("mrc", "mrfr")
#: how a text longer than `max_text_len` is cut (`Collator(truncation=...)`, `data.text_truncation`): "seed": as the
#: corpus's seed reader cuts it (vilbert_beta's VQA / RefCOCO+ / retrieval readers: `[CLS] tokens [SEP]` cut to
#: `max_text_len`, so an over-long text loses its [SEP]; its VCR reader: `Collator.seed_pairs`); "tokenizer": the
#: tokenizer's truncation (single texts: the tokens cut, [SEP] kept; pairs: longest-first, each row alone)
TEXT_TRUNCATION = ("seed", "tokenizer")


def check_text_truncation(value: str) -> str:
    if value not in TEXT_TRUNCATION:
        raise ConfigError(f"data.text_truncation: '{value}' is not one of {TEXT_TRUNCATION}")
    return value


def load_tokenizer(name_or_path: str):
    """A `BertTokenizerFast` from a local dir, or `"minilm"` for the packaged bert-base-uncased vocab."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(resolve_model_dir(name_or_path)))


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    keys: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `probability` of the non-special tokens; of those 80 % -> [MASK], 10 % -> a random token,
    10 % unchanged. Returns (masked input_ids, labels with -100 where not chosen). Shapes (B, T). `keys` (B,): each
    row's draws from its own key and token position (`vl.data.draws`: the same in any batch or padding)."""
    labels = input_ids.clone()
    ids = input_ids.clone()
    u = [torch.from_numpy(uniforms(keys, input_ids.shape[1], stream)) for stream in range(4)]
    chosen = (u[0] < probability) & ~special_mask.bool()
    to_mask = (u[1] < 0.8) & chosen
    to_random = (u[2] < 0.5) & chosen & ~to_mask
    random_ids = (u[3] * vocab_size).long().clamp_(max=vocab_size - 1)
    labels[~chosen] = IGNORE_INDEX
    ids[to_mask] = mask_token_id
    ids[to_random] = random_ids[to_random]
    return ids, labels


def collate_labels(
    examples: list[dict[str, Any]], labels: Mapping[str, tuple[str, str]], batch: dict[str, Any]
) -> None:
    """Add the declared labels present in the examples to `batch` (see the module docstring for the kinds)."""
    for key, (batch_key, kind) in labels.items():
        if key not in examples[0]:
            continue
        if kind == "long":
            batch[batch_key] = torch.tensor([int(ex[key]) for ex in examples])
        elif kind == "float":
            batch[batch_key] = torch.tensor([float(ex[key]) for ex in examples])
        elif kind == "vector":
            batch[batch_key] = torch.from_numpy(np.stack([np.asarray(ex[key]) for ex in examples])).float()
        elif kind == "regions":
            n = batch["visual_mask"].shape[1]
            values = torch.zeros(len(examples), n)
            for i, ex in enumerate(examples):
                v = torch.as_tensor(np.asarray(ex[key][:n], dtype=np.float32))
                values[i, : v.shape[0]] = v
            batch[batch_key] = values
        elif kind == "str":
            batch[batch_key] = [str(ex[key]) for ex in examples]
        else:
            raise ValueError(f"label '{key}': unknown kind '{kind}'; choose from {LABEL_KINDS}")


def text_fields(text: Any) -> dict[str, Any]:
    """A gallery text as a collator's example fields: a string -> ``{"text": text}``; a dict of a row's text fields
    (``{"text", "text_b"}``: MM-BERT's joint ``[CLS] EN [SEP] DE [SEP]`` queries) -> a copy of it."""
    return dict(text) if isinstance(text, dict) else {"text": text}


class Collator:
    """Turns a list of examples into a batch dict (see the module docstring).

    Example keys: `text` (str), optional `text_b`; `visual` (reader dict); the corpus's declared `labels`;
    `index` and `epoch` (ints): MLM masks are drawn from a generator seeded by (epoch, indices), never from the global
    RNG, so runs and resumed runs see the same masks. `extra_keys`: example keys a subclass reads itself.

    MLM never picks padding or the special tokens the tokenizer adds ([CLS], [SEP]); `mlm_skip_special_ids=True`
    also never picks any other id in `tokenizer.all_special_ids` ([UNK], [MASK], ... in the text), as HF's
    `DataCollatorForLanguageModeling` does when the batch carries no special-tokens mask (the CLIP-BERT seed's
    collator: `get_special_tokens_mask(ids, already_has_special_tokens=True)`).

    `region_masking` (a region-masking objective, `REGION_MASKING`) zeroes regions (`mask_regions`); a batch whose
    readers gave ViLBERT's global feature (`visual_global`: `data.global_token=all`, RefCOCO+) then gets it from the
    masked features instead (`masked_global`: the mean of the kept rows after masking, as vilbert_beta's pretraining
    loader computes it), so the global token never carries a masked region's feature.
    """

    extra_keys: frozenset[str] = frozenset()

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_text_len: int = 32,
        max_regions: int = 36,
        mlm: bool = False,
        mlm_probability: float = 0.15,
        mlm_skip_special_ids: bool = False,
        region_masking: bool = False,
        region_mask_probability: float = 0.15,
        fixed_shapes: bool = False,
        labels: Mapping[str, tuple[str, str]] | None = None,
        truncation: str = "tokenizer",
    ) -> None:
        self.tokenizer = tokenizer
        self.truncation = check_text_truncation(truncation)  # "seed": single texts cut, pairs by `seed_pairs`
        self.labels = dict(labels or {})
        self.max_text_len = max_text_len
        self.max_regions = max_regions
        self.mlm = mlm
        self.mlm_probability = mlm_probability
        self.mlm_skip_special_ids = mlm_skip_special_ids
        self.region_masking = region_masking
        self.region_mask_probability = region_mask_probability
        self.fixed_shapes = fixed_shapes  # pad to max_text_len / max_regions: a pair scores the same in any batch

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        self.check_keys(examples[0])
        if "choices" in examples[0]:
            return self.collate_choices(examples)
        texts = [ex["text"] for ex in examples]
        pairs = [ex["text_b"] for ex in examples] if "text_b" in examples[0] else None
        lens = [ex.get("max_text_len") for ex in examples]  # a row's own text length (e.g. VCR's Q->A rows), if any
        groups = [ex["choice_of"] for ex in examples] if "choice_of" in examples[0] else None
        enc = self.encode(texts, pairs, max_lens=lens if any(n is not None for n in lens) else None, groups=groups)
        batch: dict[str, torch.Tensor] = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"],
            "index": torch.tensor([ex.get("index", 0) for ex in examples]),
        }
        if "visual" in examples[0]:
            batch.update(pad_regions([ex["visual"] for ex in examples], self.max_regions, fixed=self.fixed_shapes))
        collate_labels(examples, self.labels, batch)
        # each row's masks from (run seed, epoch, index, choice) and its own positions: not from its batch
        keys = example_keys(
            global_seed(),
            [int(ex.get("epoch", 0)) for ex in examples],
            batch["index"].tolist(),
            [int(ex.get("choice", 0)) for ex in examples],
        )
        if self.region_masking and "visual_feats" in batch:
            batch["region_feat_targets"] = batch["visual_feats"]
            batch["visual_feats"], batch["region_mask_labels"] = mask_regions(
                batch["visual_feats"],
                batch["visual_mask"],
                probability=self.region_mask_probability,
                keys=keys,
            )
            if "visual_global" in batch:  # the reader's mean of the unmasked regions would carry the masked ones
                batch["visual_global"] = masked_global(batch["visual_feats"], batch["visual_mask"])
        if self.mlm:
            special = enc["special_tokens_mask"].bool() | (enc["attention_mask"] == 0)
            if self.mlm_skip_special_ids:
                special |= torch.isin(enc["input_ids"], torch.tensor(self.tokenizer.all_special_ids))
            batch["input_ids"], batch["mlm_labels"] = mask_tokens(
                enc["input_ids"],
                special,
                mask_token_id=self.tokenizer.mask_token_id,
                vocab_size=len(self.tokenizer),
                probability=self.mlm_probability,
                keys=keys,
            )
            # labels on every pair, mismatched ones too (ViLBERT's reference); whether the MLM loss counts the
            # mismatched pairs is the MLM head's option (`model.heads.mlm.on_mismatched_pairs`)
        return batch

    #: texts (or text pairs) whose token ids one collator keeps (cleared when full)
    MEMO_SIZE = 200_000

    def encode(
        self,
        texts: list[str],
        pairs: list[str] | None,
        max_lens: list[int | None] | None = None,
        groups: list[Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The tokenizer's padded batch (`input_ids`, `attention_mask`, `token_type_ids`, `special_tokens_mask`),
        equal to calling it on the batch with padding and truncation to `max_text_len`, but each distinct text (pair)
        is tokenised once per process: a corpus repeats its questions and captions every epoch (and VQA-style
        corpora within one), and the tokenizer call was ~2 ms of a ~30 ms tiny training step. Only the truncated
        ids are kept; padding is done here (right-padding tokenizers; others take the tokenizer's own path).
        `max_lens`: a row's own truncation length (None: `max_text_len`), each row then as the tokenizer truncates
        it alone at that length, all padded to the batch's longest (right-padding tokenizers only).
        `truncation="seed"` (single texts): each row is the tokenizer's `[CLS] tokens [SEP]` at one more token,
        cut to its length: `[CLS] tokens [SEP]` cut at the length, as vilbert_beta's readers cut (`TEXT_TRUNCATION`).
        With pairs, `seed_pairs`: the seed's `_truncate_seq_pair`, the first text cut in place across the rows of one
        group (`groups`: a row's example; consecutive rows of one group with the same first text share it)."""
        tok = self.tokenizer
        lens = [self.max_text_len if n is None else int(n) for n in (max_lens or [None] * len(texts))]
        per_row = any(n != self.max_text_len for n in lens)
        cut = 1 if self.truncation == "seed" and pairs is None else 0  # tokenised one longer, then cut
        if per_row and self.fixed_shapes and max(lens) > self.max_text_len:
            raise ValueError(f"collate: a row's max_text_len {max(lens)} exceeds the fixed {self.max_text_len}")
        right = getattr(tok, "padding_side", "right") == "right"
        if not right or tok.pad_token_id is None:
            if per_row:
                raise ValueError("collate: per-row text lengths need a right-padding tokenizer with a pad token")
            if self.truncation == "seed" and (not right or pairs is not None):
                raise ConfigError(
                    "data.text_truncation=seed cuts each row's end: it needs a right-padding tokenizer with a pad "
                    f"token ({type(tok).__name__}: {tok.padding_side} padding, pad token {tok.pad_token!r}); use "
                    "data.text_truncation=tokenizer"
                )
            enc = tok(
                texts,
                pairs,
                padding="max_length" if self.fixed_shapes else True,
                truncation=True,
                max_length=self.max_text_len + cut,
                return_tensors="pt",
                return_special_tokens_mask=True,
                return_token_type_ids=True,
            )
            return {key: value[:, : self.max_text_len] for key, value in enc.items()} if cut else enc
        if self.truncation == "seed" and pairs is not None:
            return self._padded(self.seed_pairs(texts, pairs, lens, groups))
        memo = self._memo_of("_memo")
        keys = list(zip(texts, pairs or [None] * len(texts), lens))  # (text, pair, truncation length)
        missing = [k for k in dict.fromkeys(keys) if k not in memo]
        if missing:
            if len(memo) + len(missing) > self.MEMO_SIZE:
                memo.clear()
            for length in dict.fromkeys(k[2] for k in missing):
                group = [k for k in missing if k[2] == length]
                new = tok(
                    [k[0] for k in group],
                    [k[1] for k in group] if pairs is not None else None,
                    padding=False,
                    truncation=True,
                    max_length=length + cut,
                    return_special_tokens_mask=True,
                    return_token_type_ids=True,
                    return_attention_mask=False,
                )
                for k, ids, types, special in zip(
                    group, new["input_ids"], new["token_type_ids"], new["special_tokens_mask"], strict=True
                ):
                    memo[k] = (ids[:length], types[:length], special[:length])
        return self._padded([memo[k] for k in keys])

    def _padded(self, rows: list[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """(ids, token types, special-tokens mask) per row -> the right-padded batch."""
        tok = self.tokenizer
        length = self.max_text_len if self.fixed_shapes else max(len(r[0]) for r in rows)
        ids = np.full((len(rows), length), tok.pad_token_id, dtype=np.int64)
        types = np.full((len(rows), length), getattr(tok, "pad_token_type_id", 0), dtype=np.int64)
        attention = np.zeros((len(rows), length), dtype=np.int64)
        special = np.ones((len(rows), length), dtype=np.int64)
        for i, (row_ids, row_types, row_special) in enumerate(rows):
            n = len(row_ids)
            ids[i, :n], types[i, :n], attention[i, :n], special[i, :n] = row_ids, row_types, 1, row_special
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(attention),
            "token_type_ids": torch.from_numpy(types),
            "special_tokens_mask": torch.from_numpy(special),
        }

    #: per-process memos of token ids (never pickled), each beside the tokenizer that made them (`<name>_tokenizer`)
    _MEMOS = ("_memo", "_piece_memo")

    def _memo_of(self, name: str) -> dict[Any, Any]:
        """The memo `name`, emptied when the tokenizer changed: ids belong to the tokenizer that made them."""
        memo = self.__dict__.get(name)
        if memo is None or self.__dict__.get(f"{name}_tokenizer") is not self.tokenizer:
            memo = self.__dict__[name] = {}
            self.__dict__[f"{name}_tokenizer"] = self.tokenizer
        return memo

    def _pieces(self, texts: list[str]) -> dict[str, tuple[list[int], list[int]]]:
        """text -> (word-piece ids without added special tokens, their special-tokens mask), memoised per process."""
        tok = self.tokenizer
        memo = self._memo_of("_piece_memo")
        missing = [t for t in dict.fromkeys(texts) if t not in memo]
        if missing:
            if len(memo) + len(missing) > self.MEMO_SIZE:
                memo.clear()
            new = tok(missing, add_special_tokens=False, return_special_tokens_mask=True, return_attention_mask=False)
            for text, ids, special in zip(missing, new["input_ids"], new["special_tokens_mask"], strict=True):
                memo[text] = (ids, special)
        return memo

    def seed_pairs(
        self, texts: list[str], pairs: list[str], lens: list[int], groups: list[Any] | None
    ) -> list[tuple[list[int], list[int], list[int]]]:
        """`[CLS] a [SEP] b [SEP]` rows cut as vilbert_beta's VCR reader cuts them (`_truncate_seq_pair` at the row's
        length - 3: one word piece at a time from the longer text, from `b` when they are as long), with its in-place
        carry-over: the first text's cut stays for the next rows of its group with the same first text (the seed
        truncates `tokens_a`, shared by an entry's four choices, in place), so a later choice sees the question as an
        earlier choice cut it. Without `groups` every row stands alone. Token types 0 up to the first [SEP], then 1."""
        tok = self.tokenizer
        if tok.cls_token_id is None or tok.sep_token_id is None:
            raise ConfigError(
                f"data.text_truncation=seed builds [CLS] a [SEP] b [SEP]: {type(tok).__name__} has no [CLS] / [SEP]"
            )
        pieces = self._pieces([*texts, *pairs])
        rows = []
        shared: tuple[Any, str] | None = None
        kept_a = 0
        for i, (text, pair, n) in enumerate(zip(texts, pairs, lens, strict=True)):
            (a, a_special), (b, b_special) = pieces[text], pieces[pair]
            here = None if groups is None else (groups[i], text)
            la = kept_a if here is not None and here == shared else len(a)
            lb = len(b)
            while la + lb > n - 3:
                if la > lb:
                    la -= 1
                else:
                    lb -= 1
            shared, kept_a = here, la
            ids = [tok.cls_token_id, *a[:la], tok.sep_token_id, *b[:lb], tok.sep_token_id]
            types = [0] * (la + 2) + [1] * (lb + 1)
            special = [1, *a_special[:la], 1, *b_special[:lb], 1]
            rows.append((ids, types, special))
        return rows

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._MEMOS:  # a worker / another process starts with empty memos
            state.pop(name, None)
            state.pop(f"{name}_tokenizer", None)
        return state

    def collate_choices(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Multiple-choice examples (`choices`: K*C dicts with `text`, optional `text_b` / `visual`, else the
        example's `visual`; `mc_labels`: K ints) -> B*K*C rows, block-major per example, plus `mc_labels` (B, K)."""
        rows = []
        for position, ex in enumerate(examples):
            for k, choice in enumerate(ex["choices"]):
                row = {
                    "text": choice["text"],
                    "visual": choice.get("visual", ex.get("visual")),
                    "choice_of": position,
                    "choice": k,
                }
                if "text_b" in choice:
                    row["text_b"] = choice["text_b"]
                if choice.get("max_text_len") is not None:
                    row["max_text_len"] = choice["max_text_len"]
                row["index"], row["epoch"] = ex.get("index", 0), ex.get("epoch", 0)
                rows.append(row)
        sizes = {len(ex["choices"]) for ex in examples}
        if len(sizes) != 1:
            raise ValueError(f"multiple-choice examples in one batch have different numbers of rows: {sorted(sizes)}")
        batch = self(rows)
        batch["mc_labels"] = torch.tensor([list(ex["mc_labels"]) for ex in examples], dtype=torch.long)
        batch["index"] = torch.tensor([ex.get("index", 0) for ex in examples])
        collate_labels(examples, self.labels, batch)
        return batch

    def check_keys(self, example: dict[str, Any]) -> None:
        unknown = set(example) - SHARED_EXAMPLE_KEYS - set(self.labels) - self.extra_keys
        if unknown:
            raise ValueError(
                f"collate: example keys {sorted(unknown)} are not declared; add them to the data module's "
                "`label_keys` (example key -> (batch key, kind))"
            )
