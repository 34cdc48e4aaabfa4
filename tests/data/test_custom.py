"""`data=custom`: a JSONL + a feature file, no code; derived vocabulary / splits written next to the data; every
problem named by file and line."""

from __future__ import annotations

import json
import logging
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import compose_cfg
from vl.build import build_datamodule
from vl.data.features import write_clip_hdf5
from vl.data.features.base import encode_array
from vl.data.features.region_lmdb import write_region_lmdb
from vl.errors import ConfigError, DataError
from vl.pipeline import train

COLOURS = ("red", "green", "blue")


def _features(root: Path, dims: dict[str, int] | None = None) -> None:
    """Ten images `img000`..`img009` with 2 regions; feature dimension 8 (or `dims[id]`)."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(10):
        sid = f"img{i:03d}"
        d = (dims or {}).get(sid, 8)
        feats = rng.normal(size=(2, d)).astype(np.float32)
        feats[:, 0] = i % 3  # the colour is in the features
        boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], dtype=np.float32)
        records.append({"image_id": sid, "image_h": 32, "image_w": 32, "boxes": boxes, "features": feats})
    odd = [r for r in records if r["features"].shape[1] != 8]
    write_region_lmdb(root / "regions.lmdb", [r for r in records if r not in odd])
    if odd:  # by hand: the writer refuses mixed widths
        import lmdb

        env = lmdb.open(str(root / "regions.lmdb"), map_size=1 << 24)
        with env.begin(write=True) as txn:
            keys = pickle.loads(txn.get(b"keys"))
            for r in odd:
                value = {
                    **r,
                    "num_boxes": 2,
                    "boxes": encode_array(r["boxes"]),
                    "features": encode_array(r["features"]),
                }
                txn.put(r["image_id"].encode(), pickle.dumps(value))
            txn.put(b"keys", pickle.dumps(keys + [r["image_id"].encode() for r in odd]))
        env.close()


def _lines(n: int = 30, split: bool = True) -> list[dict]:
    out = []
    for k in range(n):
        i = k % 10
        row = {"image_id": f"img{i:03d}", "text": "what colour is it?", "answers": [COLOURS[i % 3]] * 2 + ["grey"]}
        if split:
            row["split"] = "train" if k < 20 else "val" if k < 25 else "test"
        out.append(row)
    out[0]["answers"] = ["purple"]  # on one train line only
    return out


def _write(root: Path, rows: list) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "data.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(root: Path, tmp_path: Path, data_dir: Path, *extra: str):
    return compose_cfg(
        ["experiment=none", "data=custom", f"data.root={root}", "trainer.max_epochs=1", *extra],
        output_dir=tmp_path / "run",
        data_dir=data_dir,
    )


def test_custom_vqa_trains_and_writes_derived_files(tmp_path: Path, data_dir: Path, caplog) -> None:
    root = tmp_path / "mydata"
    rows = _lines()
    _write(root, rows)
    _features(root)
    with caplog.at_level(logging.INFO, logger="vl.data.custom"):
        metrics, _ = train(_cfg(root, tmp_path, data_dir, "data.min_answer_count=2"))
    # line 1's only answer ("purple") is on one train line: outside the vocabulary, its target is all zeros, and said
    assert "1 of 20 train lines have no answer in the answer vocabulary" in caplog.text
    assert 0.0 <= metrics["test/vqa_acc"] <= 1.0
    # vocabulary: answers on >= 2 train lines, counted here from the lines themselves
    counts = Counter(a for r in rows if r["split"] == "train" for a in set(r["answers"]))
    assert json.loads((root / "data.vl" / "answers.json").read_text()) == sorted(a for a, c in counts.items() if c >= 2)
    splits = json.loads((root / "data.vl" / "splits.json").read_text())
    assert splits["test"] == [26, 27, 28, 29, 30]  # file line numbers
    assert json.loads((root / "data.vl" / "info.json").read_text())["visual_dim"] == 8


def test_a_seeded_split_when_the_file_has_none(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    _write(root, _lines(split=False))
    _features(root)
    dm = build_datamodule(_cfg(root, tmp_path, data_dir))
    lines = dm.lines()
    numbers = sorted(r["line"] for s in lines.values() for r in s)
    assert numbers == list(range(1, 31)) and [len(lines[s]) for s in ("train", "val", "test")] == [24, 3, 3]
    again = build_datamodule(_cfg(root, tmp_path, data_dir)).lines()
    assert [r["line"] for r in again["test"]] == [r["line"] for r in lines["test"]]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"image_id": "img999", "text": "q", "answers": ["a"]}, "data.jsonl:3: image id 'img999' has no features in"),
        ({"image_id": "img001", "text": " ", "answers": ["a"]}, "data.jsonl:3: empty or missing 'text'"),
        ({"image_id": "img001", "text": "q", "anwsers": ["a"]}, "data.jsonl:3: unknown field 'anwsers' .*'answers'"),
        ({"image_id": "img001", "text": "q"}, r"data.jsonl:3: no 'answers' \(data.objectives has 'vqa'\)"),
        ('{"image_id": "img001", "text": ', "data.jsonl:3: not JSON"),
        ({"image_id": "img001", "text": "q", "answers": ["a"], "split": "dev"}, "data.jsonl:3: split 'dev'"),
    ],
)
def test_every_problem_names_file_and_line(bad, message: str, tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    rows = _lines(split=False)
    rows[2] = bad
    _write(root, rows)
    _features(root)
    with pytest.raises(DataError, match=message):
        build_datamodule(_cfg(root, tmp_path, data_dir))


def test_mixed_feature_dimensions_name_the_lines(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    _write(root, _lines(split=False))
    _features(root, dims={"img004": 6})
    message = r"regions\.lmdb: image id 'img004' field 'features' has 6 columns, the file's first record \(image id 'img000'\) has 8"
    with pytest.raises(DataError, match=r"data\.jsonl:5: .*" + message):  # the reader's check, named with the line
        build_datamodule(_cfg(root, tmp_path, data_dir))


def test_custom_captions_pretraining_with_the_files_labels(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    rows = [
        {"image_id": f"img{k % 10:03d}", "text": f"a {COLOURS[(k + k % 2) % 3]} shape", "label": 1 - k % 2}
        for k in range(30)
    ]
    _write(root, rows)
    _features(root)
    cfg = _cfg(root, tmp_path, data_dir, "data.objectives=[mlm,itm]", "data.monitor=val/itm_acc")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    train_lines = dm.lines()["train"]
    assert [dm.datasets["train"][i]["itm_label"] for i in range(len(train_lines))] == [r["label"] for r in train_lines]
    metrics, _ = train(cfg)
    assert {"test/itm_acc", "test/mlm_acc"} <= set(metrics)
    rows[4]["label"] = 2
    _write(root, rows)
    with pytest.raises(DataError, match="data.jsonl:5: 'label' 2 is not 0 or 1"):
        build_datamodule(cfg)


# ---------------------------------------------------------------------------------------------- more visual inputs
def _clip(root: Path, ids=None) -> Path:
    """A CLIP HDF5 (`features` (N, 16), `ids`) in the format `data=vlp` reads; the colour is in feature 0."""
    ids = ids or [f"img{i:03d}" for i in range(10)]
    feats = np.random.default_rng(1).normal(size=(len(ids), 16)).astype(np.float32)
    feats[:, 0] = [int(s[-3:]) % 3 * 2 for s in ids]
    write_clip_hdf5(root / "clip.hdf5", ids, feats)
    return root / "clip.hdf5"


def _images(root: Path, ids=None) -> Path:
    """An image directory: `img000.png`..`img009.png`, 64 x 96, filled with the line's colour."""
    from PIL import Image

    out = root / "images"
    out.mkdir(parents=True, exist_ok=True)
    rgb = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    for i in range(10) if ids is None else ids:
        Image.new("RGB", (96, 64), rgb[COLOURS[i % 3]]).save(out / f"img{i:03d}.png")
    return out


def test_custom_clip_hdf5_reaches_clip_bert_and_region_models(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    rows = _lines()
    _write(root, rows)
    path = _clip(root)
    cfg = _cfg(root, tmp_path, data_dir, "data.features=clip.hdf5", "model=clip_bert_tiny")
    dm = build_datamodule(cfg)
    assert dm.info == {"visual_dim": 16, "clip_dim": 16, "num_region_classes": 0, "num_answers": len(dm._ans2label)}
    dm.setup("fit")
    batch = next(iter(dm.loader("val")))
    from vl.data.features import ClipFeatureReader

    reader = ClipFeatureReader(path)
    want = np.stack([reader[r["image_id"]] for r in dm.lines()["val"]])
    np.testing.assert_array_equal(batch["clip_feats"][:, 0].numpy(), want)  # CLIP-BERT's input
    np.testing.assert_array_equal(batch["visual_feats"][:, 0].numpy(), want)  # one whole-image region
    assert batch["visual_mask"].tolist() == [[1]] * len(want)
    metrics, _ = train(cfg)  # CLIP-BERT answering from the CLIP vector
    assert 0.0 <= metrics["test/vqa_acc"] <= 1.0
    from vl import load

    model = load(tmp_path / "run")  # an image by its id in the CLIP file, or the vector itself: the same answer
    assert model.answer("img004", "what colour is it?", k=2) == model.answer(
        reader["img004"], "what colour is it?", k=2
    )
    assert json.loads((root / "data.vl" / "info.json").read_text())["visual"] == "clip"


def test_custom_image_directory_trains_a_pixel_model(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    _write(root, _lines())
    _images(root)
    cfg = _cfg(
        root,
        tmp_path,
        data_dir,
        "data.features=images",
        "model=clip_vil_tiny",
        "+data.transform_options={min_size: 64, max_size: 96}",
    )
    dm = build_datamodule(cfg)
    assert dm.info["pixels"] is True and "visual_dim" not in dm.info
    dm.setup("fit")
    batch = next(iter(dm.loader("val")))
    assert tuple(batch["pixel_values"].shape) == (5, 3, 64, 96)
    # the CLIP-ViL transform of the file, independently: resize (here none: 64 x 96 already), CLIP mean / std
    from PIL import Image

    from vl.data.images import CLIP_MEAN, CLIP_STD

    first = dm.lines()["val"][0]
    arr = np.asarray(Image.open(root / "images" / f"{first['image_id']}.png").convert("RGB"), np.float32) / 255.0
    want = (arr - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(batch["pixel_values"][0].permute(1, 2, 0).numpy(), want, atol=1e-5)
    metrics, _ = train(cfg)
    assert 0.0 <= metrics["test/vqa_acc"] <= 1.0
    from vl import load

    model = load(tmp_path / "run")  # an image by its id in the directory, or by its file
    by_file = model.answer(str(root / "images" / "img004.png"), "what colour is it?", k=2)
    assert model.answer("img004", "what colour is it?", k=2) == by_file


@pytest.mark.parametrize(
    ("visual", "model"),
    [
        ("regions", "visual_bert_tiny"),
        ("clip", "visual_bert_tiny"),
        ("clip", "clip_bert_tiny"),
        ("images", "clip_vil_tiny"),
    ],
)
def test_custom_retrieval_ranks_the_split_gallery(visual: str, model: str, tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    rows = [
        {"image_id": f"img{k % 10:03d}", "text": f"a {COLOURS[k % 3]} shape number {k % 10}"}
        | {"split": "train" if k < 20 else "val" if k < 25 else "test"}
        for k in range(30)
    ]
    rows[21]["label"], rows[1]["label"] = 0, 1  # a label-0 line is not a pair: left out of the val gallery
    for r in rows:
        r.setdefault("label", 1)
    _write(root, rows)
    features, extra = "regions.lmdb", []
    if visual == "regions":
        _features(root)
    elif visual == "clip":
        _clip(root)
        features = "clip.hdf5"
    else:
        _images(root)
        features, extra = "images", ["+data.transform_options={min_size: 64, max_size: 96}"]
    cfg = _cfg(
        root,
        tmp_path,
        data_dir,
        f"data.features={features}",
        "data.objectives=[retrieval]",
        "data.monitor=val/recall@1",
        "data.batch_size=8",
        f"model={model}",
        *extra,
    )
    dm = build_datamodule(cfg)
    gallery = dm.gallery("val")
    val = [r for r in rows if r["split"] == "val" and r["label"] == 1]
    assert gallery["image_ids"] == list(dict.fromkeys(r["image_id"] for r in val))
    assert gallery["texts"] == [r["text"] for i in gallery["image_ids"] for r in val if r["image_id"] == i]
    assert [gallery["image_ids"][g] for g in gallery["gold"]] == [
        i for i in gallery["image_ids"] for r in val if r["image_id"] == i
    ]
    dm.setup("fit")
    example = dm.datasets["train"][0]
    assert len(example["choices"]) == 4 and example["mc_labels"] == [0]
    if visual == "clip":  # CLIP-BERT's image input, in the choice rows and in the ranking gallery
        from vl.data.features import ClipFeatureReader

        reader = ClipFeatureReader(root / "clip.hdf5")
        batch = dm.collator("train")([example])
        want = np.stack([c["visual"]["features"][0] for c in example["choices"]])
        np.testing.assert_array_equal(batch["clip_feats"][:, 0].numpy(), want)
        scored = dm.scoring_collator().visual_batch([gallery["visuals"][i] for i in range(2)])
        np.testing.assert_array_equal(scored["clip_feats"][:, 0].numpy(), [reader[i] for i in gallery["image_ids"][:2]])
    if visual == "images":  # pixel models: the choice rows' images and the gallery's, as the loader decodes them
        batch = dm.collator("train")([example])
        assert tuple(batch["pixel_values"].shape) == (4, 3, 64, 96) and batch["mc_labels"].tolist() == [[0]]
        for row, choice in zip(batch["pixel_values"], example["choices"]):
            assert torch.equal(row, choice["visual"]["pixels"])
        scored = dm.scoring_collator().visual_batch([gallery["visuals"][i] for i in range(2)])
        want = [dm.source.fields(i)["pixels"] for i in gallery["image_ids"][:2]]
        assert torch.equal(scored["pixel_values"], torch.stack(want))
    metrics, run = train(cfg)
    n = len(dm.gallery("test")["image_ids"])
    assert {"test/recall@1", "test/recall@5", "test/median_rank"} <= set(metrics)
    assert metrics["test/recall@1_chance"] == pytest.approx(1 / n)
    written = json.loads(next(Path(tmp_path / "run").rglob("retrieval_predictions.json")).read_text())
    assert len(written) == 5 and all(1 <= p["rank"] <= n for p in written)
    ids = dm.gallery("test")["image_ids"]
    for p in written:  # each query's best images, as the seed's result file: the gold at its rank, all distinct
        assert len(p["top_images"]) == min(20, n) and len(set(p["top_images"])) == len(p["top_images"])
        assert set(p["top_images"]) <= set(ids)
        if p["rank"] <= len(p["top_images"]):  # ties rank against the gold, the list puts them in image order
            assert p["gold_image"] in p["top_images"][: p["rank"]]


def test_itm_labels_on_some_lines_only_are_refused(tmp_path: Path, data_dir: Path) -> None:
    """ITM reads the file's own `label`s when every line of a split has one, else draws negatives: a file with labels
    on some lines would have its `label: 0` lines trained as matching pairs."""
    root = tmp_path / "mydata"
    rows = [{k: v for k, v in r.items() if k != "answers"} for r in _lines()]
    for r in rows[:5]:
        r["label"] = 0
    _write(root, rows)
    _features(root)
    dm = build_datamodule(_cfg(root, tmp_path, data_dir, "data.objectives=[mlm,itm]", "data.monitor=val/itm_acc"))
    with pytest.raises(DataError, match=r"data\.jsonl: split 'train' has 'label' on \d+ of \d+ lines"):
        dm.setup("fit")


def test_new_inputs_name_file_and_line(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    rows = _lines(split=False)
    rows[2] = {"image_id": "img999", "text": "q", "answers": ["a"]}
    _write(root, rows)
    _clip(root)
    with pytest.raises(DataError, match=r"data.jsonl:3: image id 'img999' has no features in .*clip.hdf5"):
        build_datamodule(_cfg(root, tmp_path, data_dir, "data.features=clip.hdf5"))
    _images(root)
    images = ["data.features=images", "model=clip_vil_tiny"]
    with pytest.raises(DataError, match=r"data.jsonl:3: image id 'img999' has no image file in .*images"):
        build_datamodule(_cfg(root, tmp_path, data_dir, *images))
    rows[2] = {"image_id": "img002", "text": "q", "answers": ["a"]}
    _write(root, rows)
    (root / "images" / "img005.png").write_bytes(b"not a png")  # line 6's image
    with pytest.raises(DataError, match=r"data.jsonl:6: image id 'img005': .*img005.png is not a readable image"):
        build_datamodule(_cfg(root, tmp_path, data_dir, *images))
    _images(root)
    for bad, message in [
        ({"image_id": "img001", "text": " ", "answers": ["a"]}, "data.jsonl:3: empty or missing 'text'"),
        ({"image_id": "img001", "text": "q", "answer": ["a"]}, "data.jsonl:3: unknown field 'answer' .*'answers'"),
    ]:
        rows[2] = bad
        _write(root, rows)
        for features in (images, ["data.features=clip.hdf5"]):
            with pytest.raises(DataError, match=message):
                build_datamodule(_cfg(root, tmp_path, data_dir, *features))
    rows[2] = {"image_id": "img001", "text": "q", "answers": ["a"]}
    _write(root, rows)
    with pytest.raises(ConfigError, match="retrieval over an image directory needs data.on_bad_image=error"):
        build_datamodule(
            _cfg(root, tmp_path, data_dir, *images, "data.objectives=[retrieval]", "data.on_bad_image=skip")
        )


def test_field_names_of_the_file_map_to_vls(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    rows = [{"img": r["image_id"], "question": r["text"], "answers": r["answers"]} for r in _lines(split=False)]
    _write(root, rows)
    _features(root)
    with pytest.raises(DataError, match=r"data.jsonl:1: unknown field 'img'.*\+data.fields="):
        build_datamodule(_cfg(root, tmp_path, data_dir))
    dm = build_datamodule(_cfg(root, tmp_path, data_dir, "+data.fields={question: text, img: image_id}"))
    assert sorted((r["image_id"], r["text"]) for s in dm.lines().values() for r in s) == sorted(
        (r["img"], r["question"]) for r in rows
    )
    with pytest.raises(ConfigError, match="data.fields: 'txt' is not one of vl's fields"):
        build_datamodule(_cfg(root, tmp_path, data_dir, "+data.fields={question: txt}"))


def test_a_non_finite_clip_vector_names_the_line_before_training(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "mydata"
    _write(root, _lines(split=False))
    ids = [f"img{i:03d}" for i in range(10)]
    feats = np.ones((10, 4), np.float32)
    feats[7, 2] = np.nan
    write_clip_hdf5(root / "clip.hdf5", ids, feats)
    with pytest.raises(DataError, match=r"data.jsonl:8: .*clip.hdf5: image id 'img007': 'features' has 1 non-finite"):
        build_datamodule(_cfg(root, tmp_path, data_dir, "data.features=clip.hdf5"))
