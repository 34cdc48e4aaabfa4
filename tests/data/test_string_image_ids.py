"""Image ids that are strings where a real format allows them (a Conceptual-Captions-style TSV's `img055`, `007`):
read, batched and ranked as the file writes them, never through `int(image_id)`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import compose_cfg
from vl.build import build_datamodule
from vl.data.features.region_lmdb import write_region_lmdb
from vl.eval.retrieval import _caption_queries

IDS = ["img055", "007", "7", "12", "2", "photo-b"]  # "007" and "7" are different images


def _corpus(root: Path) -> None:
    rng = np.random.default_rng(0)
    records = []
    for k, sid in enumerate(IDS):
        feats = rng.normal(size=(2, 6)).astype(np.float32)
        feats[:, 0] = k  # which image it is, readable back from the batch
        boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], dtype=np.float32)
        records.append({"image_id": sid, "image_h": 32, "image_w": 32, "boxes": boxes, "features": feats})
    write_region_lmdb(root / "regions.lmdb", records)
    (root / "cc").mkdir(parents=True)
    for split in ("train", "val", "test"):
        lines = [f"a picture number {k} of {split}\t{sid}" for k, sid in enumerate(IDS)]
        (root / "cc" / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def test_captions_tsv_with_string_image_ids_batches_and_ranks(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "cc_corpus"
    root.mkdir()
    _corpus(root)
    cfg = compose_cfg(
        ["experiment=none", "data=captions", f"data.root={root}", "data.captions='cc/{split}.tsv'"],
        output_dir=tmp_path / "run",
        data_dir=data_dir,
    )
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.loader("val")))  # eval split: no shuffle, file order
    assert batch["image_id"] == IDS
    # each row's regions are its own image's ("007" is not "7")
    assert batch["visual_feats"][:, 0, 0].tolist() == [float(k) for k in range(len(IDS))]
    texts, gold, visuals = _caption_queries(dm, "test", {"captions_per_image": 1})
    order = ["2", "007", "7", "12", "img055", "photo-b"]  # numbers by value, then the other ids
    assert [IDS[int(v["features"][0, 0])] for v in visuals] == order
    assert [order[g] for g in gold] == IDS and texts[0] == "a picture number 0 of test"
