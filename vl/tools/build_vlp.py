"""Build the VLP JSONL corpus (`train.jsonl` / `val.jsonl`, lines `{"text", "image_id"}`) from the original
annotation files, with the CLIP-BERT study's image-id and split rules:

  - COCO captions JSON (2017): every caption, id `coco_<image id>`; the train file -> train, the val file -> val.
  - SBU: the URL list and the caption list (line-aligned); id `sbu_<file name of the URL without .jpg>`
    (`.../4385058960_b0f291553e.jpg` -> `sbu_4385058960_b0f291553e`); the first `--sbu-val-size` (10 000) lines ->
    val, the rest -> train.
  - Visual Genome QA (`question_answers.json`): `question + " " + answer`, id `vgqa_<image id>`; all pairs shuffled
    (`--seed`), the first `--vgqa-val-size` (10 000) -> val, the rest -> train.
  - Conceptual Captions TSV (`caption<TAB>url` per row): id `cc_train_<row>` / `cc_val_<row>`, rows numbered
    from 1 (the first row is `cc_train_1`), from the training / validation file.

These are the ids of the seed's recipe (`VLP.mk`), so a CLIP feature file built by that recipe matches the JSONL.

    python -m vl.tools.build_vlp --out data/vlp --coco-train captions_train2017.json --coco-val captions_val2017.json \\
        --sbu-urls SBU_captioned_photo_dataset_urls.txt --sbu-captions SBU_captioned_photo_dataset_captions.txt \\
        --vgqa question_answers.json --cc-train Train_GCC-training.tsv --cc-val Validation_GCC-1.1.0-Validation.tsv
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vl.data.formats.jsonl import read_json, write_jsonl
from vl.errors import DataError

Line = dict[str, str]


def coco_lines(path: str | Path) -> list[Line]:
    """COCO captions JSON -> `{"text": caption, "image_id": "coco_<image_id>"}` per annotation."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not a COCO captions file (no 'annotations' list)")
    lines = []
    for n, ann in enumerate(data["annotations"]):
        try:
            lines.append({"text": str(ann["caption"]).strip(), "image_id": f"coco_{ann['image_id']}"})
        except (KeyError, TypeError):
            raise DataError(f"{path}: annotation {n} lacks 'caption' or 'image_id'") from None
    return lines


def _read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def sbu_lines(urls: str | Path, captions: str | Path, *, val_size: int = 10_000) -> tuple[list[Line], list[Line]]:
    """SBU URL + caption lists -> (train, val); id `sbu_<URL file name without .jpg>`; the first `val_size` lines
    are val."""
    url_list, cap_list = _read_lines(urls), _read_lines(captions)
    if len(url_list) != len(cap_list):
        raise DataError(f"{captions}: {len(cap_list)} captions but {urls} has {len(url_list)} URLs")
    lines = []
    for n, (url, cap) in enumerate(zip(url_list, cap_list), start=1):
        name = url.strip().rstrip("/").rsplit("/", 1)[-1]
        if not name:
            raise DataError(f"{urls}:{n}: empty URL")
        if name.endswith(".jpg"):
            name = name[: -len(".jpg")]
        lines.append({"text": cap.strip(), "image_id": f"sbu_{name}"})
    return lines[val_size:], lines[:val_size]


def vgqa_lines(path: str | Path, *, val_size: int = 10_000, seed: int = 0) -> tuple[list[Line], list[Line]]:
    """Visual Genome `question_answers.json` -> (train, val); `question answer`, id `vgqa_<image_id>`; shuffled with
    `seed`, the first `val_size` are val."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{'id', 'qas'}} entries")
    lines = []
    for n, entry in enumerate(data):
        try:
            for qa in entry["qas"]:
                image_id = qa.get("image_id", entry.get("id"))
                text = f"{qa['question'].strip()} {qa['answer'].strip()}"
                lines.append({"text": text, "image_id": f"vgqa_{image_id}"})
        except (KeyError, TypeError, AttributeError):
            raise DataError(f"{path}: entry {n} is not {{'id', 'qas': [{{'question', 'answer'}}]}}") from None
    random.Random(seed).shuffle(lines)
    return lines[val_size:], lines[:val_size]


def cc_lines(path: str | Path, split: str) -> list[Line]:
    """Conceptual Captions TSV (`caption<TAB>url`) -> id `cc_<split>_<row>`, rows numbered from 1."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    lines = []
    with path.open(encoding="utf-8", newline="") as f:
        for row, fields in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not fields or not fields[0].strip():
                raise DataError(f"{path}:{row}: expected 'caption<TAB>url'")
            lines.append({"text": fields[0].strip(), "image_id": f"cc_{split}_{row}"})
    return lines


def build_vlp(
    *,
    coco_train: Sequence[str | Path] = (),
    coco_val: Sequence[str | Path] = (),
    sbu: tuple[str | Path, str | Path] | None = None,
    vgqa: str | Path | None = None,
    cc_train: str | Path | None = None,
    cc_val: str | Path | None = None,
    sbu_val_size: int = 10_000,
    vgqa_val_size: int = 10_000,
    seed: int = 0,
) -> dict[str, list[Line]]:
    """All given sources -> {"train": [...], "val": [...]} (sources in the order COCO, SBU, VG-QA, CC)."""
    out: dict[str, list[Line]] = {"train": [], "val": []}
    for path in coco_train:
        out["train"] += coco_lines(path)
    for path in coco_val:
        out["val"] += coco_lines(path)
    if sbu is not None:
        train, val = sbu_lines(*sbu, val_size=sbu_val_size)
        out["train"] += train
        out["val"] += val
    if vgqa is not None:
        train, val = vgqa_lines(vgqa, val_size=vgqa_val_size, seed=seed)
        out["train"] += train
        out["val"] += val
    if cc_train is not None:
        out["train"] += cc_lines(cc_train, "train")
    if cc_val is not None:
        out["val"] += cc_lines(cc_val, "val")
    return out


def write_vlp(out_dir: str | Path, splits: dict[str, list[Line]]) -> dict[str, Any]:
    """`out_dir/{split}.jsonl`; returns {split: line count}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        write_jsonl(out_dir / f"{split}.jsonl", lines)
    return {split: len(lines) for split, lines in splits.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vl.tools.build_vlp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output dir for train.jsonl / val.jsonl")
    parser.add_argument("--coco-train", nargs="*", default=[], type=Path, help="COCO captions JSON -> train")
    parser.add_argument("--coco-val", nargs="*", default=[], type=Path, help="COCO captions JSON -> val")
    parser.add_argument("--sbu-urls", type=Path, help="SBU_captioned_photo_dataset_urls.txt")
    parser.add_argument("--sbu-captions", type=Path, help="SBU_captioned_photo_dataset_captions.txt")
    parser.add_argument("--vgqa", type=Path, help="Visual Genome question_answers.json")
    parser.add_argument("--cc-train", type=Path, help="Conceptual Captions training TSV")
    parser.add_argument("--cc-val", type=Path, help="Conceptual Captions validation TSV")
    parser.add_argument("--sbu-val-size", type=int, default=10_000)
    parser.add_argument("--vgqa-val-size", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="VG-QA shuffle seed")
    args = parser.parse_args(argv)
    if (args.sbu_urls is None) != (args.sbu_captions is None):
        parser.error("--sbu-urls and --sbu-captions go together")
    sbu = (args.sbu_urls, args.sbu_captions) if args.sbu_urls else None
    if not (args.coco_train or args.coco_val or sbu or args.vgqa or args.cc_train or args.cc_val):
        parser.error("give at least one source")
    try:
        splits = build_vlp(
            coco_train=args.coco_train,
            coco_val=args.coco_val,
            sbu=sbu,
            vgqa=args.vgqa,
            cc_train=args.cc_train,
            cc_val=args.cc_val,
            sbu_val_size=args.sbu_val_size,
            vgqa_val_size=args.vgqa_val_size,
            seed=args.seed,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts = write_vlp(args.out, splits)
    print(f"wrote {counts} lines to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
