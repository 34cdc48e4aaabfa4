"""The embedded corpus as real image files, for the pixel-input models (CLIP-ViL, VG-BERT), in the COCO / Visual
Genome / LXMERT layout (written lazily, the first time a pixel model asks for it; `ensure_image_corpus`).

Under `<corpus root>/pixels/` (the image root; paths as the CLIP-ViL seed's `image_path` rule resolves them)::

    mscoco/train2014/COCO_train2014_<12-digit id>.jpg   train scenes with an even id
    vg_raw_images/VG_100K/<id>.jpg                      train scenes with an odd id (Visual Genome, "vgnococo")
    mscoco/val2014/COCO_val2014_<12-digit id>.jpg       val and test scenes
    png/<img_id>.png                                    every image again, lossless PNG
    mscoco/width_heigths.json                           {"data/<relative jpg path>": [h, w]}, the seed's format
    lxmert/{mscoco_train,vgnococo,mscoco_minival,mscoco_test}.json   LXMERT pretraining JSON
    lxmert/all_ans.json                                 the pretraining answers [{"ans", "dsets"}]
    vqa/{train,minival,test}.json                       LXMERT/CLIP-ViL VQA JSON
    vqa/trainval_ans2label.json, trainval_label2ans.json
    DONE.json                                           written last (counts); its absence means "write again"

Aspect ratios vary (image id mod 3: square, landscape 3:2, portrait 2:3), so aspect-ratio grouping has work to do.
A non-square image is the square scene with its shape *centres* spread along the long side and the shapes
themselves unchanged, so left / middle / right (centre x / width), left-of relations, colours, shapes and sizes stay
true; the boxes in `scene_boxes` are those of the written picture. JPEGs are written at quality 95 without chroma
subsampling (a region keeps its colour). Counting answers in the LXMERT JSON are written as words for odd question
ids ("two"), so the reader's `convert_ans` has work to do; VQA JSON labels are the VQA soft scores.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vl.data.formats.jsonl import write_dir_once
from vl.data.formats.vqa import vqa_soft_score
from vl.data.scenes.generator import (
    NUMBER_WORDS,
    POSITIONS,
    Scene,
    SceneSettings,
    answer_vocab,
    generate_scenes,
    render,
)
from vl.data.scenes.writers.core import write_json

__all__ = ["IMAGE_LAYOUT_VERSION", "ensure_image_corpus", "image_id_of", "pixel_scene", "extra_answers"]

IMAGE_LAYOUT_VERSION = "pixels-v2"  # v2: the seed's width_heigths.json
#: long side / short side of the non-square images
ASPECT = 1.5
#: answers of the pretraining answer list that no scene question has (the real list has 9500, the VQA one 3129)
EXTRA_PRETRAIN_ANSWERS = ("gray", "man", "woman", "dog", "cat", "tree", "car", "table")
#: a VQA answer that the pretraining list lacks (its head row is not copied)
EXTRA_VQA_ANSWERS = ("maybe",)


def image_id_of(scene: Scene) -> str:
    """The LXMERT `img_id` of a scene: COCO train2014 (even ids) / VG (odd ids) for train, COCO val2014 else."""
    if scene.split == "train":
        return f"COCO_train2014_{scene.image_id:012d}" if scene.image_id % 2 == 0 else str(scene.image_id)
    return f"COCO_val2014_{scene.image_id:012d}"


def jpg_path(img_id: str) -> str:
    if "val2014" in img_id:
        return f"mscoco/val2014/{img_id}.jpg"
    if "train2014" in img_id:
        return f"mscoco/train2014/{img_id}.jpg"
    return f"vg_raw_images/VG_100K/{img_id}.jpg"


def _position_word(cx: float, width: int) -> str:
    return POSITIONS[min(len(POSITIONS) - 1, int(len(POSITIONS) * cx / width))]


def pixel_scene(scene: Scene) -> Scene:
    """The scene as drawn in the image file: square, landscape or portrait (image id mod 3), shapes unchanged in
    size, centres spread along the long side (the position words are checked to stay the same)."""
    kind = scene.image_id % 3
    if kind == 0:
        return scene
    fx, fy = (ASPECT, 1.0) if kind == 1 else (1.0, ASPECT)
    width, height = round(scene.width * fx), round(scene.height * fy)
    shapes = []
    for p in scene.shapes:
        x1, y1, x2, y2 = p.box
        w, h = x2 - x1, y2 - y1
        cx, cy = (x1 + x2) / 2.0 * fx, (y1 + y2) / 2.0 * fy
        nx1 = min(max(0, round(cx - w / 2.0)), width - w)
        ny1 = min(max(0, round(cy - h / 2.0)), height - h)
        box = (nx1, ny1, nx1 + w, ny1 + h)
        new = dataclasses.replace(p, box=box)
        if _position_word(new.centre[0], width) != p.position:  # rounding moved it across a column edge
            return scene
        shapes.append(new)
    return dataclasses.replace(scene, width=width, height=height, shapes=tuple(shapes))


def extra_answers() -> tuple[tuple[str, ...], tuple[str, ...]]:
    return EXTRA_PRETRAIN_ANSWERS, EXTRA_VQA_ANSWERS


def _lxmert_answer(answer: str, question_id: int) -> str:
    if answer.isdigit() and question_id % 2 == 1:
        return NUMBER_WORDS[int(answer)]
    return answer


def write_image_corpus(out: Path, scenes: Sequence[Scene], settings: SceneSettings) -> dict[str, int]:
    """Write the layout above into `out` (see the module docstring); returns counts."""
    sizes: dict[str, list[int]] = {}
    for sc in scenes:
        drawn = pixel_scene(sc)
        img_id = image_id_of(sc)
        image = render(drawn)
        rel = jpg_path(img_id)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(out / rel, format="JPEG", quality=95, subsampling=0)
        (out / "png").mkdir(exist_ok=True)
        image.save(out / "png" / f"{img_id}.png", format="PNG")
        sizes[f"data/{rel}"] = [drawn.height, drawn.width]  # the seed's keys and (image.shape[0], image.shape[1])
    write_json(out / "mscoco" / "width_heigths.json", sizes)

    files = {"mscoco_train": [], "vgnococo": [], "mscoco_minival": [], "mscoco_test": []}
    vqa: dict[str, list[dict[str, Any]]] = {"train": [], "minival": [], "test": []}
    for sc in scenes:
        img_id = image_id_of(sc)
        caption_src = "vg" if not img_id.startswith("COCO") else "mscoco"
        labels = [
            {_lxmert_answer(a, q["question_id"]): vqa_soft_score(c) for a, c in Counter(q["answers"]).items()}
            for q in sc.questions
        ]
        datum = {
            "img_id": img_id,
            "sentf": {caption_src: list(sc.captions), "vqa": [q["question"] for q in sc.questions]},
            "labelf": {"vqa": labels},
        }
        name = {"train": "mscoco_train" if caption_src == "mscoco" else "vgnococo", "val": "mscoco_minival"}
        files[name.get(sc.split, "mscoco_test")].append(datum)
        for q in sc.questions:
            vqa[{"train": "train", "val": "minival"}.get(sc.split, "test")].append(
                {
                    "answer_type": q["answer_type"],
                    "img_id": img_id,
                    "label": {a: vqa_soft_score(c) for a, c in Counter(q["answers"]).items()},
                    "question_id": q["question_id"],
                    "question_type": q["question_type"],
                    "sent": q["question"],
                }
            )
    for name, datums in files.items():
        write_json(out / "lxmert" / f"{name}.json", datums)
    for name, questions in vqa.items():
        write_json(out / "vqa" / f"{name}.json", questions)
    vocab = answer_vocab(settings)
    pretrain = sorted(vocab + list(EXTRA_PRETRAIN_ANSWERS))  # another order than the VQA list: rows must be mapped
    write_json(out / "lxmert" / "all_ans.json", [{"ans": a, "dsets": ["vqa"]} for a in pretrain])
    label2ans = vocab + list(EXTRA_VQA_ANSWERS)
    write_json(out / "vqa" / "trainval_label2ans.json", label2ans)
    write_json(out / "vqa" / "trainval_ans2label.json", {a: i for i, a in enumerate(label2ans)})
    return {"images": len(scenes), **{f"lxmert_{k}": len(v) for k, v in files.items()}}


def ensure_image_corpus(corpus_root: str | Path, settings: SceneSettings | None = None) -> Path:
    """`<corpus_root>/pixels`, written on first use (under a lock; `DONE.json` last, so a half-written dir is
    rewritten). The default tier never pays for it: only the pixel-input data modules call this."""
    settings = settings or SceneSettings()
    stamp = {"version": IMAGE_LAYOUT_VERSION, "settings": settings.to_dict()}
    return write_dir_once(
        Path(corpus_root) / "pixels", stamp, lambda tmp: write_image_corpus(tmp, generate_scenes(settings), settings)
    )
