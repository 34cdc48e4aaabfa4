"""The embedded scene corpus, what a scene is: a deterministic procedural generator of shape scenes.

Every image is a grey canvas with 1..max_shapes coloured shapes; every caption, question answer, box and feature is
derived from (and true of) the scene. This module holds the settings, the vocabularies, the generator
(``generate_scenes``), the renderer (``render``) and the feature projections (``region_features``,
``clip_embedding``). Writing the corpus to disk in the real formats is ``vl.data.scenes.writers`` (one module per
format) and ``vl.data.scenes.corpus`` (``write_corpus``, ``verify_corpus``, ``ensure_corpus``, the manifest).
``python -m vl.tools.scenes --out DIR`` writes a corpus by hand.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vl.config import CorpusConfig

__all__ = [
    "where_phrase",
    "GENERATOR_VERSION",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "COLOUR_RGB",
    "SPLITS",
    "NUM_REGION_CLASSES",
    "SceneSettings",
    "SceneShape",
    "Scene",
    "generate_scenes",
    "render",
    "region_class",
    "region_class_names",
    "region_features",
    "clip_embedding",
    "answer_vocab",
]

GENERATOR_VERSION = "scenes-v5"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "black", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
SPLITS: tuple[str, ...] = ("train", "val", "test")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUND_RGB = (128, 128, 128)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: region classes: 0 = background, 1 + shape_index * len(COLOURS) + colour_index = "<colour> <shape>"
NUM_REGION_CLASSES = 1 + len(SHAPES) * len(COLOURS)
#: region attribute vector: one-hot shape, one-hot colour, one-hot size, box centre (cx/W - 0.5, cy/H - 0.5)
REGION_ATTR_DIM = len(SHAPES) + len(COLOURS) + len(SIZES) + 2
#: CLIP bag: counts of (shape, colour) and of (shape, colour, size)
CLIP_ATTR_DIM = len(SHAPES) * len(COLOURS) * (1 + len(SIZES))
NUM_ANNOTATORS = 10
_PROJECTION_SEED = 7_041_997
_SIZE_FRACTION = {"small": 0.22, "large": 0.34}
_CLS_PEAK = 6.0


def _check_settings(self: Any) -> None:
    if self.num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {self.num_images}")
    if not 1 <= self.max_shapes <= min(9, len(SHAPES) * len(COLOURS)):
        raise ValueError(f"max_shapes must be in 1..9, got {self.max_shapes}")
    if self.image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {self.image_size}")
    if min(self.region_dim, self.clip_dim) < 1 or self.num_background_regions < 0:
        raise ValueError("region_dim and clip_dim must be >= 1, num_background_regions >= 0")
    if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be >= 0 and sum to < 1")
    if self.captions_per_image < 1 or self.questions_per_image < 0:
        raise ValueError("captions_per_image must be >= 1 and questions_per_image >= 0")
    if self.feature_noise < 0 or not 0 <= self.answer_noise <= 1:
        raise ValueError("feature_noise must be >= 0 and answer_noise in [0, 1]")


#: Everything that determines a corpus (its cache key is a hash of these fields + GENERATOR_VERSION): the fields and
#: defaults of the config schema `vl.config.CorpusConfig` (stated once there), frozen and validated.
SceneSettings = dataclasses.make_dataclass(
    "SceneSettings",
    [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(CorpusConfig)],
    frozen=True,
    namespace={"__post_init__": _check_settings, "to_dict": lambda self: dataclasses.asdict(self)},
)
SceneSettings.__module__ = __name__


@dataclass(frozen=True)
class SceneShape:
    """One shape: attribute words, pixel box ``(x1, y1, x2, y2)`` (x2/y2 exclusive) and horizontal position word."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    position: str

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0

    @property
    def region_class(self) -> int:
        return region_class(self.shape, self.colour)


@dataclass(frozen=True)
class Scene:
    """One image: shapes ordered left to right, true captions, VQA questions (dicts, see ``_make_questions``)."""

    image_id: int
    split: str
    width: int
    height: int
    shapes: tuple[SceneShape, ...]
    captions: tuple[str, ...]
    questions: tuple[dict[str, Any], ...] = field(default=())


def region_class(shape: str, colour: str) -> int:
    """Class index of a (shape, colour) region in ``cls_prob`` (1..NUM_REGION_CLASSES-1; 0 is background)."""
    return 1 + SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def region_class_names() -> list[str]:
    """Names of the NUM_REGION_CLASSES region classes: ``["__background__", "red circle", "green circle", ...]``."""
    return ["__background__"] + [f"{c} {s}" for s in SHAPES for c in COLOURS]


def answer_vocab(settings: SceneSettings) -> list[str]:
    """label2ans of the VQA answer vocabulary: yes, no, counts "1".."max_shapes", colours, shapes."""
    return ["yes", "no"] + [str(k) for k in range(1, settings.max_shapes + 1)] + list(COLOURS) + list(SHAPES)


# -------------------------------------------------------------------------------------------------------- generation


def _position_word(cx: float, width: int) -> str:
    return POSITIONS[min(len(POSITIONS) - 1, int(len(POSITIONS) * cx / width))]


def _size_px(size: str, image_size: int) -> int:
    return max(4, round(_SIZE_FRACTION[size] * image_size))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 1) -> int:
    w = min(a[2], b[2]) + gap - max(a[0], b[0])
    h = min(a[3], b[3]) + gap - max(a[1], b[1])
    return max(0, w) * max(0, h)


def _sample_shapes(rng: np.random.Generator, settings: SceneSettings) -> tuple[SceneShape, ...]:
    size = settings.image_size
    n = int(rng.integers(1, settings.max_shapes + 1))
    classes = rng.choice(len(SHAPES) * len(COLOURS), size=n, replace=False)
    columns = rng.permutation(len(POSITIONS))[:n] if n <= len(POSITIONS) else rng.integers(0, len(POSITIONS), n)
    col_w = size / len(POSITIONS)
    placed: list[SceneShape] = []
    for cls, col in zip(classes, columns):
        shape_i, colour_i = divmod(int(cls), len(COLOURS))
        size_word = SIZES[int(rng.integers(len(SIZES)))]
        s = _size_px(size_word, size)
        # left edge such that the centre lies strictly inside the column and the box inside the canvas
        lo = max(0, int(np.ceil(col * col_w - s / 2 + 0.5)))
        hi = min(size - s, int(np.floor((col + 1) * col_w - s / 2 - 0.5)))
        if lo > hi:
            lo = hi = int(np.clip(round((col + 0.5) * col_w - s / 2), 0, size - s))
        best: tuple[int, int, int, int] | None = None
        best_overlap = -1
        for _ in range(50):
            x1 = int(rng.integers(lo, hi + 1))
            y1 = int(rng.integers(0, size - s + 1))
            box = (x1, y1, x1 + s, y1 + s)
            ov = sum(_overlap(box, p.box) for p in placed)
            if best is None or ov < best_overlap:
                best, best_overlap = box, ov
            if ov == 0:
                break
        assert best is not None
        cx = (best[0] + best[2]) / 2.0
        placed.append(SceneShape(SHAPES[shape_i], COLOURS[colour_i], size_word, best, _position_word(cx, size)))
    return tuple(sorted(placed, key=lambda p: (p.centre[0], p.centre[1])))


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _a(word: str) -> str:
    """Indefinite article for ``word``: "an" before a vowel ("an orange star")."""
    return "an" if word[0] in "aeiou" else "a"


def where_phrase(position: str) -> str:
    """ "in the middle" / "on the left" / "on the right": the English phrase of a horizontal position word."""
    return "in the middle" if position == "middle" else f"on the {position}"


def _caption_pool(shapes: Sequence[SceneShape]) -> list[str]:
    """All candidate captions (each true of the scene); the first is the full listing."""
    n = len(shapes)
    pool = [_join([f"{_a(p.size)} {p.size} {p.colour} {p.shape}" for p in shapes]) + "."]
    pool.append(
        f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: "
        + _join([f"{_a(p.colour)} {p.colour} {p.shape}" for p in shapes])
        + "."
    )
    pool += [f"there is {_a(p.colour)} {p.colour} {p.shape} {where_phrase(p.position)}." for p in shapes]
    pool += [f"the {p.size} {p.colour} {p.shape} is {where_phrase(p.position)}." for p in shapes]
    pool += [f"a picture with {_a(p.size)} {p.size} {p.colour} {p.shape}." for p in shapes]
    for a in shapes:
        for b in shapes:
            if a.centre[0] < b.centre[0]:
                pool.append(
                    f"{_a(a.colour)} {a.colour} {a.shape} is to the left of {_a(b.colour)} {b.colour} {b.shape}."
                )
    return list(dict.fromkeys(pool))


def _make_captions(rng: np.random.Generator, shapes: Sequence[SceneShape], k: int) -> tuple[str, ...]:
    pool = _caption_pool(shapes)
    rest = pool[1:]
    picked = [rest[int(i)] for i in rng.permutation(len(rest))[: max(0, k - 1)]]
    return tuple([pool[0]] + picked)


def _question_candidates(shapes: Sequence[SceneShape]) -> dict[str, list[tuple[str, str]]]:
    """kind -> [(question, true answer)] for kinds color / shape / count / exist_yes / exist_no."""
    shape_counts = Counter(p.shape for p in shapes)
    colour_counts = Counter(p.colour for p in shapes)
    present = {(p.shape, p.colour) for p in shapes}
    return {
        "color": [(f"what color is the {p.shape}?", p.colour) for p in shapes if shape_counts[p.shape] == 1],
        "shape": [(f"what shape is the {p.colour} object?", p.shape) for p in shapes if colour_counts[p.colour] == 1],
        "count": [("how many shapes are there?", str(len(shapes)))],
        "exist_yes": [(f"is there {_a(c)} {c} {s}?", "yes") for s, c in sorted(present)],
        "exist_no": [(f"is there {_a(c)} {c} {s}?", "no") for s in SHAPES for c in COLOURS if (s, c) not in present],
    }


_QUESTION_KIND_INFO = {  # kind -> (question_type, answer_type)
    "color": ("what color is the", "other"),
    "shape": ("what shape is the", "other"),
    "count": ("how many", "number"),
    "exist": ("is there a", "yes/no"),
}


def _answer_pool(kind: str, settings: SceneSettings) -> list[str]:
    if kind == "color":
        return list(COLOURS)
    if kind == "shape":
        return list(SHAPES)
    if kind == "count":
        return [str(k) for k in range(1, settings.max_shapes + 1)]
    return ["yes", "no"]


def _make_questions(
    rng: np.random.Generator, image_id: int, shapes: Sequence[SceneShape], settings: SceneSettings
) -> tuple[dict[str, Any], ...]:
    cands = _question_candidates(shapes)
    out: list[dict[str, Any]] = []
    for j in range(settings.questions_per_image):
        kinds = [k for k in ("color", "shape", "count") if cands[k]]
        if cands["exist_yes"] or cands["exist_no"]:
            kinds.append("exist")
        if not kinds:
            break
        kind = kinds[int(rng.integers(len(kinds)))]
        key = kind
        if kind == "exist":  # balanced yes/no
            options = [k for k in ("exist_yes", "exist_no") if cands[k]]
            key = options[int(rng.integers(len(options)))]
        question, answer = cands[key].pop(int(rng.integers(len(cands[key]))))
        wrong = [a for a in _answer_pool(kind, settings) if a != answer]
        answers = []
        for _ in range(NUM_ANNOTATORS):
            if wrong and rng.random() < settings.answer_noise:
                answers.append(wrong[int(rng.integers(len(wrong)))])
            else:
                answers.append(answer)
        qtype, atype = _QUESTION_KIND_INFO[kind]
        out.append(
            {
                "question_id": image_id * 1000 + j,
                "question": question,
                "answer": answer,
                "answers": answers,
                "answer_type": atype,
                "question_type": qtype,
            }
        )
    return tuple(out)


def _assign_splits(settings: SceneSettings) -> list[str]:
    n = settings.num_images
    n_test = round(n * settings.test_fraction)
    n_val = round(n * settings.val_fraction)
    if n_test + n_val >= n:  # keep at least one training image
        n_test, n_val = min(n_test, max(0, n - 1)), max(0, min(n_val, n - 1 - min(n_test, n - 1)))
    perm = np.random.default_rng([settings.seed, 3]).permutation(n)
    splits = ["train"] * n
    for i in perm[:n_test]:
        splits[int(i)] = "test"
    for i in perm[n_test : n_test + n_val]:
        splits[int(i)] = "val"
    return splits


def generate_scenes(settings: SceneSettings | None = None) -> list[Scene]:
    """The corpus's scenes, fully determined by ``settings`` (scene i depends only on the seed and i, not on N).

    Image ids are ``1000 + i``; question ids ``image_id * 1000 + j``."""
    settings = settings or SceneSettings()
    splits = _assign_splits(settings)
    scenes = []
    for i in range(settings.num_images):
        rng = np.random.default_rng([settings.seed, 0, i])
        image_id = 1000 + i
        shapes = _sample_shapes(rng, settings)
        captions = _make_captions(rng, shapes, settings.captions_per_image)
        questions = _make_questions(rng, image_id, shapes, settings)
        scenes.append(Scene(image_id, splits[i], settings.image_size, settings.image_size, shapes, captions, questions))
    return scenes


# --------------------------------------------------------------------------------------------------------- rendering


def _star_points(box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2 - 1) / 2.0, (y1 + y2 - 1) / 2.0
    outer = (x2 - x1 - 1) / 2.0
    inner = outer * 0.45
    pts = []
    for k in range(10):
        r = outer if k % 2 == 0 else inner
        a = -np.pi / 2 + k * np.pi / 5
        pts.append((cx + r * float(np.cos(a)), cy + r * float(np.sin(a))))
    return pts


def render(scene: Scene) -> Any:
    """Draw ``scene`` -> PIL RGB image (width x height), grey background, shapes filled in their colour."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (scene.width, scene.height), BACKGROUND_RGB)
    draw = ImageDraw.Draw(img)
    for p in scene.shapes:
        x1, y1, x2, y2 = p.box
        fill = COLOUR_RGB[p.colour]
        if p.shape == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif p.shape == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif p.shape == "triangle":
            draw.polygon([((x1 + x2 - 1) / 2.0, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
        elif p.shape == "star":
            draw.polygon(_star_points(p.box), fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(f"unknown shape {p.shape!r}")
    return img


# ---------------------------------------------------------------------------------------------------------- features


@functools.lru_cache(maxsize=8)
def _projection(in_dim: int, out_dim: int, salt: int) -> np.ndarray:
    """Fixed random projection (in_dim, out_dim) float32, the same for every corpus with these dims."""
    rng = np.random.default_rng([_PROJECTION_SEED, salt, in_dim, out_dim])
    w = rng.standard_normal((in_dim, out_dim)) / np.sqrt(3.0)
    w.setflags(write=False)
    return w


def region_features(scene: Scene, settings: SceneSettings) -> dict[str, Any]:
    """Region record of ``scene`` (regions in a shuffled order; one per shape + ``num_background_regions``).

    Returns ``image_id``, ``image_w``, ``image_h``, ``boxes`` float32 (N,4) x1y1x2y2 px, ``features`` float32
    (N, region_dim) = attributes @ projection + N(0, feature_noise), ``cls_prob`` float32 (N, NUM_REGION_CLASSES)
    peaked at the true class, and ``labels`` int64 (N,) true class (0 = background). Attributes: one-hot shape ⊕ colour
    ⊕ size ⊕ centred box centre (cx/W - 0.5, cy/H - 0.5); background regions have zero one-hots but keep their centre."""
    rng = np.random.default_rng([settings.seed, 1, scene.image_id])
    w, h = scene.width, scene.height
    boxes, attrs, labels = [], [], []
    for p in scene.shapes:
        a = np.zeros(REGION_ATTR_DIM)
        a[SHAPES.index(p.shape)] = 1.0
        a[len(SHAPES) + COLOURS.index(p.colour)] = 1.0
        a[len(SHAPES) + len(COLOURS) + SIZES.index(p.size)] = 1.0
        a[-2:] = p.centre[0] / w - 0.5, p.centre[1] / h - 0.5
        boxes.append(p.box)
        attrs.append(a)
        labels.append(p.region_class)
    for _ in range(settings.num_background_regions):
        bw = int(rng.integers(max(2, w // 4), max(3, int(w * 0.6)) + 1))
        bh = int(rng.integers(max(2, h // 4), max(3, int(h * 0.6)) + 1))
        x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        a = np.zeros(REGION_ATTR_DIM)
        a[-2:] = (x1 + bw / 2) / w - 0.5, (y1 + bh / 2) / h - 0.5
        boxes.append((x1, y1, x1 + bw, y1 + bh))
        attrs.append(a)
        labels.append(0)
    n = len(boxes)
    feats = np.asarray(attrs) @ _projection(REGION_ATTR_DIM, settings.region_dim, 1)
    feats = feats + settings.feature_noise * rng.standard_normal((n, settings.region_dim))
    logits = rng.standard_normal((n, NUM_REGION_CLASSES))
    logits[np.arange(n), labels] += _CLS_PEAK
    cls_prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    cls_prob /= cls_prob.sum(axis=1, keepdims=True)
    order = rng.permutation(n)
    return {
        "image_id": scene.image_id,
        "image_w": w,
        "image_h": h,
        "boxes": np.asarray(boxes, dtype=np.float32)[order],
        "features": feats.astype(np.float32)[order],
        "cls_prob": cls_prob.astype(np.float32)[order],
        "labels": np.asarray(labels, dtype=np.int64)[order],
    }


def clip_embedding(scene: Scene, settings: SceneSettings) -> np.ndarray:
    """CLIP-style global embedding float32 (clip_dim,) = bag of (shape,colour) and (shape,colour,size) counts @ a fixed
    projection + N(0, feature_noise); not L2-normalised."""
    rng = np.random.default_rng([settings.seed, 2, scene.image_id])
    n_sc = len(SHAPES) * len(COLOURS)
    bag = np.zeros(CLIP_ATTR_DIM)
    for p in scene.shapes:
        c = p.region_class - 1
        bag[c] += 1.0
        bag[n_sc + c * len(SIZES) + SIZES.index(p.size)] += 1.0
    emb = bag @ _projection(CLIP_ATTR_DIM, settings.clip_dim, 2)
    emb = emb + settings.feature_noise * rng.standard_normal(settings.clip_dim)
    return emb.astype(np.float32)
