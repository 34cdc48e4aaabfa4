"""Bad input fails before any compute, with one line naming the file/field, and never touches earlier outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra.utils import instantiate

from vl.data.scenes import SceneSettings, ensure_corpus
from vl.errors import ConfigError, DataError
from vl.pipeline import train


@pytest.fixture
def corpus_copy(tmp_path: Path, data_dir: Path) -> Path:
    """A private, writable copy of the small embedded corpus."""
    src = ensure_corpus(data_dir, SceneSettings(num_images=150), "all")
    dst = tmp_path / "corpus"
    shutil.copytree(src, dst)
    return dst


def _datamodule(make_cfg, *overrides: str):
    cfg = make_cfg("experiment=none", *overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_missing_data_file_is_named(make_cfg, corpus_copy: Path) -> None:
    (corpus_copy / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").unlink()
    cfg = make_cfg("experiment=none", "data=vqa", f"data.root={corpus_copy}")
    with pytest.raises(DataError, match=r"v2_OpenEnded_mscoco_val2014_questions\.json: file not found"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.parametrize("features", ["regions.lmdb", "regions.hdf5"])
def test_corrupt_feature_file_is_named(make_cfg, corpus_copy: Path, features: str) -> None:
    target = corpus_copy / features
    target = target / "data.mdb" if target.is_dir() else target
    size = target.stat().st_size
    with open(target, "r+b") as f:
        f.truncate(size // 3)
    with pytest.raises(DataError, match=features.split(".")[0]):
        _datamodule(make_cfg, "data=vqa", f"data.root={corpus_copy}", f"data.features={features}")


def test_garbage_hdf5_is_named(make_cfg, corpus_copy: Path) -> None:
    (corpus_copy / "regions.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    with pytest.raises(DataError, match="regions.hdf5"):
        _datamodule(make_cfg, "data=vqa", f"data.root={corpus_copy}", "data.features=regions.hdf5")


def test_malformed_question_entry_is_named(make_cfg, corpus_copy: Path) -> None:
    path = corpus_copy / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json"
    data = json.loads(path.read_text())
    del data["questions"][3]["question"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"v2_OpenEnded_mscoco_train2014_questions\.json.*question"):
        _datamodule(make_cfg, "data=vqa", f"data.root={corpus_copy}")


def test_malformed_captions_json_is_named(make_cfg, corpus_copy: Path) -> None:
    path = corpus_copy / "annotations" / "captions_train.json"
    path.write_text(path.read_text()[:-50])
    with pytest.raises(DataError, match=r"captions_train\.json"):
        _datamodule(make_cfg, "data=captions", f"data.root={corpus_copy}")


def test_captions_itm_split_of_one_image_is_named(make_cfg, corpus_copy: Path) -> None:
    """ITM draws each negative from another image's captions: a split with one image has none (the draw looped
    forever)."""
    path = corpus_copy / "annotations" / "captions_val.json"
    data = json.loads(path.read_text())
    one = data["annotations"][0]["image_id"]
    data["annotations"] = [{**a, "image_id": one} for a in data["annotations"]]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"captions_val\.json: split 'val' needs captions of 2\+ images for ITM"):
        _datamodule(make_cfg, "data=captions", f"data.root={corpus_copy}", "data.objectives=[mlm,itm]")


def test_image_without_features_is_named(make_cfg, corpus_copy: Path) -> None:
    path = corpus_copy / "annotations" / "captions_val.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["image_id"] = 987654
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="987654"):
        _datamodule(make_cfg, "data=captions", f"data.root={corpus_copy}")


def test_answer_label_out_of_range_is_named(make_cfg, corpus_copy: Path) -> None:
    import pickle

    path = corpus_copy / "vqa" / "cache" / "train_target.pkl"
    targets = pickle.loads(path.read_bytes())
    targets[0]["labels"] = [10_000]
    path.write_bytes(pickle.dumps(targets))
    with pytest.raises(DataError, match=r"train_target\.pkl.*10000"):
        _datamodule(make_cfg, "data=vqa", f"data.root={corpus_copy}")


def test_batch_sizes_must_divide(make_cfg) -> None:
    with pytest.raises(Exception, match="batch_size"):
        _datamodule(make_cfg, "data=vqa", "data.batch_size=30", "data.batch_size_per_device=8")


def test_unknown_objective_is_named(make_cfg) -> None:
    cfg = make_cfg("experiment=none", "data=vqa", "data.objectives=[vqa,foo]", "debug=fdr")
    with pytest.raises(ConfigError, match="unknown objective 'foo'"):
        train(cfg)


def test_missing_pretrained_dir_is_named(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("experiment=none", "data=vqa", f"model.encoder.text_encoder.pretrained={tmp_path}/nope", "debug=fdr")
    with pytest.raises(ConfigError, match="nope"):
        train(cfg)


def test_conceptual_captions_tsv_reads_and_bad_line_is_named(make_cfg, corpus_copy: Path) -> None:
    dm = _datamodule(make_cfg, "data=captions", f"data.root={corpus_copy}", "data.captions='cc/{split}.tsv'")
    coco = _datamodule(make_cfg, "data=captions", f"data.root={corpus_copy}")
    assert [a["caption"] for a in dm.datasets["train"].captions] == [
        a["caption"] for a in coco.datasets["train"].captions
    ]
    path = corpus_copy / "cc" / "val.tsv"
    lines = path.read_text().splitlines()
    lines[4] = "a caption without an image id"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"val\.tsv:5: expected 'caption<TAB>image_id'"):
        _datamodule(make_cfg, "data=captions", f"data.root={corpus_copy}", "data.captions='cc/{split}.tsv'")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("data.batch_size=7", "data.batch_size_per_device=2"), r"data\.batch_size=7 is not a multiple of"),
        (("trainer.devices=3", "data.batch_size=32", "data.batch_size_per_device=8"), r"8 x 3"),
        (("+data.splits.test=test-dev2015",), r"test-dev2015_questions\.json: file not found"),
    ],
)
def test_a_bad_main_stage_fails_before_the_pretrain_stage_runs(make_cfg, overrides, message) -> None:
    """The default experiment pretrains, then fine-tunes: a main-stage setting only that stage reads (its batch
    sizes against the planned world size, its files) fails in one line before pretraining spends anything (it used to
    fail after the whole pretrain stage)."""
    cfg = make_cfg(*overrides)  # the default experiment: a pretrain stage, then VQA
    assert cfg.pretrain
    with pytest.raises((ConfigError, DataError), match=message):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "pretrain").exists()


def test_a_gpu_config_without_a_gpu_is_one_line(make_cfg, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = make_cfg("experiment=none", "hardware=ddp")
    with pytest.raises(ConfigError, match=r"trainer\.accelerator=gpu: no GPU is visible here .*hardware=ddp_cpu"):
        train(cfg)
