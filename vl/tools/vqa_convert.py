"""Official VQA v2 questions + annotations JSON -> the project's VQA files (what `data=vqa` reads).

    python -m vl.tools.vqa_convert --out data/vqa --answers trainval_ans2label.json \\
        --train-questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --train-annotations v2_mscoco_train2014_annotations.json \\
        --val-questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --val-annotations v2_mscoco_val2014_annotations.json

Writes, under `--out`:
- `cache/{train,val}_target.pkl`: `[{question_id, image_id, labels, scores}]` (soft scores of the answers in the
  vocabulary: `vqa_format.build_targets`; `--matching raw`, the default, counts the raw human strings as the
  bottom-up-attention `compute_softscore.py` that built the ViLBERT seed's caches; `2021` / `2016` match answers as
  that release of the official evaluator does, i.e. the credit a model predicting the answer gets);
- with both train and val, the seed's split (`vqa_answers.trainval_minval_split`): `minval` = the last `--minval-size`
  (3000) val questions by question id, `trainval` = all train questions then the other val questions (each sorted by
  question id); `cache/{trainval,minval}_target.pkl` and `v2_OpenEnded_mscoco_{trainval,minval}2014_questions.json`;
- `cache/trainval_ans2label.pkl` / `cache/trainval_label2ans.pkl` (the vocabulary given by `--answers`, a JSON or
  pickle answer->label dict or label->answer list).

Train on trainval and validate on minval with `data.splits={train: trainval, val: minval}`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vl.data.formats.jsonl import write_atomically
from vl.data.formats.vqa import build_targets, load_annotations, load_answer_vocab, load_label2ans, load_questions
from vl.data.formats.vqa_answers import EVALUATORS, trainval_minval_split
from vl.errors import DataError


def _progress(items: Sequence[Any], desc: str, enabled: bool) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="q", disable=not enabled, file=sys.stderr)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def _read_split(questions_path: Path, annotations_path: Path) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """The questions file's top level (for its info fields), its questions and the annotations in question order;
    every question must have exactly one annotation and vice versa."""
    questions = load_questions(questions_path)
    annotations = load_annotations(annotations_path)
    by_id: dict[int, dict] = {}
    for a in annotations:
        if a["question_id"] in by_id:
            raise DataError(f"{annotations_path}: question {a['question_id']} is annotated twice")
        by_id[a["question_id"]] = a
    qids = {q["question_id"] for q in questions}
    extra = next((qid for qid in by_id if qid not in qids), None)
    if extra is not None:
        raise DataError(f"{annotations_path}: question {extra} is not in {questions_path}")
    missing = next((q["question_id"] for q in questions if q["question_id"] not in by_id), None)
    if missing is not None:
        raise DataError(f"{questions_path}: question {missing} has no annotation in {annotations_path}")
    with questions_path.open(encoding="utf-8") as f:
        top = {k: v for k, v in json.load(f).items() if k != "questions"}
    return top, questions, [by_id[q["question_id"]] for q in questions]


def convert_vqa(
    out_dir: str | Path,
    answers: str | Path,
    splits: dict[str, tuple[str | Path, str | Path]],
    *,
    minval_size: int = 3000,
    matching: str = "raw",
    progress: bool = True,
) -> dict[str, int]:
    """`splits`: {"train" | "val": (questions JSON, annotations JSON)}. Returns {file stem: number of entries}."""
    out = Path(out_dir)
    unknown = set(splits) - {"train", "val"}
    if unknown:
        raise ValueError(f"splits: unknown {sorted(unknown)}; use 'train' and/or 'val'")
    ans2label = load_answer_vocab(answers)
    label2ans = load_label2ans(answers)
    data: dict[str, tuple[dict[str, Any], list[dict], list[dict]]] = {}
    for name, (qpath, apath) in splits.items():
        data[name] = _read_split(Path(qpath), Path(apath))  # all inputs checked before anything is written
    counts: dict[str, int] = {}
    targets: dict[str, dict[int, dict]] = {}
    for name, (_, _, anns) in data.items():
        rows = build_targets(_progress(anns, f"{name} targets", progress), ans2label, matching=matching)
        targets[name] = {t["question_id"]: t for t in rows}
        _atomic_write(out / "cache" / f"{name}_target.pkl", pickle.dumps(rows))
        counts[f"{name}_target"] = len(rows)
    if "train" in data and "val" in data:
        train_top, train_q, _ = data["train"]
        _, val_q, _ = data["val"]
        to_trainval, minval_ids = trainval_minval_split([q["question_id"] for q in val_q], minval_size)
        val_by_id = {q["question_id"]: q for q in val_q}
        split_questions = {
            "trainval": sorted(train_q, key=lambda q: q["question_id"]) + [val_by_id[i] for i in to_trainval],
            "minval": [val_by_id[i] for i in minval_ids],
        }
        for name, qs in split_questions.items():
            rows = [targets["train"].get(q["question_id"]) or targets["val"][q["question_id"]] for q in qs]
            _atomic_write(out / "cache" / f"{name}_target.pkl", pickle.dumps(rows))
            top = {**train_top, "data_subtype": f"{name}2014", "questions": qs}
            _atomic_write(out / f"v2_OpenEnded_mscoco_{name}2014_questions.json", json.dumps(top).encode())
            counts[f"{name}_target"] = len(rows)
    _atomic_write(out / "cache" / "trainval_ans2label.pkl", pickle.dumps(dict(ans2label)))
    _atomic_write(out / "cache" / "trainval_label2ans.pkl", pickle.dumps(label2ans))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vl.tools.vqa_convert", description=__doc__.split("\n\n")[0], epilog="see the module docstring"
    )
    parser.add_argument("--out", required=True, type=Path, help="output dir (the `vqa/` dir of data=vqa's root)")
    parser.add_argument("--answers", required=True, type=Path, help="answer vocabulary (ans2label / label2ans)")
    for split in ("train", "val"):
        parser.add_argument(f"--{split}-questions", type=Path, help=f"v2_OpenEnded_mscoco_{split}2014_questions.json")
        parser.add_argument(f"--{split}-annotations", type=Path, help=f"v2_mscoco_{split}2014_annotations.json")
    parser.add_argument("--minval-size", type=int, default=3000, help="val questions kept out of trainval (3000)")
    parser.add_argument(
        "--matching",
        choices=[*EVALUATORS, "raw"],
        default="raw",
        help="answer matching (vqa_format.build_targets): raw = the ViLBERT seed's caches (default); 2021 / 2016 = the "
        "official evaluator's",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    splits = {}
    for split in ("train", "val"):
        q, a = getattr(args, f"{split}_questions"), getattr(args, f"{split}_annotations")
        if (q is None) != (a is None):
            parser.error(f"--{split}-questions and --{split}-annotations go together")
        if q is not None:
            splits[split] = (q, a)
    if not splits:
        parser.error("give --train-questions/--train-annotations and/or --val-questions/--val-annotations")
    if args.minval_size < 0:
        parser.error("--minval-size must be >= 0")
    try:
        counts = convert_vqa(
            args.out,
            args.answers,
            splits,
            minval_size=args.minval_size,
            matching=args.matching,
            progress=not args.quiet,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {counts} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
