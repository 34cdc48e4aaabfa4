"""ViLBERT's global image token on VQA and retrieval (`data.global_token`): vilbert_beta's feature reader
(`_image_features_reader.py`) makes it the mean of ALL the image's boxes in the LMDB file, then the dataset keeps the
first `max_region_num` rows (global included). Checked against that rule transcribed here on the raw LMDB records."""

from __future__ import annotations

import base64
import pickle
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from vl.errors import ConfigError

MAX_REGIONS = 3  # fewer than every embedded image's detections: the cut matters


def _seed_reader(lmdb_dir: Path, tmp_path: Path) -> dict[str, tuple[np.ndarray, int]]:
    """vilbert_beta's ImageFeaturesH5Reader.__getitem__ for every image: (features with the global row first,
    num_boxes + 1). Reads a copy (this process already holds the file open through vl's reader)."""
    copy = tmp_path / "seed.lmdb"
    shutil.copytree(lmdb_dir, copy)
    out = {}
    env = lmdb.open(str(copy), readonly=True, lock=False, readahead=False)
    with env.begin() as txn:
        for image_id in pickle.loads(txn.get(b"keys")):
            item = pickle.loads(txn.get(image_id))
            num_boxes = int(item["num_boxes"])
            features = np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).reshape(num_boxes, -1)
            g_feat = np.sum(features, axis=0) / num_boxes
            out[image_id] = (np.concatenate([np.expand_dims(g_feat, axis=0), features], axis=0), num_boxes + 1)
    env.close()
    return out


def _module(make_cfg, data: str, *overrides: str):
    extra = ("data.captions_per_image=2",) if data == "retrieval" else ()
    cfg = make_cfg("experiment=none", f"data={data}", f"data.max_regions={MAX_REGIONS}", *extra, *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _first_batch(dm) -> dict:
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("data", ["vqa", "retrieval"])
def test_global_token_is_the_mean_of_all_the_files_boxes(make_cfg, tmp_path: Path, data: str) -> None:
    dm = _module(make_cfg, data)
    batch = _first_batch(dm)
    seed = _seed_reader(dm.path(dm.features_file), tmp_path)
    cut = 0
    for row in range(len(batch["visual_feats"])):  # each row's image: the one whose first rows it holds
        n = int(batch["visual_mask"][row].sum())
        got = batch["visual_feats"][row, :n].numpy()
        (image_id,) = [i for i, (f, _) in seed.items() if len(f) > n and np.array_equal(f[1 : n + 1], got)]
        features, num_boxes = seed[image_id]
        kept = min(num_boxes, MAX_REGIONS + 1)  # the seed's mix_num_boxes (max_region_num = vl's max_regions + 1)
        assert n + 1 == kept
        cut += num_boxes > kept
        np.testing.assert_allclose(batch["visual_global"][row].numpy(), features[0], rtol=0, atol=1e-6)
    assert cut, "the fixture must have images with more boxes than the recipe keeps"


@pytest.mark.parametrize("data", ["vqa", "retrieval"])
def test_global_token_kept_leaves_it_to_the_model(make_cfg, data: str) -> None:
    """`kept` (vl's earlier behaviour): no `visual_global`; ViLBERT then averages the kept rows."""
    batch = _first_batch(_module(make_cfg, data, "data.global_token=kept"))
    assert "visual_global" not in batch
    assert batch["visual_feats"].shape[1] == MAX_REGIONS


def test_global_token_reaches_vilberts_image_embedding(make_cfg) -> None:
    """The batch's `visual_global` is the global row ViLBERT's image embedding prepends."""
    from vl.models.vilbert import ImageEmbedding

    batch = _first_batch(_module(make_cfg, "vqa"))
    feats, _, mask = ImageEmbedding.with_global_token(
        batch["visual_feats"], batch["visual_boxes"], batch["visual_mask"], batch["visual_global"]
    )
    assert torch.equal(feats[:, 0], batch["visual_global"]) and bool(mask[:, 0].all())


def test_global_token_unknown_value_is_refused(make_cfg) -> None:
    with pytest.raises((ConfigError, InstantiationException), match="data.global_token"):
        _module(make_cfg, "vqa", "data.global_token=mean")


def test_global_token_of_an_image_given_at_inference(make_cfg) -> None:
    """`vl.load(...).answer(image=array)`: an image given as features gets the same rule as the file's images."""
    dm = _module(make_cfg, "vqa")
    feats = np.random.default_rng(0).normal(size=(MAX_REGIONS + 4, dm.info["visual_dim"])).astype(np.float32)
    batch = dm.inference_collator()([{"text": "what is it?", **dm.visual_example(feats)}])
    np.testing.assert_allclose(batch["visual_global"][0].numpy(), feats.sum(0) / len(feats), rtol=0, atol=1e-6)
    assert batch["visual_feats"].shape[1] == MAX_REGIONS
    kept = _module(make_cfg, "vqa", "data.global_token=kept")
    assert "visual_global" not in kept.inference_collator()([{"text": "what?", **kept.visual_example(feats)}])


def test_vcr_global_token_is_the_seeds_merge_of_both_files(tmp_path: Path) -> None:
    """VCR with GT boxes (vilbert_beta `vcr_dataset.py`): the global row is the detections' global feature and the GT
    file's, each weighted by its file's box count + 1, then GT rows kept first (at most max_region_num - 1) and the
    detection rows (the global one counted) fill the rest; transcribed here on the raw LMDB records."""
    from vl.data.features import write_region_lmdb
    from vl.data.formats.vcr import image_int_id
    from vl.data.scenes import SceneSettings, generate_scenes
    from vl.data.scenes.writers.vcr import write_vcr_corpus
    from vl.data.vcr import VCRDataModule

    root = tmp_path / "vcr_corpus"
    settings = SceneSettings(num_images=40)
    write_vcr_corpus(root, generate_scenes(settings), settings)
    max_regions = 5
    seed_det = _seed_reader(root / "vcr" / "regions.lmdb", tmp_path / "d")
    rng = np.random.default_rng(0)
    gt_records = []
    for image_id, (features, _) in seed_det.items():
        k = int(rng.integers(1, 8))  # fewer and more GT boxes than max_regions
        xy = rng.uniform(0, 50, size=(k, 2))
        gt_records.append(
            {
                "image_id": image_id.decode(),
                "image_h": 100,
                "image_w": 100,
                "boxes": np.concatenate([xy, xy + 10], 1).astype(np.float32),
                "features": rng.normal(size=(k, features.shape[1])).astype(np.float32),
            }
        )
    write_region_lmdb(root / "vcr" / "gt.lmdb", gt_records)
    seed_gt = _seed_reader(root / "vcr" / "gt.lmdb", tmp_path / "g")
    dm = VCRDataModule(root=str(root), gt_features="vcr/gt.lmdb", max_regions=max_regions, vcr_steps="joint")
    dm.setup("fit")
    data = dm.datasets["train"]
    for index in range(len(data)):
        key = str(image_int_id(data.records[index]["img_id"])).encode()
        features, num_boxes = seed_det[key]
        gt_features, gt_num_boxes = seed_gt[key]
        merged = (features[0] * num_boxes + gt_features[0] * gt_num_boxes) / (num_boxes + gt_num_boxes)
        gt_keep = min(max_regions + 1 - 1, gt_num_boxes - 1)  # max_region_num = vl's max_regions + the global row
        det_keep = min(max_regions + 1 - gt_keep, num_boxes)  # the global row included
        want = np.concatenate([features[1:det_keep], gt_features[1 : 1 + gt_keep]])
        visual = data[(0, index)]["visual"]
        np.testing.assert_allclose(visual["global_feature"], merged, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(visual["features"], want)
    batch = dm.collator("val")([dm.datasets["val"][(0, 0)]])
    assert batch["visual_global"].shape == (batch["visual_feats"].shape[0], features.shape[1])
    kept = VCRDataModule(root=str(root), gt_features="vcr/gt.lmdb", max_regions=max_regions, global_token="kept")
    kept.setup("fit")
    assert "global_feature" not in kept.datasets["train"][(0, 0)]["visual"]


def _seed_masked_global(image_feat: np.ndarray, image_mask: np.ndarray) -> np.ndarray:
    """vilbert_beta `ConceptCapLoaderTrain.__iter__`: the global feature of a batch whose regions `random_region`
    already masked (zeroed), padding rows zero: `np.sum(image_feat, axis=1) / np.sum(image_mask, axis=1, ...)`."""
    return np.sum(image_feat, axis=1) / np.sum(image_mask, axis=1, keepdims=True)


def _assert_global_is_the_masked_mean(batch: dict) -> None:
    feats, mask = batch["visual_feats"].numpy(), batch["visual_mask"].numpy()
    zeroed = (np.abs(feats).sum(-1) == 0) & (np.abs(batch["region_feat_targets"].numpy()).sum(-1) > 0) & (mask > 0)
    assert zeroed.any(), "the fixture must mask some region"
    want = _seed_masked_global(feats * mask[..., None], mask)
    np.testing.assert_allclose(batch["visual_global"].numpy(), want, rtol=0, atol=1e-6)
    # the reader's global (mean of the unmasked regions) is not what the batch carries where a region was zeroed
    rows = zeroed.any(1)
    unmasked = _seed_masked_global(batch["region_feat_targets"].numpy(), mask)
    assert not np.allclose(batch["visual_global"].numpy()[rows], unmasked[rows], atol=1e-4)


@pytest.mark.parametrize("data", ["vqa", "retrieval"])
def test_region_masking_global_token_is_the_masked_mean(make_cfg, data: str) -> None:
    """`data.global_token=all` with a region-masking objective: the reader's mean (of unmasked regions, masked ones
    too) would leak the masked features; the collator recomputes it from the masked batch as the seed's pretraining
    loader does."""
    task = "vqa" if data == "vqa" else "retrieval"
    dm = _module(
        make_cfg, data, f"data.objectives=[{task},mrfr]", "data.batch_size=32", "data.batch_size_per_device=32"
    )
    for batch in [b for _, b in zip(range(3), dm.train_dataloader(), strict=False)]:
        _assert_global_is_the_masked_mean(batch)


def test_refcoco_region_masking_global_token_is_the_masked_mean(tmp_path: Path) -> None:
    from vl.data.refcoco import RefCOCODataModule
    from vl.data.scenes import SceneSettings, generate_scenes
    from vl.data.scenes.writers.refcoco import write_refcoco_corpus

    settings = SceneSettings(num_images=40)
    write_refcoco_corpus(tmp_path, generate_scenes(settings), settings)
    dm = RefCOCODataModule(root=str(tmp_path), objectives=["refer", "mrfr"])
    dm.setup("fit")
    data = dm.datasets["train"]
    examples = [data[(0, i)] for i in range(min(64, len(data)))]
    batch = dm.collator("train")(examples)
    _assert_global_is_the_masked_mean(batch)
    plain = RefCOCODataModule(root=str(tmp_path)).collator("train")(examples)  # no masking: the reader's mean stays
    np.testing.assert_array_equal(
        plain["visual_global"].numpy(), np.stack([ex["visual"]["global_feature"] for ex in examples])
    )
