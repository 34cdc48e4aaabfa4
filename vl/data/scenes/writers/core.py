"""The embedded scene corpus's shared files, each in its real format: images (PNG), captions (COCO JSON, VLP JSONL,
Conceptual-Captions TSV), region and CLIP features (LMDB, HDF5, FRCNN JSON), VQA (official questions / annotations,
target caches, answer vocabulary) and LXMERT pretraining JSON; and the JSON / pickle writers every writer uses.
`vl.data.scenes.corpus` calls them and keeps the manifest."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.features import write_clip_hdf5, write_region_hdf5, write_region_json, write_region_lmdb
from vl.data.formats.jsonl import write_jsonl
from vl.data.formats.lxmert import lxmert_texts
from vl.data.formats.vqa import build_targets, vqa_soft_score
from vl.data.scenes.generator import SPLITS, Scene, SceneSettings, clip_embedding, region_features, render
from vl.progress import progress

__all__ = [
    "write_captions",
    "write_features",
    "write_images",
    "write_json",
    "write_lxmert",
    "write_pickle",
    "write_vqa",
]


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f)


def write_pickle(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=4)


def write_images(paths: dict[str, Path], scenes: Sequence[Scene]) -> list[Path]:
    """``images/<image_id>.png`` for every scene."""
    paths["images"].mkdir(parents=True, exist_ok=True)
    written = []
    for sc in progress(scenes, desc="corpus: images", unit="img"):
        p = paths["images"] / f"{sc.image_id}.png"
        render(sc).save(p, format="PNG")
        written.append(p)
    return written


def write_captions(paths: dict[str, Path], by_split: dict[str, list[Scene]], info: dict[str, Any]) -> list[Path]:
    """COCO captions JSON, VLP JSONL and Conceptual-Captions-style TSV (`caption<TAB>image_id`) per split
    (annotation ids run on across the splits)."""
    written: list[Path] = []
    ann_id = 0
    for s in SPLITS:
        images, anns, lines = [], [], []
        for sc in by_split[s]:
            images.append(
                {"id": sc.image_id, "file_name": f"{sc.image_id}.png", "width": sc.width, "height": sc.height}
            )
            for cap in sc.captions:
                ann_id += 1
                anns.append({"id": ann_id, "image_id": sc.image_id, "caption": cap})
                lines.append({"text": cap, "image_id": str(sc.image_id)})
        write_json(paths[f"captions_{s}"], {"info": {**info, "split": s}, "images": images, "annotations": anns})
        paths[f"vlp_{s}"].parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(paths[f"vlp_{s}"], lines)
        paths[f"cc_{s}"].parent.mkdir(parents=True, exist_ok=True)
        paths[f"cc_{s}"].write_text("".join(f"{a['caption']}\t{a['image_id']}\n" for a in anns), encoding="utf-8")
        written += [paths[f"captions_{s}"], paths[f"vlp_{s}"], paths[f"cc_{s}"]]
    return written


def write_features(paths: dict[str, Path], scenes: Sequence[Scene], settings: SceneSettings) -> list[Path]:
    """The CLIP HDF5, and the same region features as LMDB, HDF5 and per-image FRCNN JSON."""
    write_clip_hdf5(
        paths["clip"], [str(sc.image_id) for sc in scenes], np.stack([clip_embedding(sc, settings) for sc in scenes])
    )
    region_records = []
    for sc in progress(scenes, desc="corpus: region features", unit="img"):
        rec = region_features(sc, settings)
        rec.pop("labels")
        region_records.append(rec)
    write_region_lmdb(paths["regions"], region_records)
    write_region_hdf5(paths["regions_hdf5"], region_records)
    write_region_json(paths["regions_json"], region_records)
    written = [paths["clip"], paths["regions"] / "data.mdb", paths["regions_hdf5"]]
    return written + [paths["regions_json"] / f"{sc.image_id}.json" for sc in scenes]


def vqa_annotation(image_id: int, q: dict[str, Any]) -> dict[str, Any]:
    """Official VQA annotation of question ``q`` (its true answer is the multiple-choice answer when tied)."""
    mc = Counter(q["answers"]).most_common()
    top = mc[0][1]
    mc_answer = q["answer"] if Counter(q["answers"])[q["answer"]] == top else mc[0][0]
    return {
        "question_id": q["question_id"],
        "image_id": image_id,
        "question_type": q["question_type"],
        "answer_type": q["answer_type"],
        "multiple_choice_answer": mc_answer,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(q["answers"])],
    }


def write_vqa(
    paths: dict[str, Path], by_split: dict[str, list[Scene]], info: dict[str, Any], label2ans: list[str]
) -> list[Path]:
    """Official VQA questions / annotations and target caches per split, then the answer vocabulary files."""
    ans2label = {a: i for i, a in enumerate(label2ans)}
    written: list[Path] = []
    for s in SPLITS:
        questions, annotations = [], []
        for sc in by_split[s]:
            for q in sc.questions:
                questions.append({"image_id": sc.image_id, "question": q["question"], "question_id": q["question_id"]})
                annotations.append(vqa_annotation(sc.image_id, q))
        common = {"info": {**info, "split": s}, "task_type": "Open-Ended", "data_type": "mscoco"}
        write_json(paths[f"vqa_questions_{s}"], {**common, "data_subtype": f"{s}2014", "questions": questions})
        write_json(paths[f"vqa_annotations_{s}"], {**common, "data_subtype": f"{s}2014", "annotations": annotations})
        targets = build_targets(annotations, ans2label)
        write_pickle(paths[f"vqa_targets_{s}"], targets)
        write_json(paths[f"vqa_targets_json_{s}"], targets)
        written += [
            paths[f"vqa_questions_{s}"],
            paths[f"vqa_annotations_{s}"],
            paths[f"vqa_targets_{s}"],
            paths[f"vqa_targets_json_{s}"],
        ]
    write_pickle(paths["ans2label_pkl"], ans2label)
    write_pickle(paths["label2ans_pkl"], label2ans)
    write_json(paths["ans2label"], ans2label)
    write_json(paths["label2ans"], label2ans)
    return written + [paths["ans2label_pkl"], paths["label2ans_pkl"], paths["ans2label"], paths["label2ans"]]


def write_lxmert(paths: dict[str, Path], by_split: dict[str, list[Scene]]) -> list[Path]:
    """LXMERT pretraining JSON per split (``[{"img_id", "sentf": {"mscoco": captions, "vqa": questions},
    "labelf": {"vqa": [{answer: score}]}}]``, VQA soft scores 0.3 / 0.6 / 0.9 / 1 of the annotator count as LXMERT's
    files have them, `vqa_soft_score`) and its MLM text JSONL
    (``vl.data.formats.lxmert`` rules)."""
    written: list[Path] = []
    for s in SPLITS:
        datums = []
        for sc in by_split[s]:
            labels = [{a: vqa_soft_score(c) for a, c in Counter(q["answers"]).items()} for q in sc.questions]
            datums.append(
                {
                    "img_id": f"scene_{sc.image_id}",
                    "sentf": {"mscoco": list(sc.captions), "vqa": [q["question"] for q in sc.questions]},
                    "labelf": {"vqa": labels},
                }
            )
        write_json(paths[f"lxmert_{s}"], datums)
        paths[f"lxmert_text_{s}"].parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(paths[f"lxmert_text_{s}"], [{"text": t} for t in lxmert_texts(datums)])
        written += [paths[f"lxmert_{s}"], paths[f"lxmert_text_{s}"]]
    return written
