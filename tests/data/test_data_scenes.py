"""The procedural scene corpus: determinism, truthfulness, writer -> reader round trips, ensure_corpus caching."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vl.data.features import ClipFeatureReader, RegionFeatureReader
from vl.data.formats.coco import load_coco_captions
from vl.data.formats.jsonl import load_jsonl
from vl.data.formats.vqa import (
    build_targets,
    load_annotations,
    load_answer_vocab,
    load_label2ans,
    load_questions,
    load_targets,
    vqa_soft_score,
)
from vl.data.scenes import (
    COLOUR_RGB,
    COLOURS,
    NUM_REGION_CLASSES,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    SceneSettings,
    answer_vocab,
    clip_embedding,
    corpus_key,
    corpus_paths,
    ensure_corpus,
    generate_scenes,
    region_class,
    region_class_names,
    region_features,
    render,
    verify_corpus,
    write_corpus,
)

SMALL = SceneSettings(num_images=24, region_dim=32, clip_dim=16, seed=3)
TINY = SceneSettings(num_images=10, region_dim=8, clip_dim=8, seed=5)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c", SMALL)


@pytest.fixture(scope="module")
def many_scenes() -> list[Scene]:
    return generate_scenes(SceneSettings(num_images=400, seed=11))


# ------------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_scenes_and_different_seed_differs() -> None:
    a = generate_scenes(SMALL)
    assert a == generate_scenes(SMALL)
    b = generate_scenes(SceneSettings(num_images=24, region_dim=32, clip_dim=16, seed=4))
    assert [s.shapes for s in a] != [s.shapes for s in b]
    # scene i does not depend on the corpus size
    assert generate_scenes(SceneSettings(num_images=5, seed=3))[4].shapes == a[4].shapes


def test_written_bytes_are_deterministic(tmp_path: Path, corpus: Path) -> None:
    other = write_corpus(tmp_path / "again", SMALL)
    text_files = sorted(p.relative_to(corpus) for p in corpus.rglob("*") if p.suffix in (".json", ".jsonl", ".png"))
    assert len(text_files) > SMALL.num_images
    for rel in text_files:
        if (
            rel.name == "manifest.json" or rel.parts[0] == "parts"
        ):  # the feature stores' sampled hashes cover binary files (HDF5 records times)
            continue
        assert (corpus / rel).read_bytes() == (other / rel).read_bytes(), rel

    def manifest(root: Path) -> dict:
        m = json.loads((root / "manifest.json").read_text())
        m["files"] = [{k: v for k, v in f.items() if k != "sampled_sha1"} for f in m["files"]]
        return m

    assert manifest(corpus) == manifest(other)
    r1, r2 = RegionFeatureReader(corpus / "regions.lmdb"), RegionFeatureReader(other / "regions.lmdb")
    for i in r1.ids():
        np.testing.assert_array_equal(r1[i]["features"], r2[i]["features"])
    different = write_corpus(tmp_path / "seed9", SceneSettings(num_images=24, region_dim=32, clip_dim=16, seed=9))
    assert (different / "vlp" / "train.jsonl").read_bytes() != (corpus / "vlp" / "train.jsonl").read_bytes()


def test_settings_validation_and_key() -> None:
    with pytest.raises(ValueError):
        SceneSettings(num_images=0)
    with pytest.raises(ValueError):
        SceneSettings(val_fraction=0.6, test_fraction=0.5)
    assert corpus_key(SMALL) == corpus_key(SceneSettings(**SMALL.to_dict()))
    assert corpus_key(SMALL) != corpus_key(TINY)


# ---------------------------------------------------------------------------------------------------- truthfulness

_PHRASE = re.compile(r"\b(?:(small|large) )?(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")
_WHERE = {"on the left": "left", "in the middle": "middle", "on the right": "right"}


def _find(scene: Scene, colour: str, shape: str):
    found = [p for p in scene.shapes if p.colour == colour and p.shape == shape]
    assert len(found) <= 1
    return found[0] if found else None


def _check_caption(scene: Scene, cap: str) -> None:
    assert cap.endswith(".") and cap == cap.lower()
    mentioned = _PHRASE.findall(cap)
    assert mentioned, cap
    for size, colour, shape in mentioned:
        p = _find(scene, colour, shape)
        assert p is not None, (cap, scene.shapes)
        if size:
            assert p.size == size, cap
    assert not re.search(r"\ba [aeiou]", cap) and not re.search(r"\ban [^aeiou]", cap), cap
    words = {"one": 1, "two": 2, "three": 3}
    m = re.match(r"^(\w+) shapes?: ", cap)
    if m:
        assert words[m.group(1)] == len(scene.shapes), cap
        assert len(mentioned) == len(scene.shapes)
    m = re.search(r"(\w+) (\w+) (?:is )?(on the left|in the middle|on the right)\.$", cap)
    if m:
        p = _find(scene, m.group(1), m.group(2))
        cx = p.centre[0]
        assert POSITIONS[min(2, int(3 * cx / scene.width))] == _WHERE[m.group(3)] == p.position, cap
    m = re.match(r"^an? (\w+) (\w+) is to the left of an? (\w+) (\w+)\.$", cap)
    if m:
        a, b = _find(scene, m.group(1), m.group(2)), _find(scene, m.group(3), m.group(4))
        assert a.centre[0] < b.centre[0], cap


def _check_question(scene: Scene, q: dict) -> None:
    text, answer = q["question"], q["answer"]
    assert len(q["answers"]) == 10
    assert Counter(q["answers"]).most_common(1)[0][0] == answer or q["answers"].count(answer) >= 4
    if m := re.match(r"^what color is the (\w+)\?$", text):
        same = [p for p in scene.shapes if p.shape == m.group(1)]
        assert len(same) == 1 and same[0].colour == answer and q["answer_type"] == "other"
        assert all(a in COLOURS for a in q["answers"])
    elif m := re.match(r"^what shape is the (\w+) object\?$", text):
        same = [p for p in scene.shapes if p.colour == m.group(1)]
        assert len(same) == 1 and same[0].shape == answer and q["answer_type"] == "other"
        assert all(a in SHAPES for a in q["answers"])
    elif text == "how many shapes are there?":
        assert answer == str(len(scene.shapes)) and q["answer_type"] == "number"
        assert all(a.isdigit() for a in q["answers"])
    elif m := re.match(r"^is there an? (\w+) (\w+)\?$", text):
        present = _find(scene, m.group(1), m.group(2)) is not None
        assert answer == ("yes" if present else "no") and q["answer_type"] == "yes/no"
        assert set(q["answers"]) <= {"yes", "no"}
    else:
        raise AssertionError(f"unknown question {text!r}")


def test_scene_structure(many_scenes: list[Scene]) -> None:
    overlapping = 0
    for sc in many_scenes:
        assert 1 <= len(sc.shapes) <= 3
        assert len({(p.shape, p.colour) for p in sc.shapes}) == len(sc.shapes)
        for p in sc.shapes:
            x1, y1, x2, y2 = p.box
            assert 0 <= x1 < x2 <= sc.width and 0 <= y1 < y2 <= sc.height
            assert p.size in SIZES and x2 - x1 == y2 - y1
        boxes = [p.box for p in sc.shapes]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]):
                    overlapping += 1
    assert overlapping <= len(many_scenes) * 0.02
    assert Counter(sc.split for sc in many_scenes) == {"train": 320, "val": 40, "test": 40}
    qids = [q["question_id"] for sc in many_scenes for q in sc.questions]
    assert len(qids) == len(set(qids)) == 3 * len(many_scenes)


def test_captions_and_answers_are_true(many_scenes: list[Scene]) -> None:
    for sc in many_scenes:
        assert len(sc.captions) == 3 and len(set(sc.captions)) == 3
        for cap in sc.captions:
            _check_caption(sc, cap)
        for q in sc.questions:
            _check_question(sc, q)


def test_answer_distribution(many_scenes: list[Scene]) -> None:
    qs = [q for sc in many_scenes for q in sc.questions]
    kinds = Counter(q["answer_type"] for q in qs)
    assert set(kinds) == {"other", "number", "yes/no"}
    yesno = [q["answer"] for q in qs if q["answer_type"] == "yes/no"]
    assert 0.4 < yesno.count("yes") / len(yesno) < 0.6
    counts = {c for q in qs for c in Counter(q["answers"]).values()}
    assert {1, 2, 3} <= counts and max(counts) >= 4  # soft scores 0.3 / 0.6 / 0.9 / 1.0 all occur
    noisy = sum(a != q["answer"] for q in qs for a in q["answers"]) / (10 * len(qs))
    assert 0.05 < noisy < 0.15


def test_render_draws_shapes_in_their_colour(many_scenes: list[Scene]) -> None:
    for sc in many_scenes[:60]:
        img = np.asarray(render(sc))
        assert img.shape == (sc.height, sc.width, 3) and img.dtype == np.uint8
        assert tuple(img[0, 0]) in {(128, 128, 128)} | set(COLOUR_RGB.values())
        for p in sc.shapes:
            x1, y1, x2, y2 = p.box
            cx = (x1 + x2) // 2
            cy = (y1 + y2) // 2 if p.shape != "triangle" else y1 + 2 * (y2 - y1) // 3
            others = [o for o in sc.shapes if o is not p]
            if any(o.box[0] <= cx < o.box[2] and o.box[1] <= cy < o.box[3] for o in others):
                continue
            assert tuple(img[cy, cx]) == COLOUR_RGB[p.colour], (sc.image_id, p)


def test_region_features_carry_the_attributes(many_scenes: list[Scene]) -> None:
    settings = SceneSettings(num_images=400, seed=11)
    by_attr: dict[tuple, list[np.ndarray]] = {}
    for sc in many_scenes[:100]:
        rec = region_features(sc, settings)
        n = len(sc.shapes) + settings.num_background_regions
        assert rec["features"].shape == (n, 2048) and rec["features"].dtype == np.float32
        assert rec["boxes"].shape == (n, 4) and rec["cls_prob"].shape == (n, NUM_REGION_CLASSES)
        np.testing.assert_allclose(rec["cls_prob"].sum(1), 1.0, rtol=1e-5)
        assert (rec["cls_prob"].argmax(1) == rec["labels"]).mean() >= 0.8
        for p in sc.shapes:
            rows = np.flatnonzero((rec["boxes"] == np.asarray(p.box, np.float32)).all(1) & (rec["labels"] > 0))
            assert len(rows) == 1 and rec["labels"][rows[0]] == region_class(p.shape, p.colour)
            by_attr.setdefault((p.shape, p.colour, p.size), []).append(rec["features"][rows[0]])
        assert (rec["labels"] == 0).sum() == settings.num_background_regions
        emb = clip_embedding(sc, settings)
        assert emb.shape == (512,) and emb.dtype == np.float32 and abs(np.linalg.norm(emb) - 1) > 0.1

    # same attributes -> nearly the same feature (position and noise aside); different classes -> clearly different
    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    keys = [k for k, v in by_attr.items() if len(v) >= 2]
    within = [cos(by_attr[k][0], by_attr[k][1]) for k in keys]
    across = [cos(by_attr[a][0], by_attr[b][0]) for a in keys for b in keys if a[:2] != b[:2]]
    assert len(within) >= 5 and min(within) > 0.8 and np.mean(within) > 0.9
    assert np.mean(across) < 0.5


def test_region_class_names() -> None:
    names = region_class_names()
    assert len(names) == NUM_REGION_CLASSES == 33 and names[0] == "__background__"
    assert names[region_class("star", "purple")] == "purple star"


# --------------------------------------------------------------------------------------------------- round trips


def test_corpus_layout(corpus: Path) -> None:
    paths = corpus_paths(corpus)
    for name, p in paths.items():
        assert p.exists(), name
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["settings"] == SMALL.to_dict() and manifest["key"] == corpus_key(SMALL)
    listed = {f["path"] for f in manifest["files"]}
    assert "regions.lmdb/data.mdb" in listed and "clip_features.hdf5" in listed
    assert len([p for p in listed if p.startswith("images/")]) == SMALL.num_images
    newest = max((corpus / p).stat().st_mtime_ns for p in listed)
    assert paths["manifest"].stat().st_mtime_ns >= newest
    assert verify_corpus(corpus, SMALL) is None
    assert verify_corpus(corpus, TINY) is not None


def test_coco_and_vlp_round_trip(corpus: Path) -> None:
    scenes = generate_scenes(SMALL)
    ann_ids = []
    for split in SPLITS:
        expected = [sc for sc in scenes if sc.split == split]
        images, anns = load_coco_captions(corpus / "annotations" / f"captions_{split}.json")
        assert sorted(images) == [sc.image_id for sc in expected]
        for sc in expected:
            img = images[sc.image_id]
            assert (corpus / "images" / img["file_name"]).is_file()
            assert (img["width"], img["height"]) == (sc.width, sc.height)
        assert [(a["image_id"], a["caption"]) for a in anns] == [
            (sc.image_id, c) for sc in expected for c in sc.captions
        ]
        ann_ids += [a["id"] for a in anns]
        lines = load_jsonl(corpus / "vlp" / f"{split}.jsonl", required=("text", "image_id"))
        assert lines == [{"text": c, "image_id": str(sc.image_id)} for sc in expected for c in sc.captions]
    assert len(ann_ids) == len(set(ann_ids))
    from PIL import Image

    with Image.open(corpus / "images" / f"{scenes[0].image_id}.png") as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(render(scenes[0])))


def test_feature_round_trip(corpus: Path) -> None:
    scenes = generate_scenes(SMALL)
    regions = RegionFeatureReader(corpus / "regions.lmdb")
    clip = ClipFeatureReader(corpus / "clip_features.hdf5")
    assert regions.ids() == [str(sc.image_id) for sc in scenes] == clip.ids()
    assert len(regions) == len(clip) == SMALL.num_images and clip.dim == SMALL.clip_dim
    import h5py

    with h5py.File(corpus / "clip_features.hdf5", "r") as f:
        assert f["ids"].dtype.kind == "S" and f["features"].dtype == np.float32
    for sc in scenes:
        exp = region_features(sc, SMALL)
        got = regions[sc.image_id]
        for k in ("features", "boxes", "cls_prob"):
            np.testing.assert_array_equal(got[k], exp[k])
            assert got[k].dtype == np.float32
        assert got["num_boxes"] == len(exp["boxes"]) and (got["image_w"], got["image_h"]) == (sc.width, sc.height)
        np.testing.assert_allclose(got["boxes_norm"], exp["boxes"] / sc.width)
        np.testing.assert_array_equal(clip[sc.image_id], clip_embedding(sc, SMALL))
        np.testing.assert_array_equal(clip[str(sc.image_id)], clip_embedding(sc, SMALL))


def test_vqa_round_trip(corpus: Path) -> None:
    scenes = generate_scenes(SMALL)
    paths = corpus_paths(corpus)
    label2ans = load_label2ans(paths["label2ans"])
    ans2label = load_answer_vocab(paths["ans2label"])
    assert label2ans == answer_vocab(SMALL) == load_label2ans(paths["label2ans_pkl"])
    assert ans2label == load_answer_vocab(paths["ans2label_pkl"]) == {a: i for i, a in enumerate(label2ans)}
    for split in SPLITS:
        expected = [(sc, q) for sc in scenes if sc.split == split for q in sc.questions]
        qs = load_questions(paths[f"vqa_questions_{split}"])
        assert [(q["question_id"], q["image_id"], q["question"]) for q in qs] == [
            (q["question_id"], sc.image_id, q["question"]) for sc, q in expected
        ]
        anns = load_annotations(paths[f"vqa_annotations_{split}"])
        assert [[a["answer"] for a in ann["answers"]] for ann in anns] == [q["answers"] for _, q in expected]
        assert [ann["multiple_choice_answer"] for ann in anns] == [q["answer"] for _, q in expected]
        assert [ann["answer_id"] for ann in anns[0]["answers"]] == list(range(1, 11)) if anns else True
        targets = load_targets(paths[f"vqa_targets_{split}"])
        assert targets == load_targets(paths[f"vqa_targets_json_{split}"]) == build_targets(anns, ans2label)
        for t, (sc, q) in zip(targets, expected, strict=True):
            assert t["question_id"] == q["question_id"] and t["image_id"] == sc.image_id
            counts = Counter(q["answers"])
            assert {label2ans[lab]: s for lab, s in zip(t["labels"], t["scores"])} == {
                a: vqa_soft_score(c) for a, c in counts.items()
            }
            assert t["scores"][t["labels"].index(ans2label[q["answer"]])] == 1.0
        # LXMERT's pretraining JSON carries the same soft scores (0.3 / 0.6 / 0.9 / 1 of the annotator count, written
        # here from the counts: not the min(1, count / 3) it had)
        datums = json.loads(paths[f"lxmert_{split}"].read_text())
        written = [label for d in datums for label in d["labelf"]["vqa"]]
        soft = {1: 0.3, 2: 0.6, 3: 0.9}
        assert written == [{a: soft.get(c, 1.0) for a, c in Counter(q["answers"]).items()} for _, q in expected]


# --------------------------------------------------------------------------------------------------- ensure_corpus


def _mtime(p: Path) -> int:
    return p.stat().st_mtime_ns


def test_ensure_corpus_reuses_and_repairs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vl.data.scenes.corpus")
    root = ensure_corpus(tmp_path, TINY)
    assert root == tmp_path / f"scenes-{corpus_key(TINY)}" and verify_corpus(root, TINY) is None
    manifest = root / "manifest.json"
    stamp = _mtime(manifest)
    t0 = time.perf_counter()
    assert ensure_corpus(tmp_path, TINY) == root
    assert time.perf_counter() - t0 < 1.0
    assert _mtime(manifest) == stamp
    assert not [r for r in caplog.records if "rewrote" in r.getMessage()]

    def rewritten(damage) -> None:
        nonlocal stamp
        damage()
        caplog.clear()
        assert ensure_corpus(tmp_path, TINY) == root
        assert _mtime(manifest) != stamp
        stamp = _mtime(manifest)
        assert verify_corpus(root, TINY) is None
        assert any("rewrote" in r.getMessage() for r in caplog.records)

    rewritten(lambda: (root / "vlp" / "val.jsonl").unlink())
    assert (root / "vlp" / "val.jsonl").is_file()
    rewritten(lambda: os.truncate(root / "clip_features.hdf5", 100))
    (tmp_path / f".scenes-{corpus_key(TINY)}.tmp-999999").mkdir()  # left by a writer that died
    rewritten(lambda: (root / "images" / "1003.png").unlink())

    def corrupt_lmdb() -> None:
        data = root / "regions.lmdb" / "data.mdb"
        raw = bytearray(data.read_bytes())
        raw[:8192] = b"\xab" * 8192  # same size, both meta pages destroyed
        data.write_bytes(bytes(raw))

    rewritten(corrupt_lmdb)
    rewritten(lambda: manifest.write_text("{not json"))
    # nothing stale left next to it
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [root.name]


def test_task_corpora_are_written_on_first_use(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A core corpus has no task files; asking for a part writes only that part (its manifest last), reuses it after,
    and rewrites it alone when damaged; the core manifest is untouched throughout."""
    from vl.data.scenes import PARTS
    from vl.data.scenes.corpus import verify_part

    root = ensure_corpus(tmp_path, TINY)
    core = _mtime(root / "manifest.json")
    assert not any((root / directory).exists() for directory, _ in PARTS.values())
    assert verify_part(root, "vcr", TINY) == "parts/vcr.json is missing"
    assert ensure_corpus(tmp_path, TINY, ["vcr"]) == root
    assert verify_part(root, "vcr", TINY) is None and (root / "vcr" / "train.jsonl").is_file()
    assert not (root / "refcoco+").exists() and not (root / "retrieval").exists()
    stamp = _mtime(root / "parts" / "vcr.json")
    assert ensure_corpus(tmp_path, TINY, ["vcr"]) == root and _mtime(root / "parts" / "vcr.json") == stamp
    (root / "vcr" / "val.jsonl").write_text("damaged\n")
    assert "vcr/val.jsonl" in verify_part(root, "vcr", TINY)
    caplog.set_level(logging.INFO, logger="vl.data.scenes.corpus")
    ensure_corpus(tmp_path, TINY, "all")
    assert all(verify_part(root, part, TINY) is None for part in PARTS)
    assert any("'vcr'" in r.getMessage() for r in caplog.records)
    assert _mtime(root / "manifest.json") == core and verify_corpus(root, TINY) is None
    with pytest.raises(ValueError, match="unknown corpus part"):
        ensure_corpus(tmp_path, TINY, ["vqa"])


def test_a_task_module_asks_only_for_its_own_part(tmp_path: Path) -> None:
    from vl.data.vcr import VCRDataModule

    dm = VCRDataModule(cache_dir=str(tmp_path), corpus=TINY.to_dict(), batch_size=4)
    dm.prepare_data()
    assert (dm.root / "parts" / "vcr.json").is_file()
    assert sorted(p.name for p in (dm.root / "parts").iterdir()) == ["vcr.json"]


def test_ensure_corpus_concurrent_callers(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from vl.data.scenes import SceneSettings, ensure_corpus;"
        f"print(ensure_corpus(Path(sys.argv[1]), SceneSettings(**{TINY.to_dict()!r})))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    assert verify_corpus(Path(outs[0]), TINY) is None


def test_cli_writes_corpus(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "vl.tools.scenes", "--out", str(tmp_path / "cli"), "--num-images", "6", "--seed", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert str(tmp_path / "cli") in out.stdout
    assert verify_corpus(tmp_path / "cli", SceneSettings(num_images=6, seed=2)) is None


@pytest.mark.parametrize("rel", ["regions.lmdb/data.mdb", "regions.hdf5", "clip_features.hdf5"])
def test_same_size_damage_of_feature_stores_is_detected_and_repaired(tmp_path: Path, rel: str) -> None:
    """A damaged block (up to 4 KiB) in the middle keeps the size (and often the file readable); the manifest's checksum of
    the feature store catches it and ensure_corpus rewrites the corpus."""
    root = ensure_corpus(tmp_path, TINY)
    target = root / rel
    original = target.read_bytes()
    mid, n = len(original) // 2, min(4096, len(original) // 4)
    damaged = bytearray(original)
    damaged[mid : mid + n] = bytes(b ^ 0xFF for b in original[mid : mid + n])  # flipped bits, same size
    target.write_bytes(bytes(damaged))
    assert target.stat().st_size == len(original)
    reason = verify_corpus(root, TINY)
    assert reason is not None and rel in reason and "checksum differs" in reason, reason
    assert ensure_corpus(tmp_path, TINY) == root
    assert verify_corpus(root, TINY) is None and target.read_bytes() != bytes(damaged)


def test_sampled_checksum_of_large_stores(tmp_path: Path, monkeypatch) -> None:
    """Above the full-hash size the checksum samples blocks from the first to the last byte."""
    import vl.data.scenes.corpus as sc

    monkeypatch.setattr(sc, "_SAMPLE_FULL_BYTES", 0)
    monkeypatch.setattr(sc, "_SAMPLE_BLOCK", 512)
    monkeypatch.setattr(sc, "_SAMPLE_BLOCKS", 4)
    root = ensure_corpus(tmp_path, TINY)
    manifest = json.loads((root / "manifest.json").read_text())
    entries = {e["path"]: e for e in manifest["files"]}
    assert {"regions.lmdb/data.mdb", "regions.hdf5", "clip_features.hdf5"} <= {
        p for p, e in entries.items() if "sampled_sha1" in e
    }
    target = root / "regions.hdf5"
    original = target.read_bytes()
    assert len(original) > 4 * 512  # sampled, not hashed whole
    for offset in (0, len(original) - 1):  # the first and the last block are always sampled
        damaged = bytearray(original)
        damaged[offset] ^= 0xFF
        target.write_bytes(bytes(damaged))
        assert "regions.hdf5 checksum differs" in str(verify_corpus(root, TINY))
    target.write_bytes(original)
    assert verify_corpus(root, TINY) is None
