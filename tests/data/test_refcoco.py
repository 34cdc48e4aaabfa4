"""RefCOCO+: box IoU, REFER / COCO-instances readers, the embedded refcoco+ writer and RefCOCODataModule."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from vl.data.features import open_region_features, write_region_lmdb
from vl.data.formats.boxes import box_iou, pairwise_iou, xywh_to_xyxy
from vl.data.formats.refcoco import REFER_SPLIT_NAMES, load_expressions_json, load_instances, load_refs, refs_of_split
from vl.data.refcoco import RefCOCODataModule
from vl.data.scenes import SceneSettings, generate_scenes
from vl.data.scenes.writers.refcoco import scene_expressions, write_refcoco_corpus
from vl.errors import ConfigError, DataError

REAL = Path(os.environ.get("VL_REAL_SAMPLES") or Path(__file__).resolve().parents[2].parent / "shared" / "real_samples")
SAMPLE = REAL / "refcoco" / "sample_expressions_testA.json"
SETTINGS = SceneSettings(num_images=60)

# ------------------------------------------------------------------------------------------------------------ IoU


def _iou_by_hand(a: list[float], b: list[float]) -> float:
    """Plain-Python IoU of two x1y1x2y2 boxes (the independent reference)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    if area_a == 0 or area_b == 0:
        return 0.0
    return inter / (area_a + area_b - inter)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 4, 4], [0, 0, 4, 4], 1.0),  # identical
        ([0, 0, 4, 4], [4, 0, 8, 4], 0.0),  # touching edge
        ([0, 0, 4, 4], [4, 4, 8, 8], 0.0),  # touching corner
        ([0, 0, 4, 4], [10, 10, 12, 12], 0.0),  # disjoint
        ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16),  # containment
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),  # partial overlap
        ([0, 0, 4, 2], [2, 0, 6, 2], 4 / 12),  # half overlap along x
        ([2, 2, 2, 2], [2, 2, 2, 2], 0.0),  # zero-area, identical
        ([0, 0, 4, 4], [1, 1, 1, 3], 0.0),  # zero-width inside another box
        ([4, 4, 0, 0], [0, 0, 4, 4], 0.0),  # inverted box
    ],
)
def test_iou_edge_cases(a: list[float], b: list[float], expected: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero / invalid-value warnings
        got = box_iou(np.array([a], dtype=np.float32), np.array(b))
    assert got.shape == (1,)
    assert not np.isnan(got).any()
    assert got[0] == pytest.approx(expected, abs=1e-9)
    assert got[0] == pytest.approx(_iou_by_hand(a, b), abs=1e-9)


def test_pairwise_iou_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (12, 2))
    wh = rng.uniform(0, 30, (12, 2))
    wh[:2] = 0  # a couple of degenerate boxes
    a = np.concatenate([xy, xy + wh], axis=1)
    b = np.concatenate([a[:5] + rng.uniform(-3, 3, (5, 4)), a[:2]])
    got = pairwise_iou(a, b)
    assert got.shape == (12, 7)
    want = np.array([[_iou_by_hand(list(x), list(y)) for y in b] for x in a])
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(pairwise_iou(b, a), got.T, atol=1e-12)
    np.testing.assert_allclose(box_iou(a, b[3]), got[:, 3])
    assert pairwise_iou(np.zeros((0, 4)), b).shape == (0, 7)


def _iou_plus_one_by_hand(a: list[float], b: list[float]) -> float:
    """vilbert-multi-task's `iou` (refer_expression_dataset.py): widths, heights and overlaps + 1 (pixel-inclusive)."""
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0.0)
    return iw * ih / (area_a + area_b - iw * ih)


def test_iou_plus_one_matches_the_vilbert_formula() -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 50, (10, 2))
    a = np.concatenate([xy, xy + rng.uniform(1, 30, (10, 2))], axis=1)
    b = np.concatenate([a[:4] + rng.uniform(-3, 3, (4, 4)), [[0, 0, 3, 3], [100, 100, 101, 101]]])
    got = pairwise_iou(a, b, plus_one=True)
    want = np.array([[_iou_plus_one_by_hand(list(x), list(y)) for y in b] for x in a])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert box_iou(np.array([[0, 0, 2, 2]]), np.array([3, 0, 5, 2]), plus_one=True)[0] == 0.0  # adjacent pixels
    assert box_iou(np.array([[0, 0, 2, 2]]), np.array([2, 0, 4, 2]), plus_one=True)[0] == pytest.approx(3 / 15)
    assert not np.allclose(got, pairwise_iou(a, b))  # the conventions differ


def test_xywh_to_xyxy() -> None:
    np.testing.assert_array_equal(xywh_to_xyxy([10, 20, 5, 7]), [10, 20, 15, 27])
    np.testing.assert_array_equal(xywh_to_xyxy(np.array([[0, 0, 1, 2], [3, 4, 0, 0]])), [[0, 0, 1, 2], [3, 4, 3, 4]])
    with pytest.raises(ValueError):
        xywh_to_xyxy([1, 2, 3])


# ------------------------------------------------------------------------------------------------- file readers


@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"real sample not found at {SAMPLE} (set VL_REAL_SAMPLES)")
def test_real_expressions_sample() -> None:
    exprs = load_expressions_json(SAMPLE)
    raw = json.loads(SAMPLE.read_text())["predictions"]
    assert len(exprs) == len(raw) > 1000
    assert exprs[0] == (47, "man in black")
    assert all(isinstance(r, int) and isinstance(s, str) and s for r, s in exprs)
    assert [r for r, _ in exprs] == [p["ref_id"] for p in raw]


def test_expressions_json_errors(tmp_path: Path) -> None:
    p = tmp_path / "e.json"
    p.write_text(json.dumps({"preds": []}))
    with pytest.raises(DataError, match=r"e\.json: missing top-level list 'predictions'"):
        load_expressions_json(p)
    p.write_text(json.dumps({"predictions": [{"sent": "a", "ref_id": 1}, {"sent": "b"}]}))
    with pytest.raises(DataError, match=r"e\.json: predictions\[1\] has no integer 'ref_id'"):
        load_expressions_json(p)
    with pytest.raises(DataError, match="file not found"):
        load_expressions_json(tmp_path / "missing.json")


def _ref(**over) -> dict:
    sid = 4 + over.get("ref_id", 1)  # sent_ids are unique across a refs file, as in refs(unc).p
    ref = {
        "ref_id": 1,
        "ann_id": 10,
        "image_id": 100,
        "split": "train",
        "sentences": [{"raw": "The cat", "sent": "the cat", "tokens": ["the", "cat"], "sent_id": sid}],
        "sent_ids": [sid],
        "category_id": 1,
    }
    return ref | over


def _pickle(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


def test_load_refs_and_errors(tmp_path: Path) -> None:
    p = _pickle(tmp_path / "refs(unc).p", [_ref(), _ref(ref_id=2, split="testA")])
    assert [r["ref_id"] for r in load_refs(p)] == [1, 2]
    bad = {k: v for k, v in _ref(ref_id=2).items() if k != "ann_id"}
    _pickle(p, [_ref(), bad])
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: ref 1 has no 'ann_id'"):
        load_refs(p)
    _pickle(p, [_ref(image_id="100")])
    with pytest.raises(DataError, match=r"ref 0 field 'image_id' has type str"):
        load_refs(p)
    _pickle(p, [_ref(sentences=[{"raw": "X", "sent": "x"}])])
    with pytest.raises(DataError, match=r"ref 0 sentences\[0\] has no integer 'sent_id'"):
        load_refs(p)
    _pickle(p, [_ref(sentences=[{"sent": "the cat", "sent_id": 5}])])  # the expression is read from 'raw'
    with pytest.raises(DataError, match=r"ref 0 sentences\[0\] has no string 'raw'"):
        load_refs(p)
    assert load_refs(p, "sent")[0]["sentences"][0]["sent"] == "the cat"
    _pickle(p, [_ref(), _ref(sentences=[{"raw": "A dog", "sent_id": 9}])])
    with pytest.raises(DataError, match="ref 1 repeats ref_id 1"):
        load_refs(p)
    _pickle(p, [_ref(), _ref(ref_id=2, sentences=[{"raw": "A dog", "sent_id": 5}])])  # keyed by sent_id: refused
    with pytest.raises(DataError, match=r"ref 1 sentences\[0\] repeats sent_id 5 \(first in ref 0\)"):
        load_refs(p)
    _pickle(p, {"refs": []})
    with pytest.raises(DataError, match="expected a list of refs"):
        load_refs(p)
    p.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot unpickle"):
        load_refs(p)
    with pytest.raises(DataError, match="file not found"):
        load_refs(tmp_path / "nope.p")


def test_load_instances_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "instances.json"
    data = {
        "images": [{"id": 100, "width": 640, "height": 480}],
        "annotations": [{"id": 10, "image_id": 100, "bbox": [10.5, 20, 30, 40], "category_id": 1, "area": 1200}],
        "categories": [{"id": 1, "name": "person"}],
    }
    p.write_text(json.dumps(data))
    inst = load_instances(p)
    np.testing.assert_allclose(inst.boxes[10], [10.5, 20, 40.5, 60])
    assert inst.ann_image == {10: 100} and inst.sizes == {100: (640, 480)} and inst.categories == {1: "person"}
    data["annotations"][0]["bbox"] = [1, 2, 3]
    p.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances\.json: annotations\[0\] field 'bbox'"):
        load_instances(p)
    data["annotations"][0].update(bbox=[1, 2, 3, 4], image_id=7)
    p.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[0\] refers to unknown image id 7"):
        load_instances(p)
    p.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="missing top-level list 'annotations'"):
        load_instances(p)


# ---------------------------------------------------------------------------------------------- embedded corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("refcoco")
    return root, write_refcoco_corpus(root, generate_scenes(SETTINGS), SETTINGS)


def _module(root: Path, **kwargs) -> RefCOCODataModule:
    return RefCOCODataModule(root=str(root), **kwargs)


def test_the_expression_is_the_raw_sentence_as_in_vilbert(corpus: tuple[Path, list[Path]]) -> None:
    """ViLBERT's `refer_expression_dataset.py` tokenises `sent['raw']` (as written), not REFER's normalised `sent`;
    `data.sentence_field=sent` reads the other."""
    root, _ = corpus
    refs = load_refs(root / "refcoco+" / "refs(unc).p")
    for field in ("raw", "sent"):
        dm = _module(root, sentence_field=field)
        dm.setup("fit")
        want = {(r["ref_id"], s["sent_id"]): s[field] for r in refs if r["split"] == "train" for s in r["sentences"]}
        got = {(ex.ref_id, ex.sent_id): ex.text for ex in dm.datasets["train"].examples}
        assert got == want
    assert any(s["raw"] != s["sent"] for r in refs for s in r["sentences"])  # the fixture tells them apart
    with pytest.raises(ConfigError, match="sentence_field"):
        _module(root, sentence_field="tokens")


def test_scene_expressions_are_unique() -> None:
    for sc in generate_scenes(SETTINGS)[:40]:
        per_shape = scene_expressions(sc.shapes)
        assert len(per_shape) == len(sc.shapes)
        texts = [t for exprs in per_shape for t in exprs]
        assert len(texts) == len(set(texts)), "an expression names two shapes of one scene"
        assert all(per_shape), "every shape has at least its colour + shape"


def test_write_refcoco_corpus(corpus: tuple[Path, list[Path]]) -> None:
    root, written = corpus
    assert [p.relative_to(root).as_posix() for p in written] == [
        "refcoco+/refs(unc).p",
        "refcoco+/instances.json",
        "refcoco+/dets.lmdb/data.mdb",
        "refcoco+/gt.lmdb/data.mdb",
    ]
    assert all(p.is_file() for p in written)
    refs = load_refs(written[0])
    inst = load_instances(written[1])
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    assert len({s["sent_id"] for r in refs for s in r["sentences"]}) == sum(len(r["sentences"]) for r in refs)
    dets, gt = open_region_features(written[2]), open_region_features(written[3])
    assert len(dets) == len(gt) == SETTINGS.num_images
    best_det, below = [], 0
    for r in refs:
        box = inst.boxes[r["ann_id"]]
        d, g = dets[r["image_id"]], gt[r["image_id"]]
        ious_d, ious_g = box_iou(d["boxes"], box), box_iou(g["boxes"], box)
        assert ious_g.max() == pytest.approx(1.0)  # GT features sit at the exact box
        best_det.append(ious_d.max())
        below += int((ious_d < 0.5).sum())
        assert d["features"].shape[1] == g["features"].shape[1] == SETTINGS.region_dim
    assert 0.5 < min(best_det) and max(best_det) < 1.0  # jittered but good detections
    assert below > 0  # background / other shapes' boxes


def test_datamodule_contract(corpus: tuple[Path, list[Path]]) -> None:
    root, _ = corpus
    dm = _module(root, max_regions=36)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.info == {"visual_dim": SETTINGS.region_dim}
    train, val, test = dm.datasets["train"], dm.datasets["val"], dm.datasets["test"]
    refs = load_refs(root / "refcoco+" / "refs(unc).p")
    for ds, name in ((train, "train"), (val, "val"), (test, "testA")):
        assert len(ds) == sum(len(r["sentences"]) for r in refs if r["split"] == name) > 0
    dets = open_region_features(root / "refcoco+" / "dets.lmdb")
    for i in range(len(train)):
        ex = train[(3, i)]
        assert set(ex) == {
            "text",
            "visual",
            "refer_targets",
            "refer_ious",
            "refer_image_iou",
            "refer_image_target",
            "ref_id",
            "sent_id",
            "index",
            "epoch",
        }
        # ViLBERT's pixel-inclusive IoU, per region and for the whole image [0, 0, W, H] (computed by hand)
        box = train.examples[i].box
        by_hand = [_iou_plus_one_by_hand(list(b), list(box)) for b in ex["visual"]["boxes"]]
        np.testing.assert_allclose(ex["refer_ious"], by_hand, atol=1e-6)
        whole = [0.0, 0.0, float(ex["visual"]["image_w"]), float(ex["visual"]["image_h"])]
        assert ex["refer_image_iou"] == pytest.approx(_iou_plus_one_by_hand(whole, list(box)), abs=1e-6)
        assert ex["refer_image_target"] == (ex["refer_image_iou"] if ex["refer_image_iou"] >= 0.5 else 0.0)
        assert (ex["index"], ex["epoch"]) == (i, 3)
        n = ex["visual"]["features"].shape[0]
        assert ex["visual"]["num_boxes"] == n > dets[train.examples[i].image_id]["num_boxes"]  # + GT boxes
        assert ex["refer_targets"].dtype == ex["refer_ious"].dtype == np.float32
        assert ex["refer_targets"].shape == ex["refer_ious"].shape == (n,)
        assert ex["refer_targets"].max() > 0
        low = ex["refer_ious"] < 0.5
        assert (ex["refer_targets"][low] == 0).all()
        np.testing.assert_array_equal(ex["refer_targets"][~low], ex["refer_ious"][~low])
    reader_keys = set(dets[dets.ids()[0]]) | {"global_feature"}
    for ds in (val, test):
        ex = ds[0]
        assert set(ex["visual"]) == reader_keys
        for key in ("features", "boxes", "boxes_norm", "cls_prob"):
            assert ex["visual"][key].shape[0] == ex["refer_ious"].shape[0]
        assert ex["visual"]["num_boxes"] == dets[ds.examples[0].image_id]["num_boxes"]  # detections only
        assert isinstance(ex["text"], str) and isinstance(ex["ref_id"], int) and isinstance(ex["sent_id"], int)
    assert max(val[i]["refer_ious"].max() for i in range(len(val))) > 0.5
    # evaluation targets are the raw IoUs (vilbert_beta thresholds at 0.5 under `split == 'train'` only)
    for ds in (val, test):
        for i in range(len(ds)):
            ex = ds[i]
            np.testing.assert_array_equal(ex["refer_targets"], ex["refer_ious"])
            assert ex["refer_image_target"] == ex["refer_image_iou"]
    assert any(((val[i]["refer_ious"] > 0) & (val[i]["refer_ious"] < 0.5)).any() for i in range(len(val)))

    batch = dm.collator("train")([train[i] for i in range(4)])
    r = batch["visual_mask"].shape[1]
    assert batch["refer_targets"].shape == batch["refer_ious"].shape == (4, r)


def test_test_split_option_gt_off_and_truncation(corpus: tuple[Path, list[Path]]) -> None:
    root, _ = corpus
    refs = load_refs(root / "refcoco+" / "refs(unc).p")
    dm = _module(root, splits={"test": "testB"}, gt_features=None)
    assert dm.splits == {"train": "train", "val": "val", "test": "testB"}
    assert len(dm.dataset("test")) == sum(len(r["sentences"]) for r in refs if r["split"] == "testB")
    assert _module(root).splits["test"] == "testA"
    train = dm.dataset("train")
    dets = open_region_features(root / "refcoco+" / "dets.lmdb")
    assert train[0]["visual"]["num_boxes"] == dets[train.examples[0].image_id]["num_boxes"]  # no GT regions

    small = _module(root, max_regions=4, gt_regions_first=True).dataset("train")  # detections cut, GT regions kept
    for i in range(len(small)):
        ex = small[i]
        assert ex["visual"]["features"].shape[0] <= 4 and ex["refer_targets"].max() > 0
    with pytest.raises(ConfigError, match="iou_threshold"):
        _module(root, iou_threshold=1.5)


def test_predictions_and_baselines(corpus: tuple[Path, list[Path]], tmp_path: Path) -> None:
    root, _ = corpus
    dm = _module(root)
    test = dm.dataset("test")
    preds = []
    for i in range(len(test)):
        ex = test[i]
        preds.append({"ref_id": ex["ref_id"], "sent_id": ex["sent_id"], "region": int(np.argmax(ex["refer_ious"]))})
    out = dm.write_predictions(preds[::-1], tmp_path / "refer.json")
    rows = json.loads(out.read_text())
    assert [(r["ref_id"], r["sent_id"]) for r in rows] == sorted((p["ref_id"], p["sent_id"]) for p in preds)
    for row in rows:
        assert set(row) == {"ref_id", "sent_id", "box", "iou"} and len(row["box"]) == 4
        assert row["iou"] > 0.5  # the oracle region
    with pytest.raises(ValueError, match="region 99"):
        dm.write_predictions([{**preds[0], "region": 99}], tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no such example"):
        dm.write_predictions([{**preds[0], "sent_id": -1}], tmp_path / "bad.json")

    base = dm.baselines("test")
    assert set(base) == {"test/refer_acc_chance", "test/refer_acc_largest"}
    assert 0 < base["test/refer_acc_chance"] < 1 and 0 <= base["test/refer_acc_largest"] <= 1
    by_hand = np.mean([np.mean(test[i]["refer_ious"] > 0.5) for i in range(len(test))])
    assert base["test/refer_acc_chance"] == pytest.approx(by_hand)


def refer_get_ref_ids(refs: list[dict], split: str) -> list[int]:
    """Transcription of REFER's `getRefIds(split=split)` (lichengunc/refer `refer.py`, also vilbert_beta's
    `tools/refer/refer.py`), the split branch only (`sys.exit()` -> SystemExit)."""
    if split in ["testA", "testB", "testC"]:
        refs = [ref for ref in refs if split[-1] in ref["split"]]  # we also consider testAB, testBC, ...
    elif split in ["testAB", "testBC", "testAC"]:
        refs = [ref for ref in refs if ref["split"] == split]
    elif split == "test":
        refs = [ref for ref in refs if "test" in ref["split"]]
    elif split == "train" or split == "val":
        refs = [ref for ref in refs if ref["split"] == split]
    else:
        raise SystemExit(f"No such split [{split}]")
    return [ref["ref_id"] for ref in refs]


def test_split_selection_is_refers_get_ref_ids(corpus: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """testA / testB also take the testAB refs, `test` every test split (REFER's rule, which ViLBERT's reader uses)."""
    kinds = ["train", "val", "testA", "testB", "testAB", "train", "testAB", "testB", "val", "testA", "testBC"]
    refs = [_ref(ref_id=i + 1, split=k) for i, k in enumerate(kinds)]
    for name in REFER_SPLIT_NAMES:
        assert [r["ref_id"] for r in refs_of_split(refs, name)] == refer_get_ref_ids(refs, name), name
    assert [r["ref_id"] for r in refs_of_split(refs, "testA")] == [3, 5, 7, 10]  # by hand
    assert [r["ref_id"] for r in refs_of_split(refs, "test")] == [3, 4, 5, 7, 8, 10, 11]
    with pytest.raises(SystemExit):
        refer_get_ref_ids(refs, "testD")
    with pytest.raises(ValueError, match="testD"):
        refs_of_split(refs, "testD")

    # the data module: some testA / testB refs of the embedded corpus relabelled testAB
    root = _copy(corpus, tmp_path)
    refs_path = root / "refcoco+" / "refs(unc).p"
    file_refs = load_refs(refs_path)
    for r in [r for r in file_refs if r["split"] in ("testA", "testB")][::3]:
        r["split"] = "testAB"
    _pickle(refs_path, file_refs)
    assert sum(r["split"] == "testAB" for r in file_refs) > 0
    for name in ("testA", "testB", "test", "testAB"):
        ds = _module(root, splits={"test": name}).dataset("test")
        want = set(refer_get_ref_ids(file_refs, name))
        assert {ex.ref_id for ex in ds.examples} == want, name
        by_id = {r["ref_id"]: r for r in file_refs}
        assert len(ds) == sum(len(by_id[i]["sentences"]) for i in want)
    with pytest.raises(ConfigError, match=r"^data\.splits\.test: 'testD' is not a REFER split name"):
        _module(root, splits={"test": "testD"})
    with pytest.raises(ConfigError, match=r"^data\.splits\.val: 'validation'"):
        _module(root, splits={"val": "validation"})


# ---------------------------------------------------------------------------------------------------- bad input


def _copy(corpus: tuple[Path, list[Path]], tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(corpus[0] / "refcoco+", root / "refcoco+")
    return root


def test_missing_files(corpus: tuple[Path, list[Path]], tmp_path: Path) -> None:
    root = _copy(corpus, tmp_path)
    (root / "refcoco+" / "instances.json").unlink()
    with pytest.raises(DataError, match=r"instances\.json: file not found"):
        _module(root).prepare_data()
    with pytest.raises(DataError, match=r"instances\.json: file not found"):
        _module(root).setup("fit")
    shutil.copy(corpus[0] / "refcoco+" / "instances.json", root / "refcoco+" / "instances.json")
    shutil.rmtree(root / "refcoco+" / "gt.lmdb")
    with pytest.raises(DataError, match=r"gt\.lmdb: file not found"):
        _module(root).prepare_data()
    _module(root, gt_features=None).prepare_data()  # GT regions are optional


def test_ref_with_unknown_annotation(corpus: tuple[Path, list[Path]], tmp_path: Path) -> None:
    root = _copy(corpus, tmp_path)
    refs_path = root / "refcoco+" / "refs(unc).p"
    refs = load_refs(refs_path)
    bad = next(r for r in refs if r["split"] == "val")
    bad["ann_id"] = 424242
    _pickle(refs_path, refs)
    dm = _module(root)
    dm.dataset("train")  # other splits are fine
    with pytest.raises(DataError, match=rf"refs\(unc\)\.p: ref_id {bad['ref_id']} field 'ann_id' = 424242 .*instances"):
        dm.dataset("val")
    with pytest.raises(DataError, match=r"no refs with split 'testC'"):
        _module(root, splits={"test": "testC"}).dataset("test")


def test_image_without_features(corpus: tuple[Path, list[Path]], tmp_path: Path) -> None:
    root = _copy(corpus, tmp_path)
    refs = load_refs(root / "refcoco+" / "refs(unc).p")
    dropped = next(r["image_id"] for r in refs if r["split"] == "train")
    for name in ("dets", "gt"):
        reader = open_region_features(corpus[0] / "refcoco+" / f"{name}.lmdb")
        records = [reader[i] for i in reader.ids() if name == "dets" or i != str(dropped)]
        reader.close()
        write_region_lmdb(root / "refcoco+" / f"{name}_new.lmdb", records)
    with pytest.raises(DataError, match=rf"gt_new\.lmdb: no region features for image id {dropped}"):
        _module(root, features="refcoco+/dets_new.lmdb", gt_features="refcoco+/gt_new.lmdb").dataset("train")
    # evaluation splits use detections only: the GT file is not consulted
    _module(root, features="refcoco+/dets_new.lmdb", gt_features="refcoco+/gt_new.lmdb").dataset("val")


def test_feature_image_size_must_be_the_instances(corpus: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """Region records whose image_w x image_h differ from the COCO instances' width x height (features of a resized
    image): every IoU of that image would mix two pixel scales, so fetching its example fails naming both files."""
    root = _copy(corpus, tmp_path)
    refs = load_refs(root / "refcoco+" / "refs(unc).p")
    ref = next(r for r in refs if r["split"] == "train")
    inst_path = root / "refcoco+" / "instances.json"
    inst = json.loads(inst_path.read_text())
    image = next(img for img in inst["images"] if img["id"] == ref["image_id"])
    feats = open_region_features(root / "refcoco+" / "dets.lmdb")[str(ref["image_id"])]
    assert (image["width"], image["height"]) == (feats["image_w"], feats["image_h"])  # the corpus agrees
    image["width"] *= 2
    inst_path.write_text(json.dumps(inst))
    data = _module(root).dataset("train")
    index = next(i for i, ex in enumerate(data.examples) if ex.image_id == ref["image_id"])
    other = next(i for i, ex in enumerate(data.examples) if ex.image_id != ref["image_id"])
    data[other]  # the other images read
    with pytest.raises(DataError, match=rf"dets\.lmdb: image id {ref['image_id']} has image_w x image_h") as e:
        data[index]
    assert "instances.json" in str(e.value) and f"{image['width']}x{image['height']}" in str(e.value)


def test_embedded_corpus_gets_refcoco_files(data_dir: Path) -> None:
    from tests.conftest import TINY_CORPUS_IMAGES

    dm = RefCOCODataModule(cache_dir=str(data_dir), corpus={"num_images": TINY_CORPUS_IMAGES})
    dm.prepare_data()
    assert (dm.root / "refcoco+" / "refs(unc).p").is_file()
    ex = dm.dataset("train")[0]
    assert ex["refer_targets"].max() > 0 and dm.info["visual_dim"] == ex["visual"]["features"].shape[1]


# ---------------------------------------------------------------------------------------------- the seed's regions
def seed_refer_regions(det_feats, det_boxes, gt_feats, gt_boxes, max_region_num):
    """vilbert_beta's `ImageFeaturesH5Reader` (global = sum(features) / num_boxes prepended, num_boxes + 1) and
    `ReferExpressionDataset.__getitem__` on a training split (GT reader's own global row dropped, detections + GT
    concatenated, the first `mix_num_boxes` rows kept), numpy only. Returns the kept (features, boxes) rows, the
    global token first."""
    features = np.concatenate([det_feats.sum(0, keepdims=True) / len(det_feats), det_feats])
    boxes = np.concatenate([np.zeros((1, 4)), det_boxes])
    num_boxes = len(det_feats) + 1
    gt_all = np.concatenate([gt_feats.sum(0, keepdims=True) / len(gt_feats), gt_feats])
    gt_boxes_all = np.concatenate([np.zeros((1, 4)), gt_boxes])
    gt_num_boxes = len(gt_feats) + 1
    gt_features, gt_box_rows = gt_all[1:gt_num_boxes], gt_boxes_all[1:gt_num_boxes]
    mix_features = np.concatenate((features, gt_features), axis=0)
    mix_boxes = np.concatenate((boxes, gt_box_rows), axis=0)
    mix_num_boxes = min(int(num_boxes + int(gt_num_boxes) - 1), max_region_num)
    return mix_features[:mix_num_boxes], mix_boxes[:mix_num_boxes]


def _reader_item(feats: np.ndarray, boxes: np.ndarray) -> dict:
    return {
        "features": feats.astype(np.float32),
        "boxes": boxes.astype(np.float32),
        "boxes_norm": (boxes / 100.0).astype(np.float32),
        "cls_prob": None,
        "num_boxes": len(feats),
        "image_w": 100,
        "image_h": 100,
    }


@pytest.mark.parametrize("max_regions", [2, 4, 5, 6, 9])
def test_training_regions_and_global_feature_are_the_seeds(max_regions: int) -> None:
    """A hand-built image (4 detections, 3 GT boxes): vl's regions are the seed's rows after its global token (cut
    from the end of detections + GT: GT regions go first), and `global_feature` is the seed's global row, the mean
    of the detections alone. vl's `max_regions` excludes the global token (the seed's `max_region_num` - 1)."""
    from vl.data.refcoco import RefCOCOExpressions, RefExample

    rng = np.random.default_rng(0)
    det_feats, gt_feats = rng.normal(size=(4, 6)), rng.normal(size=(3, 6)) + 5.0
    det_boxes = np.array([[0, 0, 50, 50], [10, 10, 60, 60], [20, 0, 90, 40], [5, 5, 95, 95]], dtype=float)
    gt_boxes = np.array([[0, 0, 48, 52], [30, 30, 70, 70], [60, 60, 99, 99]], dtype=float)
    dets, gt = {"7": _reader_item(det_feats, det_boxes)}, {"7": _reader_item(gt_feats, gt_boxes)}
    example = RefExample(1, 1, "a thing", 7, np.array([0.0, 0.0, 48.0, 52.0]))
    data = RefCOCOExpressions([example], dets, gt, max_regions=max_regions)  # type: ignore[arg-type]
    visual = data[0]["visual"]
    want_feats, want_boxes = seed_refer_regions(
        det_feats.astype(np.float32), det_boxes, gt_feats.astype(np.float32), gt_boxes, max_regions + 1
    )
    np.testing.assert_allclose(visual["global_feature"], want_feats[0], rtol=1e-6)
    np.testing.assert_allclose(visual["features"], want_feats[1:], rtol=1e-6)
    np.testing.assert_allclose(visual["boxes"], want_boxes[1:])
    assert visual["num_boxes"] == len(want_feats) - 1 == len(data[0]["refer_ious"])
    # vl's earlier rule: detections cut first, every GT region kept; the global token stays the detections' mean
    old = RefCOCOExpressions([example], dets, gt, max_regions=max_regions, gt_regions_first=True)  # type: ignore[arg-type]
    kept = old[0]["visual"]
    n_gt = min(3, max_regions)
    np.testing.assert_allclose(kept["features"][-n_gt:], gt_feats[:n_gt].astype(np.float32))
    np.testing.assert_allclose(kept["global_feature"], det_feats.astype(np.float32).mean(0), rtol=1e-6)


def test_evaluation_global_feature_is_the_mean_of_every_detection(corpus: tuple[Path, list[Path]]) -> None:
    """Eval splits (detections only): rows cut to max_regions, the global token still the mean of all detections
    (the seed's reader averages before the dataset cuts); collated into `visual_global`."""
    root, _ = corpus
    dets = open_region_features(root / "refcoco+" / "dets.lmdb")
    data = _module(root, max_regions=2).dataset("val")
    rows = [data[i] for i in range(4)]
    for i, ex in enumerate(rows):
        every = np.asarray(dets[data.examples[i].image_id]["features"], dtype=np.float64)
        assert len(every) > 2 and ex["visual"]["features"].shape[0] == 2
        np.testing.assert_allclose(ex["visual"]["global_feature"], every.mean(0), rtol=1e-5, atol=1e-6)
    batch = _module(root, max_regions=2).collator("val")(rows)
    np.testing.assert_allclose(
        batch["visual_global"].numpy(), np.stack([ex["visual"]["global_feature"] for ex in rows]), rtol=0, atol=0
    )
