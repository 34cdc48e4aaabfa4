"""The image pipeline (model-agnostic: CLIP-ViL now, VG-BERT later) and CLIP-ViL's data formats: the embedded corpus
as COCO / VG image files whose pictures agree with their text and boxes, transforms by hand calculation, bad images,
aspect-ratio grouping, the LXMERT JSON / VQA JSON / answer-list readers (fixtures in the real formats + the real
sample files), and `convert_ans` against the VQA evaluator's normalisation."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.conftest import real_sample
from vl.data.clip_vil import ClipVilPretrainDataModule, ClipVilVQADataModule, PretrainPairs
from vl.data.formats.lxmert_pretrain import (
    convert_ans,
    convert_label,
    flatten_pretrain,
    image_path,
    load_all_answers,
    load_ans2label,
    load_pretrain_json,
    load_vqa_json,
    load_width_heights,
)
from vl.data.formats.vqa_answers import normalize_answer
from vl.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageCollator,
    ResizeCenterCrop,
    ResizePadNormalize,
    aspect_group,
    clip_vil_resized_size,
    grouped_order,
    load_rgb,
)
from vl.data.scenes import COLOUR_RGB, POSITIONS, SceneSettings, generate_scenes
from vl.data.scenes.writers.images import ensure_image_corpus, image_id_of, jpg_path, pixel_scene
from vl.errors import ConfigError, DataError

SETTINGS = SceneSettings(num_images=36)


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> Path:
    return ensure_image_corpus(tmp_path_factory.mktemp("pix"), SETTINGS)


# ------------------------------------------------------------------------------------------------ embedded images
def test_image_corpus_is_laid_out_like_coco_and_vg(pixels: Path) -> None:
    scenes = generate_scenes(SETTINGS)
    sizes = json.loads((pixels / "mscoco" / "width_heigths.json").read_text())  # the seed's name and format
    kinds = set()
    for sc in scenes:
        img_id = image_id_of(sc)
        rel = jpg_path(img_id)
        assert rel == image_path(img_id)  # the reader's path rule finds what the writer wrote
        if sc.split == "train" and sc.image_id % 2 == 0:
            assert rel == f"mscoco/train2014/COCO_train2014_{sc.image_id:012d}.jpg"
        elif sc.split == "train":
            assert rel == f"vg_raw_images/VG_100K/{sc.image_id}.jpg"
        else:
            assert rel == f"mscoco/val2014/COCO_val2014_{sc.image_id:012d}.jpg"
        with Image.open(pixels / rel) as jpg, Image.open(pixels / "png" / f"{img_id}.png") as png:
            assert jpg.format == "JPEG" and png.format == "PNG"
            assert list(jpg.size) == list(png.size) == sizes[f"data/{rel}"][::-1]  # stored [h, w]
        h, w = sizes[f"data/{rel}"]
        kinds.add((w > h) - (w < h))
    assert kinds == {-1, 0, 1}  # portrait, square and landscape images


def test_pictures_agree_with_their_text_and_boxes(pixels: Path) -> None:
    """Every shape's box holds its colour (JPEG and PNG); its position word and left-of order still hold in the
    stretched non-square pictures."""
    for sc in generate_scenes(SETTINGS):
        drawn = pixel_scene(sc)
        img_id = image_id_of(sc)
        jpg = np.asarray(load_rgb(pixels / jpg_path(img_id)), dtype=np.float32)
        png = np.asarray(load_rgb(pixels / "png" / f"{img_id}.png"), dtype=np.float32)
        assert jpg.shape[:2] == (drawn.height, drawn.width)
        for shape, original in zip(drawn.shapes, sc.shapes):
            x1, y1, x2, y2 = shape.box
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            want = np.asarray(COLOUR_RGB[shape.colour], dtype=np.float32)
            assert np.abs(png[cy, cx] - want).max() == 0, (img_id, shape)
            assert np.abs(jpg[cy - 1 : cy + 2, cx - 1 : cx + 2].mean((0, 1)) - want).max() < 25, (img_id, shape)
            position = POSITIONS[min(2, int(3 * shape.centre[0] / drawn.width))]
            assert position == original.position and shape.size == original.size
        order = [s.shape + s.colour for s in sorted(drawn.shapes, key=lambda s: s.centre[0])]
        assert order == [s.shape + s.colour for s in sorted(sc.shapes, key=lambda s: s.centre[0])]


def test_image_corpus_is_written_once_and_rewritten_when_incomplete(tmp_path: Path) -> None:
    out = ensure_image_corpus(tmp_path, SETTINGS)
    stamp = (out / "DONE.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert ensure_image_corpus(tmp_path, SETTINGS) == out
    assert time.perf_counter() - t0 < 0.5 and (out / "DONE.json").stat().st_mtime_ns == stamp
    (out / "DONE.json").unlink()  # an interrupted write
    ensure_image_corpus(tmp_path, SETTINGS)
    assert (out / "DONE.json").is_file()


def test_lxmert_and_vqa_json_of_the_embedded_corpus(pixels: Path) -> None:
    train = json.loads((pixels / "lxmert" / "mscoco_train.json").read_text())
    vg = json.loads((pixels / "lxmert" / "vgnococo.json").read_text())
    assert all(d["img_id"].startswith("COCO_train2014_") and "mscoco" in d["sentf"] for d in train)
    assert all(d["img_id"].isdigit() and "vg" in d["sentf"] for d in vg)
    words = [a for d in train + vg for lab in d["labelf"]["vqa"] for a in lab if a in ("one", "two", "three")]
    assert words  # counting answers as words: convert_ans maps them onto the answer list
    answers = load_all_answers(pixels / "lxmert" / "all_ans.json")
    assert all(convert_ans(a) in answers for d in train for lab in d["labelf"]["vqa"] for a in lab)
    vqa = load_vqa_json(pixels / "vqa" / "train.json")
    assert set(vqa[0]) == {"answer_type", "img_id", "label", "question_id", "question_type", "sent"}
    ans2label = load_ans2label(pixels / "vqa" / "trainval_ans2label.json")
    assert all(a in ans2label for q in vqa for a in q["label"])
    assert set(ans2label) - set(answers) == {"maybe"}


# ------------------------------------------------------------------------------------------------ formats
def test_pretrain_json_is_flattened_as_the_seed_does(tmp_path: Path) -> None:
    datums = [
        {
            "img_id": "COCO_val2014_000000000042",
            "labelf": {"vqa": [{"two": 0.6, "3": 0.3}, {}]},
            "sentf": {"mscoco": ["a cat.", "a dog."], "vqa": ["how many?", "what?"]},
        },
        {"img_id": "2345", "sentf": {"vg": ["a tree."]}},
    ]
    rows = flatten_pretrain(datums)
    assert [r["uid"] for r in rows] == [
        "COCO_val2014_000000000042_mscoco_000",
        "COCO_val2014_000000000042_mscoco_001",
        "COCO_val2014_000000000042_vqa_000",
        "COCO_val2014_000000000042_vqa_001",
        "2345_vg_000",
    ]
    assert [r["label"] for r in rows] == [None, None, {"two": 0.6, "3": 0.3}, {}, None]
    assert image_path("COCO_val2014_000000000042") == "mscoco/val2014/COCO_val2014_000000000042.jpg"
    assert image_path("COCO_train2014_000000000042") == "mscoco/train2014/COCO_train2014_000000000042.jpg"
    assert image_path("COCO_test2015_000000000042") == "mscoco/test2015/COCO_test2015_000000000042.jpg"
    assert image_path("2345") == "vg_raw_images/VG_100K/2345.jpg"
    with pytest.raises(DataError, match="does not match sentf"):
        flatten_pretrain([{"img_id": "1", "sentf": {"vqa": ["a?"]}, "labelf": {"vqa": []}}], source="x.json")


_VQA_ROW = {
    "answer_type": "number",
    "img_id": "COCO_val2014_000000000042",
    "label": {"2": 1.0, "3": 0.3},
    "question_id": 42000,
    "question_type": "how many",
    "sent": "How many cats?",
}


@pytest.mark.parametrize(
    ("over", "match"),
    [
        # VQA soft scores are min(1, 0.3 x annotators): a NaN, a negative or a string score became a NaN loss mid-fit
        ({"label": {"yes": float("nan")}}, r"question 42000: label 'yes' score nan is not a number in \[0, 1\]$"),
        ({"label": {"2": 1.0, "two": -5}}, r"question 42000: label 'two' score -5 is not a number in \[0, 1\]$"),
        ({"label": {"no": "abc"}}, r"question 42000: label 'no' score 'abc' is not a number in \[0, 1\]$"),
        ({"label": {"no": 1.5}}, r"question 42000: label 'no' score 1.5 is not a number in \[0, 1\]$"),
        ({"label": {"no": True}}, r"question 42000: label 'no' score True is not a number in \[0, 1\]$"),
        # a non-string image id loaded, then a TypeError traceback in `image_path`; a null sentence loaded
        ({"img_id": 42}, r"question 1 field 'img_id' must be a non-empty string, got 42$"),
        ({"sent": None}, r"question 1 field 'sent' must be a string, got None$"),
    ],
)
def test_a_bad_vqa_json_row_is_named(tmp_path: Path, over: dict, match: str) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([_VQA_ROW, {**_VQA_ROW, **over}]))  # json writes NaN as the bare token NaN
    with pytest.raises(DataError, match=r"^" + re.escape(str(path)) + ": " + match):
        load_vqa_json(path)
    path.write_text(json.dumps([_VQA_ROW, {**_VQA_ROW, "label": {"yes": 0.0, "no": 1}, "sent": ""}]))
    assert (
        len(load_vqa_json(path)) == 2
    )  # the bounds themselves are scores; an empty question is the seed's [CLS] [SEP]


@pytest.mark.parametrize(
    ("datum", "match"),
    [
        ({"labelf": {"vqa": [{"yes": float("nan")}]}}, r"labelf\['vqa'\]\[0\]: label 'yes' score nan is not a number"),
        ({"labelf": {"vqa": [{"two": -5}]}}, r"labelf\['vqa'\]\[0\]: label 'two' score -5 is not a number"),
        ({"labelf": {"vqa": ["yes"]}}, r"labelf\['vqa'\] must be a list of \{answer: score\} dicts"),
        ({"sentf": {"vqa": [None]}}, r"sentf\['vqa'\]\[0\] must be a string, got None"),
        ({"sentf": {"vqa": "how many?"}}, r"sentf\['vqa'\] must be a list of sentences"),
    ],
)
def test_a_bad_pretrain_datum_is_named(tmp_path: Path, datum: dict, match: str) -> None:
    good = {"img_id": "COCO_val2014_000000000042", "sentf": {"vqa": ["how many?"]}, "labelf": {"vqa": [{"2": 1.0}]}}
    path = tmp_path / "mscoco_train.json"
    path.write_text(json.dumps([good, {**good, **datum}]))
    with pytest.raises(DataError, match=r"mscoco_train\.json: datum 1 \(COCO_val2014_000000000042\): " + match):
        load_pretrain_json(path)
    path.write_text(json.dumps([good, {**good, "img_id": 42}]))
    with pytest.raises(DataError, match=r"mscoco_train\.json: datum 1 field 'img_id' must be a non-empty string"):
        load_pretrain_json(path)


def test_answer_sampling_follows_the_scores() -> None:
    ds = PretrainPairs([], None, itm=False, itm_probability=0.0, ans2id={"2": 0, "3": 1, "cat": 2}, seed=0)
    rng = np.random.default_rng(0)
    draws = [ds.sample_answer({"two": 0.6, "3": 0.3, "unknown": 1.0}, rng) for _ in range(3000)]
    assert set(draws) == {0, 1}  # "two" -> "2" (convert_ans); "unknown" is not in the list
    assert abs(draws.count(0) / 3000 - 2 / 3) < 0.03
    assert ds.sample_answer({}, rng) == -1 and ds.sample_answer({"unknown": 1.0}, rng) == -1


def _seed_modify_answers(label: dict, used) -> dict:
    """The seed's loop (lxmert_data.py, "Modify the answers"), transcribed: on the dict in place."""
    for ans in list(label.keys()):
        new_ans = convert_ans(ans)
        if used(new_ans):
            if ans != new_ans:
                label[new_ans] = label.pop(ans)
        else:
            label.pop(ans)
    return label


def test_answers_that_normalise_alike_replace_each_other_as_in_the_seed() -> None:
    """Colliding answers ("two" and "2", "a dog" and "the dog") keep one score, the later converted one's, not
    their sum; checked against the seed's loop on random labels."""
    answers = {"2": 0, "3": 1, "dog": 2, "man": 3}
    raw = ["two", "2", "3", "three", "a dog", "the dog", "dog", "man", "the man", "unknown"]
    rng = np.random.default_rng(0)
    for _ in range(300):
        keys = list(rng.choice(raw, size=int(rng.integers(1, 6)), replace=False))
        label = {k: float(rng.choice([0.3, 0.6, 0.9, 1.0])) for k in keys}
        assert convert_label(label, answers.__contains__) == _seed_modify_answers(dict(label), answers.__contains__)
    assert convert_label({"2": 0.3, "two": 0.9}, answers.__contains__) == {"2": 0.9}  # replaced, not 1.2
    ds = PretrainPairs([], None, itm=False, itm_probability=0.0, ans2id=answers, seed=0)
    draws = [ds.sample_answer({"two": 0.6, "2": 0.3, "3": 0.3}, rng) for _ in range(3000)]
    assert abs(draws.count(0) / 3000 - 0.6 / 0.9) < 0.03  # "2" carries "two"'s 0.6, not 0.9


def test_convert_ans_is_not_the_vqa_evaluator_normalisation() -> None:
    same = {"Two.": "2", "the man": "man", "A dog": "dog"}
    for raw, want in same.items():
        assert convert_ans(raw) == normalize_answer(raw) == want
    differ = {"grey": ("gray", "grey"), "t-shirt": ("t-shirt", "t shirt"), "dont": ("dont", "don't")}
    for raw, (seed, evaluator) in differ.items():
        assert convert_ans(raw) == seed and normalize_answer(raw) == evaluator


def test_real_answer_lists() -> None:
    answers = load_all_answers(real_sample("lxmert", "all_ans.json"))
    assert len(answers) == 9500 and len(set(answers)) == 9500
    ans2label = load_ans2label(real_sample("vqa", "trainval_ans2label.json"))
    label2ans = load_ans2label(real_sample("vqa", "trainval_label2ans.json"))
    assert len(ans2label) == 3129 and ans2label == label2ans
    shared = [a for a in ans2label if a in set(answers)]
    assert len(shared) > 3000  # the rows the VQA head takes over from the pretraining QA head


# ------------------------------------------------------------------------------------------------ transforms
def _seed_clip_vil_pixels(img: Image.Image, min_size: int = 384, max_size: int = 640) -> np.ndarray:
    """The seed's steps, written out independently: `Resize.get_size` (maskrcnn-style), PIL bilinear (torchvision
    F.resize on a PIL image), `PadToGivenSize` (centred; F.pad constant = PIL ImageOps.expand with black), ToTensor,
    Normalize."""
    w, h = img.size
    size = min_size
    lo, hi = float(min(w, h)), float(max(w, h))
    if hi / lo * size > max_size:
        size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        oh, ow = h, w
    elif w < h:
        ow, oh = size, int(size * h / w)
    else:
        oh, ow = size, int(size * w / h)
    img = img.resize((ow, oh), Image.Resampling.BILINEAR)
    max_w, max_h = (min_size, max_size) if ow <= oh else (max_size, min_size)
    hp, vp = (max_w - ow) / 2, (max_h - oh) / 2
    pad = (
        int(hp if hp % 1 == 0 else hp + 0.5),
        int(vp if vp % 1 == 0 else vp + 0.5),
        int(hp if hp % 1 == 0 else hp - 0.5),
        int(vp if vp % 1 == 0 else vp - 0.5),
    )
    img = ImageOps.expand(img, border=pad, fill=0)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - np.array(CLIP_MEAN, np.float32)[:, None, None]) / np.array(CLIP_STD, np.float32)[:, None, None]


@pytest.mark.parametrize(
    "size",
    [(500, 333), (480, 640), (400, 400), (640, 640), (1000, 399), (384, 500), (1000, 101), (97, 1003), (333, 499)],
)
def test_clip_vil_transform_follows_the_seed(size) -> None:
    img = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    x = ResizePadNormalize(384, 640)(img)
    want = _seed_clip_vil_pixels(img)
    assert tuple(x.shape) == want.shape
    np.testing.assert_allclose(x.numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("size", "resized", "canvas", "left_top"),
    [
        ((500, 300), (640, 384), (384, 640), (0, 0)),  # 300 -> 384, 500 -> int(384 * 500 / 300) = 640
        ((1000, 399), (639, 255), (384, 640), (1, 65)),  # capped: round(640 * 399 / 1000) = 255, int(255 * 1000 / 399)
        ((300, 500), (384, 640), (640, 384), (0, 0)),  # portrait
        ((384, 384), (384, 384), (640, 384), (0, 128)),  # square: portrait canvas, centred
    ],
)
def test_clip_vil_transform_by_hand(size, resized, canvas, left_top) -> None:
    assert clip_vil_resized_size(*size, 384, 640) == resized
    img = Image.new("RGB", size, (200, 100, 50))
    x = ResizePadNormalize(384, 640)(img)
    assert tuple(x.shape) == (3, *canvas)
    (w, h), (left, top) = resized, left_top
    want = (torch.tensor([200, 100, 50]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[:, top : top + h, left : left + w].mean((1, 2)), want, atol=1e-5, rtol=0)
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)  # padded before normalisation
    inside = torch.zeros(canvas, dtype=torch.bool)
    inside[top : top + h, left : left + w] = True
    torch.testing.assert_close(x[:, ~inside], black[:, None].expand(3, int((~inside).sum())), atol=1e-6, rtol=0)


def test_vg_bert_transform_by_hand() -> None:
    img = Image.new("RGB", (400, 300), (10, 20, 30))
    img.paste((250, 250, 250), (0, 0, 20, 300))  # a stripe the centre crop cuts away
    x = ResizeCenterCrop()(img)  # 300 -> 256, 400 -> 341; crop 224 from x = 58
    assert tuple(x.shape) == (3, 224, 224)
    want = (torch.tensor([10, 20, 30]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean((1, 2)), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ loading
def _dm(cls, data_dir: Path, **kwargs):
    kwargs.setdefault("objectives", ["mlm", "itm"] if cls is ClipVilPretrainDataModule else ["vqa"])
    return cls(
        cache_dir=str(data_dir),
        corpus={"num_images": 60},
        batch_size=8,
        transform_options={"min_size": 64, "max_size": 96},
        **kwargs,
    )


def test_bad_images_fail_naming_the_file_or_are_skipped_and_counted(tmp_path: Path, data_dir: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(DataError, match="nope.jpg: image file not found"):
        load_rgb(missing)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg: cannot decode image"):
        load_rgb(broken)
    dm = _dm(ClipVilVQADataModule, data_dir)
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.datasets["train"]
    bad = dm.root / image_path(ds.questions[0]["img_id"])
    good_bytes = bad.read_bytes()
    try:
        bad.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated
        with pytest.raises(DataError, match=bad.name):
            ds[0]
        skipping = _dm(ClipVilVQADataModule, data_dir, on_bad_image="skip")
        skipping.setup("fit")
        sds = skipping.datasets["train"]
        assert sds[0] is None
        others = [i for i, q in enumerate(sds.questions) if q["img_id"] != sds.questions[0]["img_id"]][:3]
        batch = skipping.collator("train")([sds[i] for i in [0, *others]])
        assert batch["images_skipped"] == 1 and batch["pixel_values"].shape[0] == 3
    finally:
        bad.write_bytes(good_bytes)


def _seed_width_heigths(data: Path, root_name: str) -> dict:
    """The seed's size pass (`lxmert_data.py` / `vqa_data.py`), transcribed: run from the dir holding `data/`, it
    walks `root_name` and stores `w = image.shape[0]`, `h = image.shape[1]` as `(w, h)` under
    `os.path.join(root_name, file)`."""
    import os

    records = {}
    cwd = os.getcwd()
    os.chdir(data.parent)
    try:
        for _root, _dirs, files in os.walk(root_name, topdown=False):
            for file in sorted(files):
                image = np.asarray(Image.open(os.path.join(root_name, file)))
                w = image.shape[0]
                h = image.shape[1]
                records[os.path.join(root_name, file)] = (w, h)
    finally:
        os.chdir(cwd)
    return records


def test_width_heigths_json_is_read_in_the_seeds_own_format(tmp_path: Path) -> None:
    """A `width_heigths.json` written exactly as the seed writes it (json.dump of its records: `data/` keys, the
    array's (rows, columns)) -> {path under data/: (w, h)} equal to PIL's sizes; the k = 0 groups equal the seed's
    (`get_height_and_width` returns the pair reversed, aspect = its `width / height` quantised at bins [1.0]): 0 =
    landscape, 1 = portrait or square."""
    import bisect

    data = tmp_path / "data"
    (data / "mscoco" / "train2014").mkdir(parents=True)
    (data / "vg_raw_images" / "VG_100K").mkdir(parents=True)
    made = {  # PIL (width, height); an L-mode one: its array has no channel axis
        "mscoco/train2014/COCO_train2014_000000000009.jpg": ((640, 480), "RGB"),
        "mscoco/train2014/COCO_train2014_000000000025.jpg": ((333, 500), "RGB"),
        "vg_raw_images/VG_100K/7.jpg": ((300, 300), "L"),
        "vg_raw_images/VG_100K/8.jpg": ((500, 200), "L"),
    }
    for rel, (size, mode) in made.items():
        Image.new(mode, size).save(data / rel)
    records = _seed_width_heigths(data, "data/vg_raw_images/VG_100K/")
    records |= _seed_width_heigths(data, "data/mscoco/train2014/")
    (data / "mscoco" / "width_heigths.json").write_text(json.dumps(records))
    assert records["data/mscoco/train2014/COCO_train2014_000000000009.jpg"] == (480, 640)  # (h, w) on disk

    sizes = load_width_heights(data / "mscoco" / "width_heigths.json")
    assert sizes == {rel: size for rel, (size, _) in made.items()}
    for rel in made:
        stored_w, stored_h = records[f"data/{rel}"]
        height, width = stored_h, stored_w  # the seed's get_height_and_width: `w, h = records[...]; return h, w`
        seed_group = bisect.bisect_right([1.0], float(width) / float(height))
        assert aspect_group(*sizes[rel], [1.0]) == seed_group == int(sizes[rel][0] <= sizes[rel][1])
    # keys without the `data/` prefix are read alike
    (tmp_path / "plain.json").write_text(json.dumps({k.removeprefix("data/"): v for k, v in records.items()}))
    assert load_width_heights(tmp_path / "plain.json") == sizes


@pytest.mark.parametrize("value", [[640], "480x640", [0, 640], [480.5, 640], [True, 640], None])
def test_a_malformed_width_heigths_entry_fails_naming_the_file_and_the_key(tmp_path: Path, value) -> None:
    path = tmp_path / "width_heigths.json"
    path.write_text(json.dumps({"data/mscoco/val2014/a.jpg": [480, 640], "data/mscoco/val2014/b.jpg": value}))
    with pytest.raises(DataError, match=r"width_heigths\.json: 'data/mscoco/val2014/b\.jpg' -> .* is not \[height"):
        load_width_heights(path)
    path.write_text(json.dumps({"data/mscoco/val2014/a.jpg": [480, 640], "mscoco/val2014/a.jpg": [480, 640]}))
    with pytest.raises(DataError, match=r"width_heigths\.json: 'mscoco/val2014/a\.jpg' lists an image already"):
        load_width_heights(path)
    path.write_text(json.dumps([[480, 640]]))
    with pytest.raises(DataError, match=r"width_heigths\.json: expected"):
        load_width_heights(path)


def test_grouped_order_keeps_every_batch_in_one_group() -> None:
    groups = [0, 1] * 10 + [0] * 3
    order = list(np.random.default_rng(0).permutation(len(groups)))
    out = grouped_order(order, groups, 4)
    assert len(out) == len(order) // 4 * 4 and set(out) <= set(order)
    batches = [out[i : i + 4] for i in range(0, len(out), 4)]
    assert all(len({groups[i] for i in b}) == 1 for b in batches)  # leftovers too (completed by repeats)


def test_pretrain_loader_batches_from_pixels(data_dir: Path) -> None:
    dm = _dm(ClipVilPretrainDataModule, data_dir, objectives=["mlm", "itm", "qa"], num_workers=1)
    dm.prepare_data()
    assert dm.info["num_qa_answers"] == len(load_all_answers(dm.path("lxmert/all_ans.json")))
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    n = 0
    for batch in loader:  # decoded, resized and normalised in the worker; one canvas per batch
        x = batch["pixel_values"]
        assert x.shape[1:] in ((3, 64, 96), (3, 96, 64))
        assert set(batch) >= {"input_ids", "mlm_labels", "itm_labels", "qa_labels"}
        # QA labels only on matched pairs
        assert bool(((batch["qa_labels"] >= 0) <= (batch["itm_labels"] == 1)).all())
        n += 1
    assert n == len(loader) > 2
    # ITM draws ~half mismatched sentences
    labels = torch.cat([b["itm_labels"] for b in dm.val_dataloader()])
    assert 0.3 < labels.float().mean() < 0.7


def test_itm_pairs_the_image_with_its_own_or_another_images_sentence(data_dir: Path) -> None:
    """Stage-1 ITM as the seed's LXMERT loader: label 1 = the example's own sentence, label 0 = the sentence of an
    example of another image (drawn from all flattened sentences, so it may repeat one of this image's own sentences,
    e.g. "how many shapes are there?", as in the seed), ~50 %; the pixels are always the example's own image file."""
    dm = _dm(ClipVilPretrainDataModule, data_dir)
    dm.setup("fit")
    ds = dm.datasets["train"]
    by_image: dict[str, set[str]] = {}
    for ex in ds.examples:
        by_image.setdefault(ex["img_id"], set()).add(ex["sent"])
    labels = []
    for i, ex in enumerate(ds.examples):
        out = ds[(0, i)]
        labels.append(out["itm_label"])
        if out["itm_label"] == 1:
            assert out["text"] == ex["sent"]
        else:
            assert any(out["text"] in sents for img, sents in by_image.items() if img != ex["img_id"])
        if i < 8:
            want = dm.transform(load_rgb(dm.root / image_path(ex["img_id"])))
            torch.testing.assert_close(out["pixels"], want, rtol=0, atol=0)
    assert 0.4 < np.mean(labels) < 0.6


def test_vqa_loader_and_baselines(data_dir: Path) -> None:
    dm = _dm(ClipVilVQADataModule, data_dir)
    dm.prepare_data()
    batch = next(iter(dm.val_dataloader()))
    assert batch["vqa_targets"].shape == (batch["pixel_values"].shape[0], dm.info["num_answers"])
    base = dm.baselines("test")
    assert 0 < base["test/vqa_acc_chance"] < base["test/vqa_acc_prior"] < 0.8
    assert isinstance(dm.collator("train"), ImageCollator)


# ------------------------------------------------------------------------------------------------ published file lists
def _real_layout_with_nominival(embedded: Path, tmp: Path) -> Path:
    """The embedded corpus seen as a `data.root` in the seed's layout, plus nominival files (the first half of each
    minival file: their images are val2014 images listed in width_heigths.json)."""
    root = tmp / "data"
    root.mkdir()
    for entry in embedded.iterdir():
        if entry.name not in ("lxmert", "vqa"):
            (root / entry.name).symlink_to(entry)
    for sub, src, dst in (("lxmert", "mscoco_minival", "mscoco_nominival"), ("vqa", "minival", "nominival")):
        (root / sub).mkdir()
        for f in (embedded / sub).iterdir():
            (root / sub / f.name).symlink_to(f)
        rows = json.loads((embedded / sub / f"{src}.json").read_text())
        (root / sub / f"{dst}.json").write_text(json.dumps(rows[: len(rows) // 2]))
    return root


def test_published_training_files_by_default_and_the_embedded_corpus_without_nominival(
    tmp_path: Path, data_dir: Path
) -> None:
    embedded = _dm(ClipVilPretrainDataModule, data_dir)
    vqa_embedded = _dm(ClipVilVQADataModule, data_dir)
    assert embedded.files["train"] == ["lxmert/mscoco_train.json", "lxmert/vgnococo.json"]
    assert vqa_embedded.train_splits == ["train"]
    root = _real_layout_with_nominival(embedded.root, tmp_path)
    read = lambda rel: json.loads((root / rel).read_text())  # noqa: E731

    # pretraining: mscoco_train + mscoco_nominival + vgnococo (the seed's --train), one example per sentence
    dm = _dm(ClipVilPretrainDataModule, data_dir, root=str(root))
    dm.prepare_data()
    train = dm.build_dataset("train")
    names = ("mscoco_train", "mscoco_nominival", "vgnococo")
    datums = [d for n in names for d in read(f"lxmert/{n}.json")]
    assert len(train) == sum(len(s) for d in datums for s in d["sentf"].values())
    assert {ex["img_id"] for ex in train.examples} == {d["img_id"] for d in datums}

    # VQA: train + nominival (the seed's --train train,nominival); minival for validation
    vqa = _dm(ClipVilVQADataModule, data_dir, root=str(root))
    vqa.prepare_data()
    questions = read("vqa/train.json") + read("vqa/nominival.json")
    assert sorted(q["question_id"] for q in vqa.build_dataset("train").questions) == sorted(
        q["question_id"] for q in questions
    )
    assert len(vqa.build_dataset("val")) == len(read("vqa/minival.json"))
    only_train = _dm(ClipVilVQADataModule, data_dir, root=str(root), train_splits=["train"])
    assert len(only_train.build_dataset("train")) == len(read("vqa/train.json"))

    # a missing file is named
    (root / "vqa" / "nominival.json").unlink()
    (root / "lxmert" / "mscoco_nominival.json").unlink()
    with pytest.raises(DataError, match=r"vqa/nominival\.json"):
        _dm(ClipVilVQADataModule, data_dir, root=str(root)).prepare_data()
    with pytest.raises(DataError, match=r"lxmert/mscoco_nominival\.json"):
        _dm(ClipVilPretrainDataModule, data_dir, root=str(root)).prepare_data()


def test_pretraining_reads_the_published_release_which_has_no_test_file(tmp_path: Path, data_dir: Path) -> None:
    """LXMERT's release (the seed readme's downloads) has mscoco_train / nominival / minival and vgnococo, no
    mscoco_test.json: with `data.root` the test stage reads minival (the seed's evaluation set), and the fit's checks
    pass; the embedded corpus keeps its held-out mscoco_test.json."""
    embedded = _dm(ClipVilPretrainDataModule, data_dir)
    assert embedded.files["test"] == ["lxmert/mscoco_test.json"]
    root = _real_layout_with_nominival(embedded.root, tmp_path)
    (root / "lxmert" / "mscoco_test.json").unlink()
    assert sorted(f.name for f in (root / "lxmert").glob("mscoco_*.json")) == [
        "mscoco_minival.json",
        "mscoco_nominival.json",
        "mscoco_train.json",
    ]
    dm = _dm(ClipVilPretrainDataModule, data_dir, root=str(root))
    dm.prepare_data()
    assert dm.files["test"] == dm.files["val"] == ["lxmert/mscoco_minival.json"]
    minival = json.loads((root / "lxmert" / "mscoco_minival.json").read_text())
    assert len(dm.build_dataset("test")) == sum(len(s) for d in minival for s in d["sentf"].values())


def test_train_splits_and_splits_train_together_are_refused(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.train_splits"):
        _dm(ClipVilVQADataModule, data_dir, train_splits=["train"], splits={"train": "train"})
    assert _dm(ClipVilVQADataModule, data_dir, splits={"train": "trainval"}).train_splits == ["trainval"]
