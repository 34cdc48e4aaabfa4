"""Loading never runs code from a file, and a bad checkpoint path is one line naming the file and what is wrong.

A planted pickle (its `__reduce__` would create a marker file) is refused on every loading path: `ckpt_path` (train
resume, evaluate, task=memory_colors, task=zero_shot_retrieval), `model.init_from`, `model.state_dict_path`,
`python -m vl.tools.probes` (vl checkpoints and DeepSpeed-style states), and the data pickles (VQA target / answer caches,
RefCOCO refs, hard negatives, LMDB feature records). `ckpt_path` problems (missing, empty, truncated, kill-damaged,
same-size damage, not a checkpoint, weights only, another architecture or size) fail before Lightning sees the file.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import ROOT, TINY_MODEL, trained_run
from vl.checkpoint import read_checkpoint
from vl.data.formats.safe_pickle import read_pickle_file, safe_loads
from vl.data.scenes import SceneSettings, ensure_corpus
from vl.errors import ConfigError, DataError
from vl.pipeline import evaluate, train

FAST = (
    "experiment=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
)


class Planted:
    """Unpickling this calls `open(marker, "w")`: the marker file exists iff the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    """Two tiny trained runs (VisualBERT on VQA, CLIP-BERT on VLP) with their saved configs. The VisualBERT is the
    published architecture at a tiny size (at BERT-base size each damaged copy of its checkpoint was 1.35 GB: a minute
    of this file's time went to writing them)."""
    out = {}
    for name, overrides in {
        "visual_bert": ("model=visual_bert", "data=vqa", *TINY_MODEL),
        "clip_bert": ("model=clip_bert_tiny", "data=vlp"),
    }.items():
        cfg, _ = trained_run([*FAST, *overrides], output_dir=tmp_path_factory.mktemp(name), data_dir=data_dir)
        out[name] = Path(cfg.paths.output_dir)
    return out


def _planted_copy(src: Path, dst: Path, marker: Path) -> Path:
    """`src` checkpoint with a planted object added: a real checkpoint that would run code when unpickled."""
    ckpt = torch.load(src, weights_only=True)
    ckpt["planted"] = Planted(marker)
    torch.save(ckpt, dst)
    return dst


def _eval_cfg(make_cfg, ckpt: Path, *overrides: str):
    return make_cfg(f"ckpt_path={ckpt}", *overrides, name="eval", config_name="evaluate", tiny=False)


# ------------------------------------------------------------------------------------------------ planted pickles


def _refused(err: pytest.ExceptionInfo, path: Path) -> None:
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "refused" in text, text


def test_planted_ckpt_is_refused_on_every_checkpoint_path(runs, make_cfg, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    run = runs["visual_bert"]
    evil = _planted_copy(run / "checkpoints" / "last.ckpt", run / "checkpoints" / "planted.ckpt", marker)
    try:
        # train.py ckpt_path= (resume)
        with pytest.raises(ConfigError) as err:
            train(make_cfg(*FAST, "data=vqa", f"ckpt_path={evil}", name="resume"))
        _refused(err, evil)
        # model.init_from
        with pytest.raises(ConfigError) as err:
            train(make_cfg(*FAST, "data=vqa", f"model.init_from={evil}", name="init"))
        _refused(err, evil)
        # evaluate.py: test, memory_colors, zero_shot_retrieval
        for task in ("test", "memory_colors", "zero_shot_retrieval"):
            with pytest.raises(ConfigError) as err:
                evaluate(_eval_cfg(make_cfg, evil, f"task={task}"))
            _refused(err, evil)
        # the task implementations themselves (not only evaluate()'s up-front check)
        from vl.eval.probes.scorers import CheckpointScorer
        from vl.eval.tasks import run_eval_task
        from vl.pipeline import load_run_config

        run_cfg, _ = load_run_config(evil)
        with pytest.raises(ConfigError) as err:
            CheckpointScorer(evil, run_cfg)
        _refused(err, evil)
        captions_cfg = make_cfg(*FAST, "data=captions", name="captions")
        zsr_cfg = _eval_cfg(make_cfg, evil, "task=zero_shot_retrieval")
        with pytest.raises(ConfigError) as err:
            run_eval_task(
                zsr_cfg.task,
                cfg=zsr_cfg,
                run_cfg=captions_cfg,
                output_dir=tmp_path / "zsr",
            )
        _refused(err, evil)
        # python -m vl.tools.probes
        from vl.tools.probes import main as probes_main

        rc = probes_main(["--task", "memory_colors", "--models", f"x={evil}", "--out", str(tmp_path / "p")])
        assert rc == 2
    finally:
        evil.unlink()
    assert not marker.exists()


def test_planted_state_dict_files_are_refused(runs, make_cfg, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    # model.state_dict_path (CLIP-BERT / BERT whole-model weights)
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"bert.x": torch.zeros(2)}, "planted": Planted(marker)}, evil)
    with pytest.raises(ConfigError) as err:
        train(make_cfg(*FAST, "model=clip_bert_tiny", "data=vlp", f"model.state_dict_path={evil}"))
    _refused(err, evil)
    # python -m vl.tools.probes with an LXMERT config + DeepSpeed-style state
    from vl.models.text_only import tiny_lxmert_config
    from vl.tools.probes import main as probes_main

    model_dir = tmp_path / "lxmert"
    model_dir.mkdir()
    tiny_lxmert_config().to_json_file(model_dir / "config.json")
    shutil.copy(evil, model_dir / evil.name)
    capsys.readouterr()
    rc = probes_main(["--task", "memory_colors", "--models", f"lx=lxmert:{model_dir}", "--out", str(tmp_path / "p")])
    stderr = capsys.readouterr().err.strip()
    assert rc == 2 and "refused" in stderr and len(stderr.splitlines()) == 1, stderr
    assert not marker.exists()


@pytest.fixture
def corpus_copy(tmp_path: Path, data_dir: Path) -> Path:
    src = ensure_corpus(data_dir, SceneSettings(num_images=150), "all")
    dst = tmp_path / "corpus"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "data, rel",
    [
        ("vqa", "vqa/cache/train_target.pkl"),
        ("vqa", "vqa/cache/trainval_ans2label.pkl"),
        ("refcoco", "refcoco+/refs(unc).p"),
        ("retrieval", "retrieval/hard_negative.pkl"),
    ],
)
def test_planted_data_pickle_is_refused(make_cfg, corpus_copy: Path, tmp_path: Path, data: str, rel: str) -> None:
    marker = tmp_path / "MARKER"
    path = corpus_copy / rel
    path.write_bytes(pickle.dumps([Planted(marker)], protocol=2))
    cfg = make_cfg("experiment=none", f"data={data}", f"data.root={corpus_copy}")
    with pytest.raises(DataError, match="refused to unpickle") as err:
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
    assert str(path) in str(err.value) and "open', which is not plain data" in str(err.value)
    assert not marker.exists()


def test_planted_lmdb_record_is_refused(corpus_copy: Path, tmp_path: Path) -> None:
    from vl.data.features.region_lmdb import RegionFeatureReader

    marker = tmp_path / "MARKER"
    reader = RegionFeatureReader(corpus_copy / "regions.lmdb")
    image_id = reader.ids()[3]
    reader.close()
    env = lmdb.open(str(corpus_copy / "regions.lmdb"), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        txn.put(image_id.encode(), pickle.dumps({"image_id": Planted(marker)}))
    env.close()
    reader = RegionFeatureReader(corpus_copy / "regions.lmdb")
    with pytest.raises(DataError, match=f"image id '{image_id}'.*refused to unpickle"):
        reader[image_id]
    assert not marker.exists()


def test_safe_unpickler_reads_plain_data_of_every_protocol(tmp_path: Path) -> None:
    """The data formats' real contents (numpy arrays and scalars, bytes, sets, OrderedDict/defaultdict; Python 2
    style protocol-2 pickles) still load, equal to what was pickled."""
    obj = {
        "labels": [1, 2],
        "scores": np.array([0.3, 1.0], dtype=np.float32),
        "pool": np.arange(6, dtype=np.int64).reshape(2, 3),
        "s": np.float64(0.5),
        "b": b"\x00\xff",
        "set": {1, 2},
        "od": OrderedDict(a=1),
        "dd": defaultdict(list, {"x": [1]}),
        "t": (1.5, None, True),
    }
    for proto in (0, 2, 4, 5):
        back = safe_loads(pickle.dumps(obj, protocol=proto), "x")
        assert back.keys() == obj.keys()
        np.testing.assert_array_equal(back["scores"], obj["scores"])
        np.testing.assert_array_equal(back["pool"], obj["pool"])
        assert back["s"] == obj["s"] and back["b"] == obj["b"] and back["set"] == obj["set"]
        assert back["od"] == obj["od"] and back["dd"] == obj["dd"] and back["t"] == obj["t"]
    path = tmp_path / "targets.pkl"
    path.write_bytes(pickle.dumps([{"question_id": 1, "labels": [3]}], protocol=2))
    assert read_pickle_file(path) == [{"question_id": 1, "labels": [3]}]
    path.write_bytes(pickle.dumps(os.system, protocol=2))
    with pytest.raises(DataError, match=r"targets\.pkl: refused to unpickle: it would call 'posix\.system'"):
        read_pickle_file(path)


# ------------------------------------------------------------------------------------------------ ckpt_path problems


def _damaged(src: Path, dst_dir: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message part)."""
    raw = src.read_bytes()
    n = len(raw)
    cases = {
        "missing": (b"", "does not exist"),
        "empty": (b"", "is empty"),
        "truncated": (raw[: n // 2], "truncated or damaged"),
        "kill_damaged": (raw[:4096], "truncated or damaged"),  # a writer killed after its first page
        "same_size_damage": (raw[: n // 3] + bytes(4096) + raw[n // 3 + 4096 :], "fails its CRC check"),
        "not_a_checkpoint": (b'{"json": "not a checkpoint"}\n', "is not a PyTorch checkpoint"),
    }
    out = {}
    for name, (blob, message) in cases.items():
        path = dst_dir / f"{name}.ckpt"
        if name != "missing":
            path.write_bytes(blob)
        out[name] = (path, message)
    plain = dst_dir / "plain_state_dict.ckpt"
    torch.save(torch.load(src, weights_only=True)["state_dict"], plain)
    out["plain_state_dict"] = (plain, "is not a Lightning checkpoint")
    return out


def _one_line(err: pytest.ExceptionInfo, path: Path, message: str) -> None:
    text = str(err.value)
    assert "\n" not in text and str(path) in text and message in text, text


def test_bad_ckpt_path_is_one_line_for_resume_and_evaluate(runs, make_cfg, tmp_path: Path) -> None:
    run = runs["visual_bert"]
    ckpt_dir = run / "checkpoints"
    cases = _damaged(ckpt_dir / "last.ckpt", tmp_path)
    # weights only: evaluates, but cannot resume
    weights_only = tmp_path / "weights_only.ckpt"
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    torch.save({k: ckpt[k] for k in ("state_dict", "hyper_parameters", "vl_architecture")}, weights_only)
    resume_cases = {**cases, "weights_only": (weights_only, "cannot resume training")}
    for name, (path, message) in resume_cases.items():
        with pytest.raises(ConfigError) as err:
            train(make_cfg(*FAST, "data=vqa", f"ckpt_path={path}", name=f"resume-{name}"))
        _one_line(err, path, message)
    for path, message in cases.values():  # evaluate: the files sit in the run's checkpoints dir
        placed = ckpt_dir / path.name
        if path.exists():
            shutil.copy(path, placed)
        try:
            with pytest.raises(ConfigError) as err:
                evaluate(_eval_cfg(make_cfg, placed))
            _one_line(err, placed, message)
        finally:
            placed.unlink(missing_ok=True)


def test_ckpt_of_another_model_names_both_architectures(runs, make_cfg) -> None:
    foreign = runs["clip_bert"] / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as err:
        train(make_cfg(*FAST, "data=vqa", f"ckpt_path={foreign}", name="resume-foreign"))
    _one_line(err, foreign, "holds a ClipBertEncoder checkpoint, but the config asks for SingleStreamEncoder")
    # evaluate: a CLIP-BERT checkpoint dropped into a VisualBERT run dir is evaluated as what it holds (its own run
    # record); one without a run record (written before vl stored it) falls back to the run dir's config and fails
    placed = runs["visual_bert"] / "checkpoints" / "foreign.ckpt"
    shutil.copy(foreign, placed)
    try:
        assert "test/mlm_acc" in evaluate(_eval_cfg(make_cfg, placed))
        legacy = torch.load(placed, weights_only=True)
        del legacy["vl_run"]
        torch.save(legacy, placed)
        with pytest.raises(ConfigError) as err:
            evaluate(_eval_cfg(make_cfg, placed))
        _one_line(err, placed, "holds a ClipBertEncoder checkpoint, but the config asks for VisualBertEncoder")
    finally:
        placed.unlink()
    # same architecture, other sizes
    own = runs["visual_bert"] / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as err:
        train(
            make_cfg(
                *FAST,
                "data=vqa",
                "model=visual_bert",
                f"ckpt_path={own}",
                "model.encoder.text_encoder.hidden_size=64",
                "model.encoder.text_encoder.num_heads=2",
                name="resize",
            )
        )
    _one_line(err, own, "shape mismatch")


def test_own_checkpoint_reads(runs) -> None:
    ckpt = read_checkpoint(runs["visual_bert"] / "checkpoints" / "last.ckpt", resume=True)
    assert ckpt["vl_architecture"] == "VisualBertEncoder"


@pytest.mark.slow  # a CLI subprocess (~25 s on 2 cores)
def test_bad_ckpt_path_on_the_cli_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "last.ckpt"
    empty.write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=none", f"ckpt_path={empty}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: ckpt_path: '{empty}' is empty (0 bytes; an interrupted write?)"], proc.stderr


# ------------------------------------------------------------------------------------------------ compose-time ranges


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=-64", "data.batch_size=-64"),
        ("data.batch_size=0", "data.batch_size=0"),
        ("data.batch_size_per_device=-8", "data.batch_size_per_device=-8"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("trainer.max_steps=-5", "trainer.max_steps=-5"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0"),
        ("trainer.limit_train_batches=-1", "trainer.limit_train_batches=-1"),
        ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches=1.5"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0"),
        ("pretrain.data.batch_size=-32", "pretrain.data.batch_size=-32"),
        ("pretrain.trainer.max_epochs=0", "pretrain.trainer.max_epochs=0"),
    ],
)
def test_counts_are_checked_before_anything_is_built(make_cfg, monkeypatch, override: str, key: str) -> None:
    import vl.pipeline

    def never(*args, **kwargs):
        raise AssertionError("data was built before the config was checked")

    monkeypatch.setattr(vl.pipeline, "build_datamodule", never)
    experiment = () if override.startswith("pretrain.") else ("experiment=none",)
    cfg = make_cfg(*experiment, override)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith(f"{key}: must be"), err.value
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.parametrize("override", ["trainer.max_steps=-1", "trainer.max_epochs=-1", "trainer.limit_val_batches=0"])
def test_unlimited_and_zero_limits_pass_the_check(make_cfg, override: str) -> None:
    from vl.config import check_config

    check_config(make_cfg("experiment=none", override))


# ------------------------------------------------------------------------------------------------ non-finite features


def _records(bad_id: str, field: str):
    rng = np.random.default_rng(0)
    for i in range(3):
        rec = {
            "image_id": str(i),
            "image_h": 10,
            "image_w": 20,
            "boxes": np.array([[0, 0, 5, 5], [1, 1, 9, 9]], dtype=np.float32),
            "features": rng.random((2, 6), dtype=np.float32),
            "cls_prob": rng.random((2, 3), dtype=np.float32),
        }
        if str(i) == bad_id:
            rec[field] = rec[field].copy()
            rec[field][1, 2] = np.nan if field != "cls_prob" else np.inf
        yield rec


@pytest.mark.parametrize("fmt", ["lmdb", "hdf5", "json"])
@pytest.mark.parametrize("field", ["features", "boxes", "cls_prob"])
def test_non_finite_region_features_name_file_and_id(tmp_path: Path, fmt: str, field: str) -> None:
    from vl.data.features import region_hdf5, region_json, region_lmdb

    if fmt == "lmdb":
        path = tmp_path / "regions.lmdb"
        region_lmdb.write_region_lmdb(path, _records("1", field))
        reader = region_lmdb.RegionFeatureReader(path)
    elif fmt == "hdf5":
        path = tmp_path / "regions.hdf5"
        region_hdf5.write_region_hdf5(path, _records("1", field))
        reader = region_hdf5.HDF5RegionReader(path)
    else:
        path = tmp_path / "regions_json"
        region_json.write_region_json(path, _records("1", field))
        reader = region_json.FrcnnJsonRegionReader(path)
    assert np.isfinite(reader["0"]["features"]).all()
    with pytest.raises(DataError, match=rf"image id '1': '{field}' has 1 non-finite value") as err:
        reader["1"]
    assert str(path) in str(err.value)


def test_non_finite_clip_features_name_file_and_id(tmp_path: Path) -> None:
    from vl.data.features.clip_hdf5 import ClipFeatureReader, write_clip_hdf5

    feats = np.ones((3, 4), dtype=np.float32)
    feats[2, 1] = np.inf
    write_clip_hdf5(tmp_path / "clip.hdf5", ["a", "b", "c"], feats)
    reader = ClipFeatureReader(tmp_path / "clip.hdf5")
    np.testing.assert_array_equal(reader["a"], feats[0])
    with pytest.raises(DataError, match=r"clip\.hdf5: image id 'c': 'features' has 1 non-finite value"):
        reader["c"]


def test_deepspeed_checkpoint_dirs_are_left_to_deepspeed(tmp_path: Path) -> None:
    from vl.checkpoint import is_deepspeed_dir

    ds = tmp_path / "last.ckpt"
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text("checkpoint")
    assert is_deepspeed_dir(ds) and not is_deepspeed_dir(tmp_path / "nothing") and not is_deepspeed_dir(tmp_path)


def _damaged_safetensors(path: Path, how: str) -> Path:
    """A `.safetensors` file that safetensors cannot read: `garbage` (an 8-byte header length, then bytes that are
    no JSON header), `truncated` (a real file cut inside its tensor data)."""
    if how == "garbage":
        path.write_bytes((40).to_bytes(8, "little") + b"garbage!" * 3)
    else:
        from safetensors.torch import save_file

        save_file({"features.0.weight": torch.randn(4, 3, 3, 3), "visual.conv1.weight": torch.randn(8, 3, 3, 3)}, path)
        path.write_bytes(path.read_bytes()[:-100])
    return path


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_damaged_safetensors_weights_are_one_line_naming_the_key(tmp_path: Path, how: str) -> None:
    """Every `.safetensors` reader (VGG features, the CLIP ResNet, a BERT dir's weights, `model.state_dict_path`)
    names its config key and the file; safetensors' own `SafetensorError` was a traceback."""
    from vl.models.checkpoints import bert_file_tensors, read_state_dict
    from vl.models.clip_resnet import build_clip_resnet, load_clip_visual
    from vl.models.vgg import VGG16Features, load_vgg_features

    path = _damaged_safetensors(tmp_path / "model.safetensors", how)
    where = re.escape(f"'{path}' is not a readable safetensors file (")
    with pytest.raises(ConfigError, match=r"^model\.encoder\.vgg_weights: " + where):
        load_vgg_features(VGG16Features([4, "M"]), path)
    backbone = build_clip_resnet(layers=[1, 1, 1, 1], width=8)
    with pytest.raises(ConfigError, match=r"^model\.encoder\.backbone_weights: " + where):
        load_clip_visual(backbone, path)
    with pytest.raises(ConfigError, match=r"^text_encoder\.pretrained: " + where):
        bert_file_tensors(path, {"cls.predictions.bias"})
    with pytest.raises(ConfigError, match=r"^model\.state_dict_path: " + where):
        read_state_dict(path)
