"""`data=lxmert_text`: the text of LXMERT's pretraining data as a plain MLM corpus (JSONL `{"text"}`); the JSON ->
JSONL conversion is `vl.data.formats.lxmert` (`python -m vl.tools.lxmert_text`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vl.data.base import VLDataModule
from vl.data.formats.jsonl import load_jsonl
from vl.data.samplers import split_key
from vl.errors import DataError


class TextLines(Dataset):
    """One example `{"text"}` per JSONL line."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key)
        return {"text": self.texts[index], "index": index, "epoch": epoch}


class LxmertTextDataModule(VLDataModule):
    """`data=lxmert_text`: `jsonl` per split; text only (no visual input). The CLIP-BERT study's BERT-LXMERT-train
    corpus (the seed's `pretrain.py --text-dataset`, the same collator as CLIP-BERT's).
    `mlm_skip_special_ids`: MLM never picks any id in `tokenizer.all_special_ids` ([UNK] in the text included), as
    the CLIP-BERT seed's HF `DataCollatorForLanguageModeling` (default); false: only the tokenizer's added [CLS] /
    [SEP] and padding are skipped, as the shared collator does for the other systems."""

    def __init__(
        self, *, jsonl: str = "lxmert_text/{split}.jsonl", mlm_skip_special_ids: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.jsonl_file = jsonl
        self.mlm_skip_special_ids = mlm_skip_special_ids

    def required_files(self) -> list[Path]:
        return [self.path(self.jsonl_file, split) for split in ("train", "val", "test")]

    def build_dataset(self, split: str) -> TextLines:
        path = self.path(self.jsonl_file, split)
        records = load_jsonl(path, required=("text",))
        for lineno, rec in enumerate(records, start=1):
            if not isinstance(rec["text"], str):
                raise DataError(f"{path}: record {lineno}: 'text' is not a string")
        return TextLines([r["text"] for r in records])
