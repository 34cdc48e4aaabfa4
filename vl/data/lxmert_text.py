"""`data=lxmert_text`: the text of LXMERT's pretraining data as a plain MLM corpus (JSONL `{"text"}`), and the
converter from LXMERT's pretraining JSON (`mscoco_train.json`, `mscoco_nominival.json`, `vgnococo.json`, ...).

Conversion rules (the study's `process_train_data_for_MLM`):
  - every caption in `sentf["mscoco"]` / `sentf["vg"]` is kept as is;
  - every `vqa` / `gqa` / `visual7w` question gets its highest-scoring answer from `labelf[src][i]` appended, with a
    capitalised first letter, and a "." when the text does not end in "." or "!"; questions whose label dict is
    empty are skipped. (Other sources are ignored.)

    python -m vl.data.lxmert_text --out train_mlm.jsonl mscoco_train.json mscoco_nominival.json vgnococo.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vl.data.base import VLDataModule, split_key
from vl.data.jsonl import load_jsonl, read_json, write_jsonl
from vl.errors import DataError

CAPTION_SOURCES = ("mscoco", "vg")
QA_SOURCES = ("vqa", "gqa", "visual7w")


def qa_text(question: str, labels: dict[str, float]) -> str:
    """`question + " " + Answer` (+ "." unless the text ends in "." / "!"); `labels`: answer -> score, non-empty."""
    answer = max(labels.items(), key=lambda kv: kv[1])[0]
    text = f"{question} {answer[:1].upper()}{answer[1:]}"
    return text if text.endswith((".", "!")) else text + "."


def lxmert_texts(datums: Iterable[dict[str, Any]], *, source: str = "<lxmert json>") -> Iterator[str]:
    """The MLM sentences of LXMERT pretraining datums (`{"img_id", "sentf": {src: [..]}, "labelf": {src: [..]}}`)."""
    for n, datum in enumerate(datums):
        sentf = datum.get("sentf")
        if not isinstance(sentf, dict):
            raise DataError(f"{source}: datum {n} has no 'sentf' dict")
        labelf = datum.get("labelf") or {}
        for src, sents in sentf.items():
            if src in CAPTION_SOURCES:
                yield from sents
            elif src in QA_SOURCES:
                labels = labelf.get(src)
                if labels is None or len(labels) != len(sents):
                    raise DataError(
                        f"{source}: datum {n} ({datum.get('img_id')}): labelf[{src!r}] does not match sentf"
                    )
                for question, label in zip(sents, labels):
                    if label:
                        yield qa_text(question, label)


def convert_lxmert_json(inputs: Sequence[str | Path], out: str | Path) -> int:
    """LXMERT pretraining JSON files -> one `{"text"}` JSONL. Returns the number of lines written."""
    lines = []
    for path in inputs:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of LXMERT datums")
        lines += [{"text": t} for t in lxmert_texts(data, source=str(path))]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, lines)
    return len(lines)


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
    """`data=lxmert_text`: `jsonl` per split; text only (no visual input)."""

    def __init__(self, *, jsonl: str = "lxmert_text/{split}.jsonl", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.jsonl_file = jsonl

    def required_files(self) -> list[Path]:
        return [self.path(self.jsonl_file, split) for split in ("train", "val", "test")]

    def build_dataset(self, split: str) -> TextLines:
        path = self.path(self.jsonl_file, split)
        records = load_jsonl(path, required=("text",))
        for lineno, rec in enumerate(records, start=1):
            if not isinstance(rec["text"], str):
                raise DataError(f"{path}: record {lineno}: 'text' is not a string")
        return TextLines([r["text"] for r in records])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vl.data.lxmert_text", description="LXMERT pretraining JSON -> MLM text JSONL"
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="LXMERT JSON files (e.g. mscoco_train.json)")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL (e.g. train_mlm.jsonl)")
    args = parser.parse_args(argv)
    try:
        n = convert_lxmert_json(args.inputs, args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} lines to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
