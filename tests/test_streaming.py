"""Streaming shards (`python -m vl.tools.shard`, `data.streaming=true`): the shards round-trip every example, a streamed
fit equals the LMDB fit on the same order, a mid-epoch resume continues with the unseen examples, DDP ranks split
every epoch exactly, and a bad shard dir is one error before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from tests.conftest import TINY_CORPUS_IMAGES, read_losses
from vl.data.streaming import META_FILE, decode
from vl.errors import ConfigError, DataError
from vl.pipeline import train
from vl.tools.shard import main as shard_main

pytest.importorskip("litdata")

RUN = (
    "experiment=none",
    "trainer.deterministic=true",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "test=false",
    "data.batch_size=16",
    "data.batch_size_per_device=16",
    "+callbacks.record._target_=tests.conftest.RecordLosses",
)


def _shard(out: Path, data_dir: Path, data: str, splits: str = "train") -> Path:
    rc = shard_main(
        [
            "--out",
            str(out),
            "--splits",
            splits,
            "--chunk-bytes",
            "1MB",  # ~12 chunks: workers and ranks get chunks of their own
            f"data={data}",
            f"paths.data_dir={data_dir}",
            f"data.corpus.num_images={TINY_CORPUS_IMAGES}",
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    """The embedded corpus's VQA and captions train splits as LitData shards, written by the CLI's `main`."""
    root = tmp_path_factory.mktemp("shards")
    return {
        "vqa": _shard(root / "vqa", data_dir, "vqa", "train,val"),
        "captions": _shard(root / "captions", data_dir, "captions"),
    }


def _assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b), where  # bit-exact (no NaN in the corpus)
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


@pytest.mark.parametrize("data", ["vqa", "captions"])
def test_shards_round_trip_every_example_bit_exactly(make_cfg, shards: dict[str, Path], data: str) -> None:
    """Every record read back equals the dataset's record (arrays bit-exact, same dtypes); finished at epochs 0 and 1
    (ITM negatives drawn after the read) it equals the local dataset's example of that epoch."""
    import litdata

    cfg = make_cfg(f"data={data}", "experiment=none", f"data.streaming_dir={shards[data]}")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    local = dm.datasets["train"]
    streamed = litdata.StreamingDataset(str(shards[data] / "train"))
    assert len(streamed) == len(local)
    meta = (shards[data] / META_FILE).read_text()
    finisher = dm.stream_finisher("train", __import__("json").loads(meta)["splits"]["train"]["context"])
    seen = 0
    for i, raw in enumerate(streamed):
        record = decode(raw)
        _assert_same(local.record(i), record, f"{data}[{i}]")
        for epoch in (0, 1):
            _assert_same(local[(epoch, i)], finisher.finish(record, epoch), f"{data}[{epoch}, {i}]")
        seen += 1
    assert seen == len(local)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_epoch_and_resumed_state_cover_every_example_once(
    make_cfg, shards: dict[str, Path], workers: int
) -> None:
    """The streamed train loader outside a fit (LitData's own epochs): one epoch yields every example once, with
    `workers` worker processes too; a loader stopped after 7 batches, its `state_dict` loaded into a new loader, yields
    exactly the examples the first had not; the next epoch is another order."""
    cfg = make_cfg(
        "data=vqa",
        "experiment=none",
        "data.batch_size=16",
        "data.batch_size_per_device=16",
        f"data.num_workers={workers}",
        "data.streaming=true",
        f"data.streaming_dir={shards['vqa']}",
    )
    dm = instantiate(cfg.data)
    dm.prepare_data()
    loader = dm.train_dataloader()
    assert len(loader) == 23  # 360 / 16
    epoch0 = [int(i) for batch in loader for i in batch["index"]]
    assert sorted(epoch0) == list(range(360))
    it = iter(loader)
    head = [int(i) for _, batch in zip(range(7), it) for i in batch["index"]]
    state = loader.state_dict()
    del it
    again = instantiate(cfg.data).train_dataloader()
    again.load_state_dict(state)
    tail = [int(i) for batch in again for i in batch["index"]]
    assert sorted(head + tail) == list(range(360))
    assert head != epoch0[: len(head)]  # epoch 1 is another order


def _fit(make_cfg, tmp_path: Path, name: str, *extra: str) -> dict[tuple[int, int], tuple[float, str]]:
    cfg = make_cfg(*RUN, *extra, f"+callbacks.record.path={tmp_path}/{name}", name=name)
    train(cfg)
    return _records(tmp_path / name)


def _records(path: Path, rank: int = 0) -> dict[tuple[int, int], tuple[float, str]]:
    """RecordLosses' file: {(epoch, batch): (loss, example indices)}."""
    out = {}
    file = Path(f"{path}.rank{rank}")
    for line in file.read_text().splitlines():
        epoch, batch, loss, ids = line.split()
        out[(int(epoch), int(batch))] = (float(loss), ids)
    return out


def test_streamed_fit_equals_the_lmdb_fit_in_index_order(make_cfg, shards: dict[str, Path], tmp_path: Path) -> None:
    """data=captions (MLM + ITM, whose negatives are drawn per epoch), shuffle off: 2 epochs x 3 steps read from the
    shards give the same batches and per-step losses (1e-6) as from the LMDB corpus."""
    common = ("data=captions", "data.shuffle=false", "trainer.max_epochs=2", "trainer.limit_train_batches=3")
    lmdb = _fit(make_cfg, tmp_path, "lmdb", *common)
    streamed = _fit(
        make_cfg, tmp_path, "streamed", *common, "data.streaming=true", f"data.streaming_dir={shards['captions']}"
    )
    assert sorted(lmdb) == [(e, b) for e in (0, 1) for b in range(3)]
    assert sorted(streamed) == sorted(lmdb)
    for key, (loss, ids) in lmdb.items():
        assert streamed[key][1] == ids, key
        assert streamed[key][0] == pytest.approx(loss, abs=1e-6, rel=1e-6), key
    assert lmdb[(0, 0)][1].startswith("0,1,2,3,")  # index order


@pytest.mark.parametrize("kill_batch", [3, 0])
def test_streamed_resume_continues_with_the_unseen_examples(
    make_cfg, shards: dict[str, Path], tmp_path: Path, kill_batch: int
) -> None:
    """Shuffled streaming, 5 of the epoch's 23 batches per epoch, last.ckpt after every step; a run killed before
    epoch 1 batch `kill_batch` and resumed from its last.ckpt trains the rest of epoch 1 on the examples (and with the
    losses) of an uninterrupted run: mid-epoch (3: LitData's saved position) and at the epoch boundary (0: the saved
    position is of the cut-short epoch 0, so epoch 1 starts afresh)."""
    common = (
        "data=vqa",
        "data.streaming=true",
        f"data.streaming_dir={shards['vqa']}",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=5",
        "+callbacks.last_checkpoint.every_n_train_steps=1",
    )
    straight = _fit(make_cfg, tmp_path, "straight", *common)
    first = make_cfg(
        *RUN,
        *common,
        f"+callbacks.record.path={tmp_path}/first",
        "+callbacks.kill._target_=tests.conftest.InterruptAt",
        "+callbacks.kill.epoch=1",
        f"+callbacks.kill.batch={kill_batch}",
        name="first",
    )
    with pytest.raises(Exception, match=f"interrupted before epoch 1 batch {kill_batch}"):
        train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = _fit(make_cfg, tmp_path, "resumed", *common, f"ckpt_path={last}")
    assert sorted(resumed) == [(1, b) for b in range(kill_batch, 5)]
    for key, (loss, ids) in resumed.items():
        assert ids == straight[key][1], key
        assert loss == pytest.approx(straight[key][0], abs=1e-6, rel=1e-6), key
    # shuffled: not index order, and epoch 1 differs from epoch 0
    assert straight[(0, 0)][1] != ",".join(map(str, range(16)))
    assert straight[(0, 0)][1] != straight[(1, 0)][1]
    assert read_losses(tmp_path / "first").keys() >= {(1, b) for b in range(kill_batch)}


def test_bad_shard_dir_is_one_error_naming_the_path_before_training(make_cfg, tmp_path: Path, data_dir: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}: data.streaming_dir does not exist"):
        train(make_cfg("experiment=none", "data=vqa", "data.streaming=true", f"data.streaming_dir={missing}"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty / META_FILE}: not found"):
        train(make_cfg("experiment=none", "data=vqa", "data.streaming=true", f"data.streaming_dir={empty}"))
    with pytest.raises(ConfigError, match="data.streaming=true needs data.streaming_dir"):
        train(make_cfg("experiment=none", "data=vqa", "data.streaming=true"))


def test_shards_of_another_corpus_or_split_are_refused(make_cfg, shards: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="written by vl.data.vqa.VQADataModule, this run reads .*CaptionsDataModule"):
        train(
            make_cfg("experiment=none", "data=captions", "data.streaming=true", f"data.streaming_dir={shards['vqa']}")
        )
    (shards["vqa"] / "val" / "index.json").rename(shards["vqa"] / "val" / "index.moved")
    try:
        dm = instantiate(make_cfg("data=vqa", "experiment=none").data)
        from vl.data.streaming import check_shards

        with pytest.raises(DataError, match=f"{shards['vqa'] / 'val' / 'index.json'}: not found"):
            check_shards(str(shards["vqa"]), "val", dm)
    finally:
        (shards["vqa"] / "val" / "index.moved").rename(shards["vqa"] / "val" / "index.json")
    chunk = sorted((shards["vqa"] / "val").glob("chunk-*.bin"))[-1]
    chunk.rename(chunk.with_suffix(".moved"))
    try:
        with pytest.raises(DataError, match=f"{chunk}: chunk file not found"):
            check_shards(str(shards["vqa"]), "val", dm)
    finally:
        chunk.with_suffix(".moved").rename(chunk)
    assert check_shards(str(shards["vqa"]), "val", dm)["num_examples"] == 45


def test_shard_tool_refuses_a_non_empty_dir(tmp_path: Path, capsys) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert shard_main(["--out", str(full), "data=vqa", f"paths.data_dir={tmp_path}/data"]) == 2
    assert f"error: {full}: the shard dir exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes_see_every_example_once_per_epoch(make_cfg, shards: dict[str, Path], tmp_path: Path) -> None:
    """hardware=ddp_cpu (2 spawned gloo processes), shuffled streaming, 2 full epochs: per epoch the two ranks' batches
    together hold every train example exactly once (360 examples = 2 ranks x 10 batches x 18)."""
    _fit(
        make_cfg,
        tmp_path,
        "ddp",
        "data=vqa",
        "hardware=ddp_cpu",
        "data.streaming=true",
        f"data.streaming_dir={shards['vqa']}",
        "trainer.max_epochs=2",
        "data.batch_size=36",
        "data.batch_size_per_device=18",
    )
    ranks = [_records(tmp_path / "ddp", rank) for rank in (0, 1)]
    assert all(len(rank) == 20 for rank in ranks)  # 2 epochs x 10 batches per rank
    assert {len(ids.split(",")) for rank in ranks for _, ids in rank.values()} == {18}
    for epoch in (0, 1):
        seen = [int(i) for rank in ranks for (e, _), (_, ids) in rank.items() if e == epoch for i in ids.split(",")]
        assert sorted(seen) == list(range(360)), epoch
    assert ranks[0][(0, 0)][1] != ranks[1][(0, 0)][1]


def test_image_shards_hold_the_jpeg_bytes_and_give_the_same_pixels(make_cfg, tmp_path: Path, data_dir: Path) -> None:
    """data=clip_vil_vqa: a record holds the image file's bytes (not decoded pixels); decoded and transformed after
    the read they are the pixels the local corpus gives, and so is every other field."""
    import litdata
    import torch

    out = _shard(tmp_path / "pixels", data_dir, "clip_vil_vqa")
    dm = instantiate(make_cfg("data=clip_vil_vqa", "experiment=none").data)
    dm.setup("fit")
    local = dm.datasets["train"]
    finisher = dm.stream_finisher("train", {"num_answers": len(dm.ans2label)})
    streamed = litdata.StreamingDataset(str(out / "train"))
    assert len(streamed) == len(local)
    for i, raw in enumerate(streamed):
        record = decode(raw)
        assert record["image_bytes"] == local.images.path(record["img_id"]).read_bytes()
        a, b = local[(0, i)], finisher.finish(record, 0)
        assert a.keys() == b.keys()
        assert torch.equal(a.pop("pixels"), b.pop("pixels")), i
        _assert_same(a, b, f"clip_vil_vqa[{i}]")


@pytest.mark.slow  # keeps the default tier lean: a fit + an evaluate / two pixel fits
def test_streamed_pixel_fit_equals_the_local_one(make_cfg, tmp_path: Path, data_dir: Path) -> None:
    """experiment=clip_vil_vqa_tiny in index order (no shuffle, no aspect grouping): 2 steps from JPEG shards give the
    local corpus's batches and losses (1e-6)."""
    out = _shard(tmp_path / "pixels", data_dir, "clip_vil_vqa")
    common = (
        "experiment=clip_vil_vqa_tiny",
        "data.corpus.num_images=150",
        "data.num_workers=0",
        "data.shuffle=false",
        "data.group_by_aspect=false",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.deterministic=true",
        "test=false",
        "+callbacks.record._target_=tests.conftest.RecordLosses",
    )
    runs = {}
    for name, extra in (("local", ()), ("streamed", ("data.streaming=true", f"data.streaming_dir={out}"))):
        train(make_cfg(*common, *extra, f"+callbacks.record.path={tmp_path}/{name}", name=name))
        runs[name] = _records(tmp_path / name)
    assert sorted(runs["local"]) == [(0, 0), (0, 1)]
    assert runs["streamed"].keys() == runs["local"].keys()
    for key, (loss, ids) in runs["local"].items():
        assert runs["streamed"][key][1] == ids, key
        assert runs["streamed"][key][0] == pytest.approx(loss, abs=1e-6, rel=1e-6), key


def test_object_store_side_file_goes_through_litdata_storage_client(
    make_cfg, shards: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """An `s3://` shard dir: the side file is written and read with LitData's own storage client (here a fake one on
    a local dir; no object store is reachable from the tests), the chunks are LitData's to fetch."""
    import shutil

    import litdata.streaming.fs_provider as fs

    from vl.data.streaming import _write_text, check_shards

    bucket = tmp_path / "bucket"

    class Fake:
        def upload_file(self, local: str, remote: str) -> None:
            target = bucket / remote.removeprefix("s3://")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(local, target)

        def download_file(self, remote: str, local: str) -> None:
            source = bucket / remote.removeprefix("s3://")
            if not source.is_file():
                raise FileNotFoundError(remote)
            shutil.copy(source, local)

    monkeypatch.setattr(fs, "_get_fs_provider", lambda path, storage_options={}: Fake())
    dm = instantiate(make_cfg("data=vqa", "experiment=none").data)
    with pytest.raises(DataError, match="s3://b/none/vl_shards.json: cannot read the shard side file"):
        check_shards("s3://b/none", "train", dm)
    _write_text(f"s3://b/vqa/{META_FILE}", (shards["vqa"] / META_FILE).read_text())
    assert check_shards("s3://b/vqa", "train", dm)["num_examples"] == 360


def test_a_corpus_that_cannot_stream_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A dataset without `record` / `finish` / `stream_context`, or a module without `stream_finisher`: one
    ConfigError naming the class, and no shard dir."""
    from torch.utils.data import Dataset

    from vl.data.base import VLDataModule
    from vl.data.streaming import write_shards

    class Plain(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, key):
            return {"text": "a"}

    class Streamable(Plain):
        def record(self, index: int) -> dict:
            return {"text": "a", "index": index}

        def finish(self, record: dict, epoch: int) -> dict:
            return record | {"epoch": epoch}

        def stream_context(self) -> dict:
            return {}

    for dataset, match in ((Plain(), "its dataset Plain has no record, finish, stream_context"),
                           (Streamable(), "Module does not read streaming shards")):  # fmt: skip

        class Module(VLDataModule):
            def build_dataset(self, split: str, dataset=dataset):
                return dataset

        with pytest.raises(ConfigError, match=match):
            write_shards(Module(root=str(tmp_path)), str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()


@pytest.mark.slow  # keeps the default tier lean: a fit + an evaluate / two pixel fits
def test_a_streamed_run_evaluates_without_its_shards(make_cfg, shards: dict[str, Path], tmp_path: Path) -> None:
    """evaluate.py on a streamed run's checkpoint: val / test come from the local corpus, so it gives the training
    run's test metrics with the shard dir gone."""
    import shutil

    from vl.pipeline import evaluate

    copy = tmp_path / "shards"
    shutil.copytree(shards["vqa"], copy)
    cfg = make_cfg(
        "experiment=none",
        "data=vqa",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=2",
        "data.streaming=true",
        f"data.streaming_dir={copy}",
    )
    metrics, _ = train(cfg)
    shutil.rmtree(copy)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    again = evaluate(make_cfg(f"ckpt_path={ckpt}", name="eval", config_name="evaluate"))
    assert again["test/vqa_acc"] == pytest.approx(metrics["test/vqa_acc"], abs=1e-6)
