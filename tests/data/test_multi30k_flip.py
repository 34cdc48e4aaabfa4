"""MM-BERT's box flip (`data.flip_prob`, the seed's ``TRAIN.FLIP_PROB`` 0.5 and ``RandomHorizontalFlip`` on
precomputed features): the mirrored boxes are the seed's formula's, the whole-image box is unchanged, about half the
training rows flip, the same rows for the same (seed, epoch, index), never on val/test, and flip_prob 0 gives the
batches of vl before the flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data.test_multi30k import write_fixture
from vl.data.formats.multi30k import select_regions
from vl.data.multi30k import Multi30kDataModule
from vl.data.multi30k_examples import flip_drawn, flip_regions, mirror_boxes
from vl.errors import ConfigError


def seed_flip(boxes: np.ndarray, w0: float, h0: float) -> np.ndarray:
    """The seed's `pretrain/data/transforms/transforms.py` RandomHorizontalFlip on the boxes, transcribed: the
    dataset's ``im_info = torch.tensor([w0, h0, 1.0, 1.0, index])`` (float32), ``w, h = im_info[:2]``,
    ``boxes[:, [0, 2]] = w - 1 - boxes[:, [2, 0]]``."""
    boxes = torch.as_tensor(np.array(boxes, dtype=np.float32))
    im_info = torch.tensor([w0, h0, 1.0, 1.0, 0])
    w, h = im_info[:2]
    boxes[:, [0, 2]] = w - 1 - boxes[:, [2, 0]]
    return boxes.numpy()


def test_mirrored_boxes_are_the_seeds() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        w, h = rng.uniform(20.0, 1200.0, 2)
        xy = rng.uniform(0, w - 1, (30, 2)), rng.uniform(0, h - 1, (30, 2))
        boxes = np.stack([xy[0].min(1), xy[1].min(1), xy[0].max(1), xy[1].max(1)], 1).astype(np.float32)
        out = mirror_boxes(boxes, w)
        assert np.array_equal(out, seed_flip(boxes, w, h))
        assert np.array_equal(out[:, [1, 3]], boxes[:, [1, 3]])  # y untouched
        assert (out[:, 0] <= out[:, 2]).all()  # still x1 <= x2
    for w, h in [(500, 375), (640, 480), (1, 1), (333, 1000)]:  # the whole-image box [0, 0, w-1, h-1]
        whole = np.array([[0.0, 0.0, w - 1.0, h - 1.0]], np.float32)
        assert np.array_equal(mirror_boxes(whole, w), whole)
        assert np.array_equal(seed_flip(whole, w, h), whole)


def test_flip_regions_mirrors_the_boxes_only() -> None:
    rng = np.random.default_rng(1)
    w, h = 500, 375
    xy = rng.uniform(0, 400, (7, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 99, (7, 2))], 1).astype(np.float32)
    scale = np.array([w, h, w, h], np.float32)
    visual = {
        "features": rng.standard_normal((7, 16)).astype(np.float32),
        "boxes": boxes,
        "boxes_norm": np.clip(boxes / scale, 0, 1).astype(np.float32),
        "cls_prob": rng.dirichlet(np.ones(5), 7).astype(np.float32),
        "image_w": w,
        "image_h": h,
        "num_boxes": 7,
    }
    out = flip_regions(visual)
    assert np.array_equal(out["boxes"], seed_flip(boxes, w, h))
    assert np.array_equal(out["boxes_norm"], np.clip(seed_flip(boxes, w, h) / scale, 0, 1).astype(np.float32))
    for key in ("features", "cls_prob", "image_w", "image_h", "num_boxes"):
        assert out[key] is visual[key]
    assert np.array_equal(visual["boxes"], boxes)  # the input is not modified
    no_pixels = flip_regions({k: v for k, v in visual.items() if k != "boxes"})  # only normalised boxes
    np.testing.assert_allclose(no_pixels["boxes_norm"], out["boxes_norm"], atol=1e-6)


def test_about_half_the_rows_flip_and_the_same_ones_again(monkeypatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    drawn = np.array([[flip_drawn(e, i, 0.5) for i in range(4000)] for e in range(2)])
    assert abs(drawn.mean() - 0.5) < 0.02
    assert 0.4 < (drawn[0] != drawn[1]).mean() < 0.6  # another epoch: other rows
    again = np.array([flip_drawn(0, i, 0.5) for i in range(4000)])
    assert np.array_equal(again, drawn[0])  # same (seed, epoch, index): same rows (an exact resume)
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    assert not np.array_equal(np.array([flip_drawn(0, i, 0.5) for i in range(4000)]), drawn[0])
    assert not any(flip_drawn(0, i, 0.0) for i in range(200))
    assert all(flip_drawn(0, i, 1.0) for i in range(200))


@pytest.fixture
def fixture_root(tmp_path):
    for split in ("train", "val", "test_2016_flickr"):
        write_fixture(tmp_path, split, n=40, regions=6)
    return tmp_path


def reader_regions(dm: Multi30kDataModule, split: str, i: int) -> dict:
    _, _, images = dm.records(split)
    reader, image_id = images[i]
    return select_regions(reader[image_id], dm.max_regions)


def reader_boxes(dm: Multi30kDataModule, split: str, i: int) -> np.ndarray:
    return reader_regions(dm, split, i)["boxes"]


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_training_rows_flip_val_and_test_never(task: str, fixture_root) -> None:
    dm = Multi30kDataModule(root=str(fixture_root), task=task, pretrain_tasks=["A", "B"], flip_prob=0.5)
    train = dm.build_dataset("train")
    n_images = len(dm.records("train")[1])
    flipped = 0
    for epoch in (0, 1):
        for i in range(len(train)):
            ex = train[(epoch, i)]
            plain = reader_boxes(dm, "train", i % n_images)
            if flip_drawn(epoch, i, 0.5):
                flipped += 1
                assert np.array_equal(ex["visual"]["boxes"], seed_flip(plain, 500, 375))
            else:
                assert np.array_equal(ex["visual"]["boxes"], plain)
            assert np.array_equal(train[(epoch, i)]["visual"]["boxes"], ex["visual"]["boxes"])  # same draw again
    assert 0 < flipped < 2 * len(train)
    always = Multi30kDataModule(root=str(fixture_root), task=task, pretrain_tasks=["A"], flip_prob=1.0)
    for split in ("val", "test"):
        if task == "retrieval":  # the ranked gallery's images
            visuals = always.gallery(split)["visuals"]
            for i in range(len(visuals)):
                assert np.array_equal(visuals[i]["boxes"], reader_boxes(always, split, i))
        else:
            ds = always.build_dataset(split)
            for i in range(len(ds)):
                assert np.array_equal(ds[(0, i)]["visual"]["boxes"], reader_boxes(always, split, i))
    train = always.build_dataset("train")
    for i in range(5):  # flip_prob 1: every training row mirrored
        assert np.array_equal(train[(0, i)]["visual"]["boxes"], seed_flip(reader_boxes(always, "train", i), 500, 375))


def test_flip_prob_is_a_probability(fixture_root) -> None:
    with pytest.raises(ConfigError, match="flip_prob"):
        Multi30kDataModule(root=str(fixture_root), flip_prob=1.5)


def test_flip_prob_0_gives_the_unflipped_batches(data_dir) -> None:
    """flip_prob 0: every training row has the reader's boxes, and the batches equal those of flip_prob 0.5 but for
    the flipped rows' x coordinates (MLM / MVRC draws untouched: the flip has its own random stream)."""
    kwargs = {"cache_dir": str(data_dir), "corpus": {"num_images": 150}, "objectives": ["mlm", "mvrc"]}
    dm0 = Multi30kDataModule(flip_prob=0.0, **kwargs)
    dm5 = Multi30kDataModule(flip_prob=0.5, **kwargs)
    for dm in (dm0, dm5):
        dm.prepare_data()
        dm.setup("fit")
    keys = [(1, i) for i in range(16)]
    ex0 = [dm0.datasets["train"][k] for k in keys]
    ex5 = [dm5.datasets["train"][k] for k in keys]
    for (_, i), a in zip(keys, ex0):
        plain = reader_regions(dm0, "train", i)
        for key in ("boxes", "boxes_norm", "features"):
            assert np.array_equal(a["visual"][key], plain[key])
    b0, b5 = dm0.collator("train")(ex0), dm5.collator("train")(ex5)
    assert b0.keys() == b5.keys()
    flipped = torch.tensor([flip_drawn(e, i, 0.5) for e, i in keys])
    assert 0 < int(flipped.sum()) < len(keys)
    for key, value in b0.items():
        if key == "visual_boxes":
            assert torch.equal(value[~flipped], b5[key][~flipped])
            assert torch.equal(value[flipped][..., [1, 3]], b5[key][flipped][..., [1, 3]])
            assert not torch.equal(value[flipped], b5[key][flipped])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b5[key]), key  # the whole-image size (visual_image_size) included
        else:
            assert value == b5[key], key
