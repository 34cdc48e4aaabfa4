"""data=retrieval: the Flickr30k-style JSONL and hard_negative.pkl readers and their errors, the cosine hard-negative
pool, the embedded-corpus writer, and the 4-way multiple-choice train / ranking-gallery val-test data module."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from vl.data.collate import Collator
from vl.data.formats.jsonl import load_jsonl, write_jsonl
from vl.data.formats.retrieval import (
    build_hard_negative_pool,
    image_key,
    load_hard_negatives,
    load_retrieval_jsonl,
    retrieval_paths,
)
from vl.data.retrieval import RetrievalDataModule
from vl.data.scenes import SceneSettings, clip_embedding, generate_scenes
from vl.data.scenes.corpus import ensure_corpus
from vl.data.scenes.writers.retrieval import write_retrieval_corpus
from vl.errors import DataError

SETTINGS = SceneSettings(num_images=60)


def write_pool(path: Path, images: list, pool) -> Path:
    with path.open("wb") as f:
        pickle.dump({"train_image_list": images, "train_hard_pool": pool}, f)
    return path


# ----------------------------------------------------------------------------------------------- file formats


def test_jsonl_and_pool_fixture_round_trip(tmp_path: Path) -> None:
    lines = [
        {"img_path": "1000092795.jpg", "sentences": ["Two young guys.", "Two men outside.", "A man in green."]},
        {"img_path": "10002456.jpg", "sentences": ["Several men in hard hats."]},
        {"img_path": "flickr30k_images/1000268201.jpg", "sentences": ["A child in pink."]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines[:2]) + "\n" + json.dumps(lines[2]) + "\n")
    records = load_retrieval_jsonl(path)
    assert records == lines
    assert [image_key(r["img_path"]) for r in records] == ["1000092795", "10002456", "1000268201"]

    pool = np.array([[1, 2], [0, 2], [1, 0]], dtype=np.int32)
    images, loaded = load_hard_negatives(
        write_pool(tmp_path / "hard_negative.pkl", [1000092795, "10002456", b"1000268201.jpg"], pool)
    )
    assert images == ["1000092795", "10002456", "1000268201"]
    assert loaded.dtype == np.int64 and loaded.tolist() == pool.tolist()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"img_path": "1.jpg", "sentences": ["a"]', "invalid JSON"),
        ('["1.jpg"]', "expected a JSON object"),
        ('{"sentences": ["a"]}', "missing field 'img_path'"),
        ('{"img_path": 7, "sentences": ["a"]}', "field 'img_path'"),
        ('{"img_path": "2.jpg"}', "missing field 'sentences'"),
        ('{"img_path": "2.jpg", "sentences": []}', "field 'sentences'"),
        ('{"img_path": "2.jpg", "sentences": "a dog"}', "field 'sentences'"),
        ('{"img_path": "2.jpg", "sentences": ["a dog", 3]}', "field 'sentences'"),
        ('{"img_path": "2.jpg", "sentences": ["a dog", " "]}', "field 'sentences'"),
        ('{"img_path": "x/1.jpg", "sentences": ["a"]}', "repeats the image of line 1"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "val.jsonl"
    path.write_text('{"img_path": "1.jpg", "sentences": ["a cat."]}\n' + line + "\n")
    with pytest.raises(DataError, match=f"val.jsonl:2: .*{message}"):
        load_retrieval_jsonl(path)


def test_jsonl_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_retrieval_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no images"):
        load_retrieval_jsonl(tmp_path / "empty.jsonl")


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "expected a dict"),
        ({"train_hard_pool": np.zeros((1, 1), int)}, "missing field 'train_image_list'"),
        ({"train_image_list": ["1", "2"]}, "missing field 'train_hard_pool'"),
        ({"train_image_list": ["1", "2"], "train_hard_pool": np.zeros((3, 1), int)}, r"shape \(3, 1\)"),
        ({"train_image_list": ["1", "2"], "train_hard_pool": np.zeros(2, int)}, "'train_hard_pool' has shape"),
        ({"train_image_list": ["1", "2"], "train_hard_pool": np.array([[1], [2]])}, "index 2 outside"),
        ({"train_image_list": ["1", "2"], "train_hard_pool": np.array([[1], [-1]])}, "index -1 outside"),
        ({"train_image_list": ["1", "2"], "train_hard_pool": np.array([[0.5], [0]])}, "integer indices"),
        ({"train_image_list": ["1", "1.jpg"], "train_hard_pool": np.zeros((2, 1), int)}, "more than once"),
        ({"train_image_list": [], "train_hard_pool": np.zeros((0, 1), int)}, "non-empty list"),
    ],
)
def test_hard_negative_errors(tmp_path: Path, obj, message: str) -> None:
    path = tmp_path / "hard_negative.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(DataError, match=f"hard_negative.pkl: .*{message}"):
        load_hard_negatives(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot unpickle"):
        load_hard_negatives(path)


def test_pool_is_cosine_top_k_without_self() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)) * rng.uniform(0.1, 10, size=(50, 1))  # cosine ignores the scale
    emb[7] = emb[3] * 4.0  # a duplicate direction: 3 and 7 are each other's nearest, never themselves
    pool = build_hard_negative_pool([str(i) for i in range(50)], emb, 6)
    assert pool.shape == (50, 6) and pool.dtype == np.int64
    sims = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in emb] for a in emb])
    for i in range(50):
        assert i not in pool[i]
        others = [j for j in range(50) if j != i]
        want = sorted(others, key=lambda j: -sims[i, j])[:6]
        assert pool[i].tolist() == want
    assert pool[3, 0] == 7 and pool[7, 0] == 3
    assert build_hard_negative_pool(["a"], emb[:1], 0).shape == (1, 0)
    with pytest.raises(ValueError, match="k=50"):
        build_hard_negative_pool([str(i) for i in range(50)], emb, 50)
    with pytest.raises(ValueError, match="expected"):
        build_hard_negative_pool(["a"], emb, 1)


# ------------------------------------------------------------------------------------------- embedded corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-image scene corpus (the embedded corpus writes the retrieval files too); the data module finds it."""
    cache = tmp_path_factory.mktemp("cache")
    root = ensure_corpus(cache, SETTINGS, ["retrieval"])
    dm = RetrievalDataModule(cache_dir=str(cache), corpus={"num_images": 60}, batch_size=4)
    assert dm.root == root
    dm.prepare_data()  # check_files: everything is there now
    return root


def test_write_retrieval_corpus(corpus: Path, tmp_path: Path) -> None:
    scenes = generate_scenes(SETTINGS)
    before = {p: p.read_bytes() for p in retrieval_paths(corpus).values()}
    written = write_retrieval_corpus(corpus, scenes, SETTINGS)
    assert written == [corpus / "retrieval" / f"{s}.jsonl" for s in ("train", "val", "test")] + [
        corpus / "retrieval" / "hard_negative.pkl"
    ]
    assert {p: p.read_bytes() for p in written} == before  # deterministic; what the corpus writer wrote
    assert not (corpus / "retrieval" / "regions.lmdb").exists()
    for split in ("train", "val", "test"):
        want = [
            {"img_path": f"{sc.image_id}.jpg", "sentences": list(sc.captions)} for sc in scenes if sc.split == split
        ]
        assert load_jsonl(corpus / "retrieval" / f"{split}.jsonl") == want and want
    train = [sc for sc in scenes if sc.split == "train"]
    images, pool = load_hard_negatives(corpus / "retrieval" / "hard_negative.pkl")
    assert images == [str(sc.image_id) for sc in train]
    assert pool.shape == (len(train), min(20, len(train) - 1))
    emb = np.stack([clip_embedding(sc, SETTINGS) for sc in train])
    np.testing.assert_array_equal(pool, build_hard_negative_pool(images, emb, pool.shape[1]))
    assert not any(i in row for i, row in enumerate(pool))


def visual_id(choice: dict) -> str:
    return str(choice["visual"]["image_id"])


def test_train_contract_and_determinism(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    dm = RetrievalDataModule(root=str(corpus), batch_size=4)
    dm.setup("fit")
    data = dm.datasets["train"]
    records = load_jsonl(corpus / "retrieval" / "train.jsonl")
    captions = {image_key(r["img_path"]): r["sentences"] for r in records}
    pairs = [(image_key(r["img_path"]), c) for r in records for c in r["sentences"]]
    assert len(data) == len(pairs)
    images, pool = load_hard_negatives(corpus / "retrieval" / "hard_negative.pkl")
    pool_of = {images[i]: {images[j] for j in row} for i, row in enumerate(pool)}

    for index in range(0, len(data), 7):
        ex = data[(0, index)]
        assert set(ex) == {"choices", "mc_labels", "index", "epoch"}
        assert ex["mc_labels"] == [0] and ex["index"] == index and ex["epoch"] == 0
        image, caption = pairs[index]
        c = ex["choices"]
        assert len(c) == 4 and all(set(x) == {"text", "visual"} for x in c)
        assert c[0]["text"] == caption and visual_id(c[0]) == image
        np.testing.assert_array_equal(c[0]["visual"]["features"], dm.regions[image]["features"])
        assert visual_id(c[1]) == image and c[1]["text"] not in captions[image]
        assert c[2]["text"] == caption and visual_id(c[2]) != image
        assert visual_id(c[3]) == image and c[3]["text"] not in captions[image]
        assert any(c[3]["text"] in captions[h] for h in pool_of[image])  # the caption of a pool image

    def texts(key) -> list:
        ex = data[key]
        return [x["text"] for x in ex["choices"]] + [visual_id(x) for x in ex["choices"]]

    assert texts((3, 11)) == texts((3, 11)) and data[11]["epoch"] == 0 and texts(11) == texts((0, 11))
    assert any(texts((0, i)) != texts((1, i)) for i in range(10))
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    reseeded = [texts((0, i)) for i in range(10)]
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    assert reseeded != [texts((0, i)) for i in range(10)]

    assert dm.info == {"visual_dim": 2048, "num_choices": 4, "mc_blocks": ["retrieval"]}


@pytest.mark.skipif(not hasattr(Collator, "collate_choices"), reason="the collator has no multiple-choice support")
def test_train_batch_flattens_choices(corpus: Path) -> None:
    dm = RetrievalDataModule(root=str(corpus), batch_size=2)
    batch = next(iter(dm.loader("train")))
    assert batch["mc_labels"].tolist() == [[0], [0]]
    assert batch["input_ids"].shape[0] == 8 and batch["visual_feats"].shape[0] == 8
    queries = next(iter(dm.loader("val")))  # text-only: the scorer pairs them with the gallery
    assert queries["query_index"].tolist() == [0, 1] and queries["gold"].tolist() == [0, 0]
    assert "visual_feats" not in queries


def test_random_hard_negatives_without_pool(corpus: Path) -> None:
    dm = RetrievalDataModule(root=str(corpus), hard_negatives=None, batch_size=4)
    assert not any("hard_negative" in str(p) for p in dm.required_files())
    dm.setup("fit")
    records = load_jsonl(corpus / "retrieval" / "train.jsonl")
    first = image_key(records[0]["img_path"])
    ex = dm.datasets["train"][(0, 0)]
    assert visual_id(ex["choices"][3]) == first and ex["choices"][3]["text"] not in records[0]["sentences"]


def test_val_test_gallery(corpus: Path, tmp_path: Path) -> None:
    dm = RetrievalDataModule(root=str(corpus), batch_size=4, captions_per_image=2, max_images=4)
    dm.setup("test")
    records = load_jsonl(corpus / "retrieval" / "test.jsonl")[:4]
    g = dm.gallery("test")
    assert g["image_ids"] == [image_key(r["img_path"]) for r in records]
    assert g["texts"] == [c for r in records for c in r["sentences"][:2]]
    assert g["gold"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(g["visuals"]) == 4 and g["visuals"][2]["image_id"] == g["image_ids"][2]
    assert [v["image_id"] for v in g["visuals"][1:3]] == g["image_ids"][1:3]
    data = dm.datasets["test"]
    assert len(data) == 8
    assert data[(2, 3)] == {"text": g["texts"][3], "gold": 1, "query_index": 3, "index": 3, "epoch": 2}
    assert dm.baselines("test") == {
        "test/recall@1_chance": 0.25,
        "test/recall@5_chance": 1.0,
        "test/recall@10_chance": 1.0,
    }

    full = RetrievalDataModule(root=str(corpus), batch_size=4)  # all images, every caption (3 < 5 per scene)
    full.setup("validate")
    val = load_jsonl(corpus / "retrieval" / "val.jsonl")
    assert len(full.datasets["val"]) == sum(len(r["sentences"]) for r in val)
    assert full.baselines("val")["val/recall@1_chance"] == pytest.approx(1 / len(val))

    out = dm.write_predictions(
        [{"query_index": 3, "rank": 2, "top": [0, 1], "score": 0.5}, {"query_index": 0, "rank": 1, "top": [0]}],
        tmp_path / "preds.json",
    )
    rows = json.loads(out.read_text())
    assert rows == [
        {
            "query_index": 0,
            "text": g["texts"][0],
            "gold_image": g["image_ids"][0],
            "rank": 1,
            "top_images": g["image_ids"][:1],
        },
        {
            "query_index": 3,
            "text": g["texts"][3],
            "gold_image": g["image_ids"][1],
            "rank": 2,
            "top_images": g["image_ids"][:2],
        },
    ]


def test_data_module_errors(corpus: Path, tmp_path: Path) -> None:
    regions = str(corpus / "regions.lmdb")
    (tmp_path / "retrieval").mkdir()
    for split in ("train", "val", "test"):
        write_jsonl(tmp_path / "retrieval" / f"{split}.jsonl", load_jsonl(corpus / "retrieval" / f"{split}.jsonl"))
    with pytest.raises(DataError, match="hard_negative.pkl: file not found"):
        RetrievalDataModule(root=str(tmp_path), features=regions).prepare_data()

    train = load_jsonl(tmp_path / "retrieval" / "train.jsonl")
    ids = [image_key(r["img_path"]) for r in train]
    pkl = tmp_path / "retrieval" / "hard_negative.pkl"
    write_pool(pkl, ids[:-1] + ["424242"], np.zeros((len(ids), 1), int))
    with pytest.raises(DataError, match="hard_negative.pkl: field 'train_image_list' has image '424242'"):
        RetrievalDataModule(root=str(tmp_path), features=regions).setup("fit")
    write_pool(pkl, ids[:-1], np.zeros((len(ids) - 1, 1), int))
    with pytest.raises(DataError, match=f"field 'train_image_list' lacks image '{ids[-1]}'"):
        RetrievalDataModule(root=str(tmp_path), features=regions).setup("fit")

    # a pool listed in another order is re-indexed to the JSONL's order
    order = list(range(len(ids)))[::-1]
    nearest = [[(i + 1) % len(ids)] for i in range(len(ids))]  # JSONL positions: image i -> image i + 1
    write_pool(pkl, [ids[i] for i in order], np.array([[order.index(nearest[i][0])] for i in order]))
    dm = RetrievalDataModule(root=str(tmp_path), features=regions)
    dm.setup("fit")
    assert dm.datasets["train"].hard_pool.tolist() == nearest

    write_jsonl(tmp_path / "retrieval" / "val.jsonl", [{"img_path": "31337.jpg", "sentences": ["a cat."]}])
    with pytest.raises(DataError, match=r"regions.lmdb: no region features for image '31337' \(field 'img_path'"):
        RetrievalDataModule(root=str(tmp_path), features=regions).setup("validate")
