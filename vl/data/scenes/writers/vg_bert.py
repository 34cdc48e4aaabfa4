"""The embedded corpus in VG-BERT's two formats (spec: vg_bert.md), next to the image files of
`vl.data.scenes.writers.images` (written lazily by the VG-BERT data modules; `ensure_vg_bert_corpus`).

Under `<corpus root>/pixels/vg_bert/`::

    coco_{train,val,test}.json   {"image_base_path": "..", "caption_base_path": "captions",
                                  "data": [{"image": "mscoco/val2014/COCO_val2014_<id>.jpg", "caption": "<img_id>.txt"}]}
    captions/<img_id>.txt        5 true caption lines (the scene's captions, then more from its caption pool)
    vg_{train,val,test}.json     {"image_base_path": "..", "data": [{"image", "object_description": ["small red
                                  circle", ...], "object_class": [1..32], "relation": n x n (0 = none)}]}
    relations.json               relation names by id (0 = none): left of, right of, above, below, bigger than,
                                 smaller than, same colour as
    object_classes.json          object class names by id (0 = none; 1 + shape x 8 + colour = "<colour> <shape>")
    DONE.json

Only the **square** images (image id mod 3 = 0) are listed: VG-BERT's input is Resize + CenterCrop, which would cut
shapes out of the landscape / portrait pictures, and every phrase and relation must be true of what the model sees.
Object phrases are "<size> <colour> <shape>" (Visual Genome style attribute + name). Each ordered pair (i, j), i != j,
gets one true relation by a fixed rule: "same colour as" when the colours match, else "bigger than" / "smaller than"
when the sizes differ, else the dominant axis of the centre offset ("left of" / "right of" when |dx| >= |dy|, else
"above" / "below"). Everything is checked against the drawn scene (`tests/data/test_vg_bert_data.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.formats.jsonl import write_dir_once
from vl.data.scenes.generator import Scene, SceneSettings, _caption_pool, generate_scenes
from vl.data.scenes.writers.core import write_json
from vl.data.scenes.writers.images import image_id_of, jpg_path, pixel_scene

__all__ = [
    "VG_BERT_LAYOUT_VERSION",
    "RELATIONS",
    "CAPTION_LINES",
    "relation_of",
    "object_phrase",
    "ensure_vg_bert_corpus",
    "write_vg_bert_corpus",
]

VG_BERT_LAYOUT_VERSION = "vg-bert-v1"
RELATIONS: tuple[str, ...] = (
    "__none__",
    "left of",
    "right of",
    "above",
    "below",
    "bigger than",
    "smaller than",
    "same colour as",
)
CAPTION_LINES = 5


def object_phrase(shape: Any) -> str:
    return f"{shape.size} {shape.colour} {shape.shape}"


def relation_of(a: Any, b: Any) -> int:
    """The relation id of the ordered pair (a, b) of two distinct shapes (module docstring)."""
    if a.colour == b.colour:
        return RELATIONS.index("same colour as")
    if a.size != b.size:
        return RELATIONS.index("bigger than" if a.size == "large" else "smaller than")
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        return RELATIONS.index("left of" if ax < bx else "right of")
    return RELATIONS.index("above" if ay < by else "below")


def _captions(scene: Scene) -> list[str]:
    lines = list(dict.fromkeys(scene.captions))
    rest = [c for c in _caption_pool(scene.shapes) if c not in lines]
    rng = np.random.default_rng(scene.image_id)
    lines += [rest[int(i)] for i in rng.permutation(len(rest))]
    return lines[:CAPTION_LINES]


def write_vg_bert_corpus(out: Path, scenes: Sequence[Scene]) -> dict[str, int]:
    """Write the layout above into `out` (= `<pixels>/vg_bert`); returns counts."""
    from vl.data.scenes.generator import COLOURS, SHAPES, region_class

    coco: dict[str, list[dict[str, str]]] = {s: [] for s in ("train", "val", "test")}
    vg: dict[str, list[dict[str, Any]]] = {s: [] for s in ("train", "val", "test")}
    (out / "captions").mkdir(parents=True, exist_ok=True)
    for sc in scenes:
        if sc.image_id % 3:
            continue
        drawn = pixel_scene(sc)
        img_id = image_id_of(sc)
        (out / "captions" / f"{img_id}.txt").write_text("\n".join(_captions(sc)) + "\n", encoding="utf-8")
        coco[sc.split].append({"image": jpg_path(img_id), "caption": f"{img_id}.txt"})
        shapes = drawn.shapes
        vg[sc.split].append(
            {
                "image": jpg_path(img_id),
                "object_description": [object_phrase(p) for p in shapes],
                "object_class": [region_class(p.shape, p.colour) for p in shapes],
                "relation": [
                    [0 if i == j else relation_of(a, b) for j, b in enumerate(shapes)] for i, a in enumerate(shapes)
                ],
            }
        )
    for split in coco:
        write_json(
            out / f"coco_{split}.json", {"image_base_path": "..", "caption_base_path": "captions", "data": coco[split]}
        )
        write_json(out / f"vg_{split}.json", {"image_base_path": "..", "data": vg[split]})
    write_json(out / "relations.json", list(RELATIONS))
    write_json(out / "object_classes.json", ["__none__"] + [f"{c} {s}" for s in SHAPES for c in COLOURS])
    return {f"{split}": len(rows) for split, rows in coco.items()}


def ensure_vg_bert_corpus(pixels_root: str | Path, settings: SceneSettings | None = None) -> Path:
    """`<pixels_root>/vg_bert`, written on first use under a lock (`DONE.json` last; a stale or half-written dir is
    rewritten). `pixels_root`: `ensure_image_corpus`'s result for the same settings."""
    settings = settings or SceneSettings()
    stamp = {"version": VG_BERT_LAYOUT_VERSION, "settings": settings.to_dict()}
    return write_dir_once(
        Path(pixels_root) / "vg_bert", stamp, lambda tmp: write_vg_bert_corpus(tmp, generate_scenes(settings))
    )
