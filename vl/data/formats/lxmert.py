"""LXMERT pretraining JSON (`mscoco_train.json`, `mscoco_nominival.json`, `vgnococo.json`, ...) -> MLM text lines.

Conversion rules (the study's `process_train_data_for_MLM`):
  - every caption in `sentf["mscoco"]` / `sentf["vg"]` is kept as is;
  - every `vqa` / `gqa` / `visual7w` question gets its highest-scoring answer from `labelf[src][i]` appended, with a
    capitalised first letter, and a "." when the text does not end in "." or "!"; questions whose label dict is
    empty are skipped. (Other sources are ignored.)

    python -m vl.tools.lxmert_text --out train_mlm.jsonl mscoco_train.json mscoco_nominival.json vgnococo.json
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vl.data.formats.jsonl import write_jsonl
from vl.data.formats.lxmert_pretrain import load_pretrain_json
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
    """LXMERT pretraining JSON files -> one `{"text"}` JSONL. Returns the number of lines written. Each file is
    checked as CLIP-ViL pretraining reads it (`load_pretrain_json`: string sentences, scores in [0, 1])."""
    lines = []
    for path in inputs:
        lines += [{"text": t} for t in lxmert_texts(load_pretrain_json(path), source=str(path))]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, lines)
    return len(lines)
