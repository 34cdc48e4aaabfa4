"""Multi30k with five caption pairs an image (`data=multi30k_5x`, the seed's `multi30k_5x` / `multi30k_5x_mixed`
retrieval datasets): the embedded corpus's `train_frcnn_5captions_both.json` against a transcription of the seed's
generator over the task 2 files it writes; the training rows the data module builds from it (German, mixed) against
the seed's datasets' row order; a fixture in the real layout; the missing file named before any compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data.test_multi30k import write_fixture
from vl.data.formats.multi30k import read_annotations
from vl.data.multi30k import Multi30kDataModule
from vl.data.scenes.writers.multi30k import FIVE_CAPTIONS_FILE, lc_norm_tok
from vl.errors import ConfigError, DataError


def seed_five_captions_generator(flickr30k: Path, task2_tok: Path) -> list[dict[str, str]]:
    """phaedonmit/VL-BERT `data/flickr30k/utils/5captions_gen_both_train_image_json.py`, its paths made arguments:
    the image ids of `utils/train.txt` (line.split('.')[0]), the image and zero-padded FRCNN paths repeated five times,
    then the English caption files 1..5 and the German ones 1..5 concatenated; one record per zipped row."""
    images, frcnns = [], []
    with open(flickr30k / "utils" / "train.txt") as fp:
        for line in fp:
            image_id = line.split(".")[0]
            images.append("train_image.zip@/" + image_id + ".jpg")
            while len(image_id) < 8:
                image_id = "0" + image_id
            frcnns.append("train_frcnn.zip@/" + image_id + ".json")
    images, frcnns = images * 5, frcnns * 5
    captions: dict[str, list[str]] = {"en": [], "de": []}
    for lang in ["en", "de"]:
        for i in range(1, 6):
            with open(task2_tok / f"train.lc.norm.tok.{i}.{lang}") as fp:
                captions[lang] += [line.strip() for line in fp]
    assert len(captions["en"]) == len(captions["de"]) == len(images) == len(frcnns)
    return [
        {"image": im, "caption_en": en, "caption_de": de, "frcnn": fr}
        for en, de, im, fr in zip(captions["en"], captions["de"], images, frcnns)
    ]


def module(data_dir: Path, **kwargs) -> Multi30kDataModule:
    kwargs = {"languages": "de", "eval_language": "de", "flip_prob": 0.0, **kwargs}
    return Multi30kDataModule(
        cache_dir=str(data_dir),
        corpus={"num_images": 150},
        task="retrieval",
        train_annotations=FIVE_CAPTIONS_FILE,
        objectives=["itm_bce"],
        **kwargs,
    )


def test_embedded_five_caption_file_is_the_seed_generators_output(data_dir) -> None:
    dm = module(data_dir)
    dm.prepare_data()
    root = dm.root
    tok = root.parent / "task2" / "tok"
    records = read_annotations(root / FIVE_CAPTIONS_FILE)
    assert records == seed_five_captions_generator(root, tok)
    n = len((root / "utils" / "train.txt").read_text().splitlines())
    assert len(records) == 5 * n and n == len(read_annotations(root / "train_frcnn.json"))
    for i in range(1, 6):
        for lang in ("en", "de"):
            lines = (tok / f"train.lc.norm.tok.{i}.{lang}").read_text(encoding="utf-8").splitlines()
            assert len(lines) == n and all(line == line.lower() and line.endswith(" .") for line in lines)
    # five draws an image, English and German drawn apart (task 2's captions are not translations of each other)
    per_image = [{records[k + j * n]["caption_en"] for j in range(5)} for k in range(n)]
    assert sum(len(s) > 1 for s in per_image) > 0.8 * n
    assert lc_norm_tok("The red one is on the left.") == "the red one is on the left ."


def test_training_rows_are_every_caption_pair_in_the_files_order(data_dir) -> None:
    dm = module(data_dir)
    dm.setup("fit")
    records = read_annotations(dm.root / FIVE_CAPTIONS_FILE)
    rows = dm.datasets["train"].rows
    assert [r["text"] for r in rows] == [r["caption_de"] for r in records]  # LANGUAGES_USED second: [CLS] DE [SEP]
    assert [r["image"][1] for r in rows] == [r["frcnn"].split("/")[-1][: -len(".json")] for r in records]
    # val / test: the usual one-caption files, ranked in German
    plain = read_annotations(dm.root / "val_frcnn.json")
    assert dm.gallery("val")["texts"] == [r["caption_de"] for r in plain]
    example = dm.datasets["train"][(0, 3)]
    assert example["text"] in {records[3]["caption_de"], *(r["caption_de"] for r in records)}


def test_mixed_rows_are_the_seeds_doubled_database(data_dir) -> None:
    """`multi30k_5x_mixed`: the file's rows twice, the first copy English ('first'), the second German."""
    dm = module(data_dir, languages="both", both_layout="per_language", eval_language="en")
    dm.setup("fit")
    records = read_annotations(dm.root / FIVE_CAPTIONS_FILE)
    rows = dm.datasets["train"].rows
    seed_db = [(r["caption_en"], "en") for r in records] + [(r["caption_de"], "de") for r in records]
    assert [(r["text"], r["language"]) for r in rows] == seed_db
    assert dm.gallery("test")["texts"] == [
        r["caption_en"] for r in read_annotations(dm.path("{split}_frcnn.json", "test"))
    ]


def test_real_layout_fixture_and_a_missing_file(tmp_path) -> None:
    root = tmp_path / "flickr30k"
    for split in ("train", "val", "test_2016_flickr"):
        write_fixture(root, split, n=3)
    plain = read_annotations(root / "train_frcnn.json")
    with open(root / FIVE_CAPTIONS_FILE, "w") as f:  # the generator's own json.dump layout
        for i in range(5):
            for r in plain:
                f.write(
                    json.dumps({**r, "caption_en": f"{r['caption_en']} {i}", "caption_de": f"{r['caption_de']} {i}"})
                )
                f.write("\n")
    dm = Multi30kDataModule(
        root=str(root),
        task="retrieval",
        train_annotations=FIVE_CAPTIONS_FILE,
        languages="en",
        objectives=["itm_bce"],
        tokenizer=str(tmp_path / "vocab.txt"),
    )
    assert root / FIVE_CAPTIONS_FILE in dm.required_files()
    dm.setup("fit")
    rows = dm.datasets["train"].rows
    assert [r["text"] for r in rows] == [f"{r['caption_en']} {i}" for i in range(5) for r in plain]
    assert len(dm.gallery("val")["texts"]) == 3
    (root / FIVE_CAPTIONS_FILE).rename(root / "other.json")
    with pytest.raises((DataError, ConfigError), match=FIVE_CAPTIONS_FILE):
        dm.check_files()
