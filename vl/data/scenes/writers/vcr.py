"""The embedded scene corpus as a VCR corpus (the layout of ``vl.data.formats.vcr``): colour questions about shapes
with position rationales."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.features import write_region_lmdb
from vl.data.formats.jsonl import write_atomically, write_jsonl
from vl.data.formats.vcr import NUM_CHOICES, image_int_id, vcr_paths
from vl.data.scenes.generator import COLOURS, POSITIONS, SPLITS, Scene, SceneSettings, region_features

__all__ = ["write_vcr_corpus"]


def _text(text: str) -> Callable[[Path], None]:
    """A `write_atomically` writer of `text` (UTF-8, \\n line ends)."""
    return lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n")


#: names of the embedded corpus's names table (all in the real VCR table)
_SCENE_NAMES = (
    "Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody", "Kendall",
    "Skyler", "Frankie", "Quinn", "Harley", "Reese", "Emerson", "Rowan", "Dakota", "Sage", "Finley",
)  # fmt: skip
#: detection class of each scene shape (stars are "person" so that name replacement is exercised)
_SCENE_CLASSES = {"circle": "circle", "square": "square", "triangle": "triangle", "star": "person"}
_IMAGE_DIR = "scenes"
_QUESTIONS_PER_SCENE = 2


def _where(position: str) -> list[str]:
    return ["in", "the", "middle"] if position == "middle" else ["on", "the", position]


def _scene_questions(scene: Scene, settings: SceneSettings, objects: list[str]) -> list[dict[str, Any]]:
    """Up to 2 colour questions about shapes whose shape is unique in the scene (so the name / class word picks out one
    region). Q->A: "What color is [k] ?" -> "[k] is <colour> ." (3 wrong colours, preferring those of the other shapes).
    QA->R: "[k] looks <colour> and is <where> ." with (gold colour, true place) correct and (gold colour, wrong place
    w), (wrong colour, true place), (other wrong colour, w) as distractors: given the gold answer, text alone narrows
    the rationale to 2 of 4 and the region's position decides. Label positions are uniform, seeded by the scene."""
    rng = np.random.default_rng([settings.seed, 11, scene.image_id])
    shape_counts = Counter(p.shape for p in scene.shapes)
    unique = [k for k, p in enumerate(scene.shapes) if shape_counts[p.shape] == 1]
    picked = [unique[int(i)] for i in rng.permutation(len(unique))[:_QUESTIONS_PER_SCENE]]
    out = []
    for k in picked:
        shape = scene.shapes[k]
        in_scene = [c for c in dict.fromkeys(p.colour for p in scene.shapes) if c != shape.colour]
        others = [c for c in COLOURS if c != shape.colour and c not in in_scene]
        rng.shuffle(in_scene)
        rng.shuffle(others)
        wrong = (in_scene + others)[: NUM_CHOICES - 1]
        answer_label = int(rng.integers(NUM_CHOICES))
        colours = list(wrong)
        colours.insert(answer_label, shape.colour)
        wrong_places = [p for p in POSITIONS if p != shape.position]
        rng.shuffle(wrong_places)
        # every colour-matching rationale's place also appears twice in the set: no cross-choice text cue
        rationale_facts = [(shape.colour, wrong_places[0]), (wrong[0], shape.position), (wrong[1], wrong_places[0])]
        order = rng.permutation(len(rationale_facts))
        rationale_facts = [rationale_facts[int(i)] for i in order]
        rationale_label = int(rng.integers(NUM_CHOICES))
        rationale_facts.insert(rationale_label, (shape.colour, shape.position))
        out.append(
            {
                "question": ["What", "color", "is", [k], "?"],
                "answer_choices": [[[k], "is", c, "."] for c in colours],
                "rationale_choices": [[[k], "looks", c, "and", "is", *_where(pos), "."] for c, pos in rationale_facts],
                "answer_label": answer_label,
                "rationale_label": rationale_label,
                "objects": objects,
            }
        )
    return out


def write_vcr_corpus(root: str | Path, scenes: Sequence[Scene], settings: SceneSettings) -> list[Path]:
    """Write the scenes as a VCR corpus under ``root/vcr`` (see the module docstring for the layout):

    - ``{train,val,test}.jsonl``: the questions of each split's scenes (``_scene_questions``); img_id
      ``"<split>-<image_id>"``, annot_id ``"<split>-<k>"`` (k-th question of the split), objects = the scene's shapes
      left to right as classes (star -> "person"). Test records keep their labels so the corpus can be scored.
    - ``vcr1images/scenes/<image_id>.json`` metadata (names, boxes [x1,y1,x2,y2,1.0], width, height) per scene.
    - ``unisex_names_table.csv`` (20 names, the real table's columns).
    - ``regions.lmdb``: ``region_features`` of every scene (with cls_prob) keyed by ``image_int_id(img_id)``.

    Each file is replaced atomically; the JSONL files are written last. Returns every written path (the LMDB as
    ``regions.lmdb/data.mdb``)."""
    paths = vcr_paths(root)
    image_dir = paths["images"] / _IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    header = '"","name","total","male_share","female_share","gap"\n'
    lines = [f'"{i}","{n}",{1000.0 - i:.1f},0.5,0.5,0\n' for i, n in enumerate(_SCENE_NAMES, start=1)]
    write_atomically(paths["names"], _text(header + "".join(lines)))
    written.append(paths["names"])

    regions = []
    split_lines: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for sc in scenes:
        img_id = f"{sc.split}-{sc.image_id}"
        objects = [_SCENE_CLASSES[p.shape] for p in sc.shapes]
        meta_path = image_dir / f"{sc.image_id}.json"
        meta = {
            "boxes": [[float(v) for v in p.box] + [1.0] for p in sc.shapes],
            "names": objects,
            "width": sc.width,
            "height": sc.height,
        }
        write_atomically(meta_path, _text(json.dumps(meta)))
        written.append(meta_path)
        rec = region_features(sc, settings)
        rec.pop("labels")
        rec["image_id"] = image_int_id(img_id)
        regions.append(rec)
        for q in _scene_questions(sc, settings, objects):
            k = len(split_lines[sc.split])
            split_lines[sc.split].append(
                {
                    **q,
                    "img_id": img_id,
                    "annot_id": f"{sc.split}-{k}",
                    "img_fn": f"{_IMAGE_DIR}/{sc.image_id}.jpg",
                    "metadata_fn": f"{_IMAGE_DIR}/{sc.image_id}.json",
                    "question_number": k,
                }
            )
    write_region_lmdb(paths["regions"], regions)
    written.append(paths["regions"] / "data.mdb")
    for s in SPLITS:
        write_atomically(paths[s], lambda tmp, lines=split_lines[s]: write_jsonl(tmp, lines))
        written.append(paths[s])
    return written
