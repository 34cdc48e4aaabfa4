"""data=vlp and data=lxmert_text: readers, batches (clip_feats), text-only mode, bad input; the LXMERT-text
conversion rules; the VLP build script's id and split rules (hand-written fixtures + a real COCO file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import real_sample
from vl.data.features import ClipFeatureReader, write_clip_hdf5
from vl.data.formats.jsonl import load_jsonl, write_jsonl
from vl.data.formats.lxmert import convert_lxmert_json, lxmert_texts, qa_text
from vl.data.lxmert_text import LxmertTextDataModule
from vl.data.scenes.corpus import corpus_paths
from vl.data.vlp import VLPDataModule
from vl.errors import DataError
from vl.tools.build_vlp import build_vlp, coco_lines
from vl.tools.build_vlp import main as build_vlp_main

SMALL_CORPUS = {"num_images": 40}


def first_batch(dm, split: str = "train") -> dict[str, torch.Tensor]:
    dm.prepare_data()
    return next(iter(dm.loader(split)))


def test_vlp_batch_has_one_clip_token_per_caption(tmp_path: Path) -> None:
    dm = VLPDataModule(cache_dir=str(tmp_path), corpus=SMALL_CORPUS, objectives=["mlm"], batch_size=4)
    batch = first_batch(dm)
    assert batch["clip_feats"].shape == (4, 1, 512) and batch["clip_feats"].dtype == torch.float16
    assert batch["visual_feats"].shape == (4, 1, 512) and batch["visual_mask"].tolist() == [[1]] * 4
    assert batch["mlm_labels"].shape == batch["input_ids"].shape
    assert dm.info["clip_dim"] == 512
    # the feature is the image's row of the HDF5
    line = load_jsonl(dm.path("vlp/{split}.jsonl", "train"))[int(batch["index"][0])]
    np.testing.assert_allclose(batch["clip_feats"][0, 0].numpy(), dm.clip[line["image_id"]], rtol=1e-3)


def seed_clip_feature(hdf5: Path, image_id: str) -> torch.Tensor:
    """The seed's CLIP feature loader (spec clip_bert.md): the HDF5's `ids` read as strings map an id to its row of
    `features` (float32, (N, 512)), returned as fp16 (1, 512)."""
    import h5py

    with h5py.File(hdf5, "r") as f:
        row = {name: i for i, name in enumerate(f["ids"].asstr()[()])}[image_id]
        return torch.from_numpy(f["features"][row]).half().reshape(1, -1)


def test_vlp_features_are_the_seeds_fp16_rows_by_default_float32_on_request(tmp_path: Path) -> None:
    dm = VLPDataModule(cache_dir=str(tmp_path), corpus=SMALL_CORPUS, objectives=["mlm"], batch_size=4)
    batch = first_batch(dm, "val")
    lines = load_jsonl(dm.path("vlp/{split}.jsonl", "val"))
    hdf5 = dm.path("clip_features.hdf5")
    for b, index in enumerate(batch["index"].tolist()):
        expected = seed_clip_feature(hdf5, str(lines[index]["image_id"]))
        assert batch["clip_feats"][b].dtype == torch.float16 and torch.equal(batch["clip_feats"][b], expected)
    full = VLPDataModule(
        cache_dir=str(tmp_path), corpus=SMALL_CORPUS, objectives=["mlm"], batch_size=4, feature_dtype="float32"
    )
    unrounded = first_batch(full, "val")["clip_feats"]
    assert unrounded.dtype == torch.float32 and not torch.equal(unrounded, unrounded.half().float())
    assert torch.equal(unrounded.half(), batch["clip_feats"])


def test_vlp_text_only(tmp_path: Path) -> None:
    dm = VLPDataModule(cache_dir=str(tmp_path), corpus=SMALL_CORPUS, objectives=["mlm"], batch_size=4)
    dm.prepare_data()
    # text-only: only the JSONL files exist; no features are required or read
    root = tmp_path / "text_only"
    shutil.copytree(dm.root / "vlp", root / "vlp")
    text = VLPDataModule(root=str(root), objectives=["mlm"], batch_size=4, text_only=True)
    batch = first_batch(text)
    assert "clip_feats" not in batch and "visual_feats" not in batch and text.info == {}


def test_vlp_bad_input_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "vlp").mkdir()
    for split in ("train", "val", "test"):
        write_jsonl(tmp_path / "vlp" / f"{split}.jsonl", [{"text": "a red circle.", "image_id": "1"}])
    write_clip_hdf5(tmp_path / "clip_features.hdf5", ["1"], np.zeros((1, 512), np.float32))
    dm = VLPDataModule(root=str(tmp_path), objectives=["mlm"], batch_size=1)
    dm.prepare_data()
    assert len(dm.build_dataset("train")) == 1
    write_jsonl(tmp_path / "vlp" / "val.jsonl", [{"text": "x", "image_id": "1"}, {"text": "y", "image_id": "2"}])
    with pytest.raises(DataError, match="no CLIP features for image id '2'"):
        dm.build_dataset("val")
    (tmp_path / "vlp" / "test.jsonl").write_text('{"text": "ok", "image_id": "1"}\n{"text": \n')
    with pytest.raises(DataError, match=r"test\.jsonl:2: invalid JSON"):
        dm.build_dataset("test")
    (tmp_path / "clip_features.hdf5").unlink()
    with pytest.raises(DataError, match="clip_features.hdf5: file not found"):
        VLPDataModule(root=str(tmp_path), objectives=["mlm"]).prepare_data()


# ----------------------------------------------------------------------------------------------- LXMERT text
LXMERT_FIXTURE = [
    {
        "img_id": "COCO_val2014_000000000042",
        "labelf": {"vqa": [{"yes": 1.0, "no": 0.3}, {}, {"a dog": 0.6, "cat": 0.9}]},
        "sentf": {
            "mscoco": ["A dog on a couch", "two animals resting."],
            "vqa": ["Is it sunny?", "What is this?", "What animal is that?"],
        },
    },
    {
        "img_id": "2345",
        "labelf": {"gqa": [{"left": 1.0}], "visual7w": [{"tv!": 1.0}, {"a tv.": 0.5, "iPhone": 1.0}]},
        "sentf": {
            "vg": ["small book on bed"],
            "gqa": ["Is the cup on the left or right?"],
            "visual7w": ["What is on?", "What is held?"],
        },
    },
]


def test_lxmert_text_rules_on_a_hand_written_fixture(tmp_path: Path) -> None:
    assert list(lxmert_texts(LXMERT_FIXTURE)) == [
        "A dog on a couch",  # captions kept as is (no period added)
        "two animals resting.",
        "Is it sunny? Yes.",  # highest-scoring answer, capitalised, "." added
        # "What is this?" has empty labels: skipped
        "What animal is that? Cat.",
        "small book on bed",
        "Is the cup on the left or right? Left.",
        "What is on? Tv!",  # ends in "!": no period
        "What is held? IPhone.",  # only the first letter is capitalised
    ]
    assert qa_text("Q?", {"done.": 1.0}) == "Q? Done."
    src = tmp_path / "mscoco_minival.json"
    src.write_text(json.dumps(LXMERT_FIXTURE))
    assert convert_lxmert_json([src], tmp_path / "val_mlm.jsonl") == 8
    assert load_jsonl(tmp_path / "val_mlm.jsonl")[3] == {"text": "What animal is that? Cat."}
    bad = [{"img_id": "x", "sentf": {"vqa": ["q?"]}, "labelf": {"vqa": []}}]
    with pytest.raises(DataError, match="labelf"):
        list(lxmert_texts(bad))
    src.write_text(json.dumps([LXMERT_FIXTURE[0], {**LXMERT_FIXTURE[1], "sentf": {"vg": [None]}}]))
    with pytest.raises(
        DataError, match=r"mscoco_minival\.json: datum 1 \(2345\): sentf\['vg'\]\[0\] must be a string, got None"
    ):
        convert_lxmert_json([src], tmp_path / "val_mlm.jsonl")  # it wrote {"text": null}


def test_lxmert_text_module_reads_the_real_sample(tmp_path: Path) -> None:
    sample = real_sample("lxmert_text", "lxmert_finetune_val.jsonl")
    for split in ("train", "val", "test"):
        (tmp_path / "lxmert_text").mkdir(exist_ok=True)
        shutil.copy(sample, tmp_path / "lxmert_text" / f"{split}.jsonl")
    dm = LxmertTextDataModule(root=str(tmp_path), objectives=["mlm"], batch_size=8, max_text_len=64)
    batch = first_batch(dm)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "index", "mlm_labels"}
    assert len(dm.build_dataset("val")) == 200
    assert dm.build_dataset("val")[(0, 0)]["text"] == "What's in the water? Surfboard."


def test_embedded_corpus_has_lxmert_files(tmp_path: Path) -> None:
    dm = LxmertTextDataModule(cache_dir=str(tmp_path), corpus=SMALL_CORPUS, objectives=["mlm"], batch_size=4)
    paths = corpus_paths(dm.root)
    datums = json.loads(paths["lxmert_train"].read_text())
    texts = [r["text"] for r in load_jsonl(paths["lxmert_text_train"])]
    assert texts == list(lxmert_texts(datums))
    assert any(t.endswith("?") is False and "? " in t for t in texts)  # questions with answers
    assert first_batch(dm)["input_ids"].shape[0] == 4


# ----------------------------------------------------------------------------------------------- build_vlp
def test_build_vlp_from_a_real_coco_file() -> None:
    path = real_sample("coco", "captions_val2014_first200images.json")
    coco = json.loads(path.read_text())
    lines = coco_lines(path)
    assert len(lines) == len(coco["annotations"])
    ann = coco["annotations"][0]
    assert lines[0] == {"text": ann["caption"].strip(), "image_id": f"coco_{ann['image_id']}"}


def test_build_vlp_ids_match_a_clip_file_built_by_the_seed_recipe(tmp_path: Path) -> None:
    """The seed's recipe names SBU images by their file name without `.jpg` and numbers CC rows from 1; a CLIP
    feature file written with those ids (here by h5py directly, as the seed's extractor does) has every VLP id."""
    import h5py

    urls = ["http://static.flickr.com/2723/4385058960_b0f291553e.jpg", "http://static.flickr.com/1/77_aa.jpg"]
    (tmp_path / "sbu_urls.txt").write_text("".join(u + "\n" for u in urls))
    (tmp_path / "sbu_caps.txt").write_text("a man\na boat\n")
    (tmp_path / "cc.tsv").write_text("a dog\thttp://u/1\nthe sky\thttp://u/2\nrain\thttp://u/3\n")
    splits = build_vlp(sbu=(tmp_path / "sbu_urls.txt", tmp_path / "sbu_caps.txt"), cc_train=tmp_path / "cc.tsv")
    seed_ids = ["sbu_4385058960_b0f291553e", "sbu_77_aa", "cc_train_1", "cc_train_2", "cc_train_3"]
    with h5py.File(tmp_path / "clip_features.hdf5", "w") as f:
        f.create_dataset("features", data=np.ones((len(seed_ids), 4), dtype=np.float32))
        f.create_dataset("ids", data=np.array([i.encode() for i in seed_ids], dtype=f"S{max(map(len, seed_ids))}"))
    reader = ClipFeatureReader(tmp_path / "clip_features.hdf5")
    vlp_ids = [x["image_id"] for x in splits["train"] + splits["val"]]
    assert sorted(vlp_ids) == sorted(seed_ids)
    assert all(i in reader for i in vlp_ids)


def test_build_vlp_id_and_split_rules(tmp_path: Path) -> None:
    coco = {"images": [], "annotations": [{"id": 1, "image_id": 9, "caption": "A cat. "}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (tmp_path / "sbu_urls.txt").write_text("".join(f"http://x.org/a/{i}_b.jpg\n" for i in range(5)))
    (tmp_path / "sbu_caps.txt").write_text("".join(f"caption {i}\n" for i in range(5)))
    vg = [{"id": 7, "qas": [{"question": f"What is {i}?", "answer": f"Thing {i}.", "image_id": 7}]} for i in range(6)]
    (tmp_path / "qa.json").write_text(json.dumps(vg))
    (tmp_path / "cc_train.tsv").write_text("a dog\thttp://u/1\nthe sky\thttp://u/2\n")
    (tmp_path / "cc_val.tsv").write_text("a tree\thttp://u/3\n")
    splits = build_vlp(
        coco_train=[tmp_path / "coco.json"],
        sbu=(tmp_path / "sbu_urls.txt", tmp_path / "sbu_caps.txt"),
        vgqa=tmp_path / "qa.json",
        cc_train=tmp_path / "cc_train.tsv",
        cc_val=tmp_path / "cc_val.tsv",
        sbu_val_size=2,
        vgqa_val_size=3,
    )
    train, val = splits["train"], splits["val"]
    assert train[0] == {"text": "A cat.", "image_id": "coco_9"}
    assert [x["image_id"] for x in val[:2]] == ["sbu_0_b", "sbu_1_b"]  # first lines -> val, `.jpg` dropped
    assert [x["text"] for x in train if x["image_id"].startswith("sbu_")] == ["caption 2", "caption 3", "caption 4"]
    vg_val = [x for x in val if x["image_id"].startswith("vgqa_")]
    vg_train = [x for x in train if x["image_id"].startswith("vgqa_")]
    assert len(vg_val) == 3 and len(vg_train) == 3 and all(x["image_id"] == "vgqa_7" for x in vg_val)
    assert sorted(x["text"] for x in vg_val + vg_train) == sorted(f"What is {i}? Thing {i}." for i in range(6))
    assert [x["text"] for x in vg_val] != ["What is 0? Thing 0.", "What is 1? Thing 1.", "What is 2? Thing 2."]
    assert [x["image_id"] for x in train[-2:]] == ["cc_train_1", "cc_train_2"] and val[-1]["image_id"] == "cc_val_1"
    # the CLI writes train/val JSONL that data=vlp reads
    out = tmp_path / "out"
    assert (
        build_vlp_main(
            ["--out", str(out), "--coco-val", str(tmp_path / "coco.json"), "--cc-train", str(tmp_path / "cc_train.tsv")]
        )
        == 0
    )
    assert load_jsonl(out / "val.jsonl", required=("text", "image_id")) == [{"text": "A cat.", "image_id": "coco_9"}]
    assert len(load_jsonl(out / "train.jsonl")) == 2
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert build_vlp_main(["--out", str(out), "--vgqa", str(tmp_path / "bad.json")]) == 1


# texts whose ids hold [UNK] (characters outside the vocab) and a literal [MASK], beside the added [CLS] / [SEP]
SPECIAL_TEXTS = ["a \u2603 dog on a \u2603 couch", "the [MASK] is red", "\u2603", "two cats [UNK] resting"]


@pytest.mark.parametrize("module", [VLPDataModule, LxmertTextDataModule])
def test_mlm_never_picks_a_special_id_as_hf_data_collator_for_language_modeling(tmp_path: Path, module) -> None:
    """The CLIP-BERT seed masks with HF's `DataCollatorForLanguageModeling(tokenizer, mlm=True)` on features without
    a special-tokens mask, so it skips every id in `all_special_ids` ([UNK] too). At mlm_probability 1 every other
    position is picked: the label positions must equal HF's own collator's on the same ids (and a transcription)."""
    from transformers import DataCollatorForLanguageModeling

    folder = "vlp" if module is VLPDataModule else "lxmert_text"
    (tmp_path / folder).mkdir()
    for split in ("train", "val", "test"):
        write_jsonl(tmp_path / folder / f"{split}.jsonl", [{"text": t} for t in SPECIAL_TEXTS])
    options = {"text_only": True} if module is VLPDataModule else {}
    dm = module(root=str(tmp_path), objectives=["mlm"], batch_size=4, mlm_probability=1.0, **options)
    examples = [{"text": t, "index": i, "epoch": 0} for i, t in enumerate(SPECIAL_TEXTS)]
    batch = dm.collator("train")(examples)
    tok = dm.tokenizer
    unmasked = [tok(t, truncation=True)["input_ids"] for t in SPECIAL_TEXTS]  # the seed's dataset call
    assert any(tok.unk_token_id in ids[1:-1] for ids in unmasked) and any(tok.mask_token_id in ids for ids in unmasked)
    hf = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=1.0)([{"input_ids": i} for i in unmasked])
    assert batch["mlm_labels"].shape == hf["labels"].shape
    assert torch.equal(batch["mlm_labels"] != -100, hf["labels"] != -100)
    special = set(tok.all_special_ids)  # the seed's rule, transcribed
    for row, ids in enumerate(unmasked):
        picked = (batch["mlm_labels"][row, : len(ids)] != -100).tolist()
        assert picked == [t not in special for t in ids]
        assert batch["mlm_labels"][row, : len(ids)][torch.tensor(picked)].tolist() == [
            t for t in ids if t not in special
        ]
    # the option off: only the added [CLS] / [SEP] and padding are skipped ([UNK] can be picked)
    off = module(root=str(tmp_path), objectives=["mlm"], mlm_probability=1.0, mlm_skip_special_ids=False, **options)
    labels = off.collator("train")(examples)["mlm_labels"]
    assert (labels == tok.unk_token_id).any()
