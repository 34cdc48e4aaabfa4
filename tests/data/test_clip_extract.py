"""CLIP feature extraction CLI: image dir / JSONL -> HDF5 in the `write_clip_hdf5` layout, aspect-keeping resize +
centre crop, equality with a direct `get_image_features`, resumability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vl.data.features.clip_hdf5 import ClipFeatureReader
from vl.errors import DataError
from vl.tools.clip_extract import (
    CLIP_MEAN,
    CLIP_STD,
    extract_clip_features,
    list_images,
    main,
    preprocess,
    read_image_jsonl,
    save_tiny_clip,
)

SIZES = [(300, 200), (200, 300), (224, 224), (640, 240), (250, 260)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / ("sub" if i == 4 else "") / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _direct(clip_dir: Path, paths: list[Path]) -> np.ndarray:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    with torch.no_grad():
        pixels = torch.from_numpy(np.stack([preprocess(p, mean, std) for p in paths]))
        out = model.get_image_features(pixel_values=pixels)
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()


def test_preprocess_keeps_aspect_then_centre_crops(tmp_path):
    # a wide image: left/right thirds red, centre blue -> after short-side resize + centre crop only blue remains
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100, 0] = 255
    arr[:, 100:200, 2] = 255
    arr[:, 200:, 0] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    x = preprocess(tmp_path / "wide.png", mean, std)
    assert x.shape == (3, 224, 224)
    centre = x[:, :, 20:204] * std[:, None, None] + mean[:, None, None]
    assert np.allclose(centre[2], 1.0, atol=0.02) and np.allclose(centre[0], 0.0, atol=0.02)


def test_resize_truncates_the_long_side_as_the_seed() -> None:
    """The seed's patched `CLIPFeatureExtractor.resize`, transcribed: scale = max / min, long side int(scale x size),
    (long, size) when the image is wider than tall, else (size, long)."""
    from vl.tools.clip_extract import resized_size

    def seed(w: int, h: int, size: int) -> tuple[int, int]:
        scale_factor = max(w, h) / min(w, h)
        return (int(scale_factor * size), size) if w > h else (size, int(scale_factor * size))

    rng = np.random.default_rng(0)
    sizes = [(640, 480), (640, 427), (480, 640), (500, 500), (224, 224), (225, 1000)]
    sizes += [tuple(int(v) for v in rng.integers(50, 1200, 2)) for _ in range(500)]
    for w, h in sizes:
        assert resized_size(w, h, 224) == seed(w, h, 224), (w, h)
    assert resized_size(640, 480) == (298, 224)  # round() gave 299


def test_image_dir_to_hdf5_equals_direct_features(image_dir, clip_dir, tmp_path, capsys):
    out = tmp_path / "clip_features.hdf5"
    rc = main(
        ["--images", str(image_dir), "--model", str(clip_dir), "--out", str(out), "--batch-size", "2", "--no-progress"]
    )
    assert rc == 0 and "5 features" in capsys.readouterr().out
    reader = ClipFeatureReader(out)
    images = list_images(image_dir)
    assert reader.ids() == ["img0", "img1", "img2", "img3", "sub/img4"] == [i for i, _ in images]
    assert reader.dim == 512
    expected = _direct(clip_dir, [p for _, p in images])
    got = np.stack([reader[i] for i in reader.ids()])
    assert np.allclose(got, expected, atol=1e-5)
    import h5py

    with h5py.File(out) as f:
        assert f["features"].dtype == np.float32 and f["ids"].dtype.kind == "S"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_jsonl_input_and_resume(image_dir, clip_dir, tmp_path):
    lines = [{"image_id": f"coco_{i}", "path": f"images/img{i}.png"} for i in range(3)]
    lines.append({"image_id": "coco_0", "path": "images/img0.png"})  # repeated id: once
    jsonl = tmp_path / "images.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines))
    images = read_image_jsonl(jsonl)
    assert [i for i, _ in images] == ["coco_0", "coco_1", "coco_2"]
    out = tmp_path / "feats.hdf5"
    first = extract_clip_features(images[:2], clip_dir, out, batch_size=1, progress=False, save_every=1)
    assert first == {"existing": 0, "extracted": 2, "total": 2}
    before = ClipFeatureReader(out)["coco_1"].copy()
    again = extract_clip_features(images, clip_dir, out, batch_size=2, progress=False)
    assert again == {"existing": 2, "extracted": 1, "total": 3}
    reader = ClipFeatureReader(out)
    assert reader.ids() == ["coco_0", "coco_1", "coco_2"]
    assert np.array_equal(reader["coco_1"], before)
    assert np.allclose(reader["coco_2"], _direct(clip_dir, [image_dir / "img2.png"])[0], atol=1e-5)
    assert extract_clip_features(images, clip_dir, out, progress=False)["extracted"] == 0


def test_errors(tmp_path, clip_dir):
    with pytest.raises(DataError, match="no image files"):
        list_images(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(DataError, match="image_id"):
        read_image_jsonl(bad)
    bad.write_text('{"image_id": "x", "path": "missing.png"}\n')
    with pytest.raises(DataError, match="not found"):
        extract_clip_features(read_image_jsonl(bad), clip_dir, tmp_path / "o.hdf5", progress=False)
    assert main(["--jsonl", str(bad), "--model", str(clip_dir), "--out", str(tmp_path / "o.hdf5")]) == 2


def test_centre_crop_starts_where_the_seeds_feature_extractor_starts(tmp_path) -> None:
    """transformers 4.11.3's `CLIPFeatureExtractor.center_crop` (the seed's pin), transcribed: `crop_left =
    int((image_width - crop_width + 1) * 0.5)`; an odd margin (a 640 x 427 COCO image resized to 335 x 224) starts the
    crop at 56, not 55. The crop of a column-coded image shows where it started."""
    from vl.tools.clip_extract import crop_origin, resized_size

    def seed(length: int, size: int) -> int:
        return int((length - size + 1) * 0.5)

    for length in (224, 225, 298, 299, 335, 336, 401):
        assert crop_origin(length, 224) == seed(length, 224)
    new_w, new_h = resized_size(640, 427)
    assert (new_w, new_h) == (335, 224) and crop_origin(new_w, 224) == 56
    arr = np.zeros((10, 32, 3), np.uint8)  # column j has red value 8 * j: the crop's first column tells its origin
    arr[:, :, 0] = (np.arange(32) * 8)[None, :]
    Image.fromarray(arr).save(tmp_path / "cols.png")
    new_w, new_h = resized_size(32, 10, 9)  # (28, 9): an odd margin of 19
    assert (new_w, new_h) == (28, 9)
    resized = np.asarray(Image.fromarray(arr).resize((new_w, new_h), Image.BICUBIC), np.float32) / 255.0
    x = preprocess(tmp_path / "cols.png", np.zeros(3, np.float32), np.ones(3, np.float32), size=9)
    left = seed(new_w, 9)  # 10 (the floor division gave 9)
    assert np.allclose(x[0], resized[:, left : left + 9, 0])
