"""Region-feature LMDB and CLIP HDF5 readers: round trips, errors that name the file, pickling, DataLoader workers."""

from __future__ import annotations

import base64
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from vl.data.features import ClipFeatureReader, RegionFeatureReader, write_clip_hdf5, write_region_lmdb
from vl.errors import DataError


def _records(n_images: int = 6, dim: int = 12, classes: int = 5) -> list[dict]:
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n_images):
        n = int(rng.integers(1, 5))
        xy = rng.uniform(0, 40, (n, 2))
        recs.append(
            {
                "image_id": 500 + i if i % 2 else f"img-{i}",
                "image_w": 80,
                "image_h": 60,
                "boxes": np.concatenate([xy, xy + rng.uniform(1, 20, (n, 2))], 1),
                "features": rng.standard_normal((n, dim)).astype(np.float32),
                "cls_prob": rng.dirichlet(np.ones(classes), n).astype(np.float32) if i != 3 else None,
            }
        )
    return recs


@pytest.fixture()
def lmdb_path(tmp_path: Path) -> Path:
    path = tmp_path / "feats.lmdb"
    assert write_region_lmdb(path, iter(_records()), map_size=1 << 20) == 6
    return path


@pytest.fixture()
def h5_path(tmp_path: Path) -> Path:
    path = tmp_path / "clip.hdf5"
    feats = np.random.default_rng(1).standard_normal((7, 10)).astype(np.float32)
    write_clip_hdf5(path, [10, 11, 12, "abc", 14, 15, 1000000], feats)
    return path


def _raw_lmdb(path: Path, entries: dict[bytes, bytes]) -> None:
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 20, subdir=True)
    with env.begin(write=True) as txn:
        for k, v in entries.items():
            txn.put(k, v)
    env.close()


# ------------------------------------------------------------------------------------------------------------- LMDB


def test_region_lmdb_round_trip(lmdb_path: Path) -> None:
    recs = _records()
    reader = RegionFeatureReader(lmdb_path)
    assert reader.ids() == [str(r["image_id"]) for r in recs] and len(reader) == 6
    assert "img-0" in reader and 501 in reader and "nope" not in reader and "keys" not in reader
    for r in recs:
        got = reader[r["image_id"]]
        np.testing.assert_array_equal(got["features"], r["features"])
        np.testing.assert_array_equal(got["boxes"], r["boxes"].astype(np.float32))
        if r["cls_prob"] is None:
            assert got["cls_prob"] is None
        else:
            np.testing.assert_array_equal(got["cls_prob"], r["cls_prob"])
        assert got["num_boxes"] == len(r["boxes"]) and (got["image_w"], got["image_h"]) == (80, 60)
        bn = got["boxes_norm"]
        assert bn.dtype == np.float32 and bn.min() >= 0 and bn.max() <= 1
        np.testing.assert_allclose(bn[:, 0], np.clip(r["boxes"][:, 0] / 80, 0, 1), rtol=1e-6)
        got["features"][0, 0] = 1.0  # writable


def test_region_lmdb_raw_record_layout(lmdb_path: Path) -> None:
    import lmdb

    env = lmdb.open(str(lmdb_path), readonly=True, lock=False)
    with env.begin() as txn:
        keys = pickle.loads(txn.get(b"keys"))
        rec = pickle.loads(txn.get(b"501"))
    env.close()
    assert keys[:2] == [b"img-0", b"501"]
    assert set(rec) == {"image_id", "image_h", "image_w", "num_boxes", "boxes", "features", "cls_prob"}
    n = rec["num_boxes"]
    assert np.frombuffer(base64.b64decode(rec["features"]), np.float32).reshape(n, 12).shape == (n, 12)


def test_region_missing_path_and_id(tmp_path: Path, lmdb_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.lmdb"):
        RegionFeatureReader(tmp_path / "nowhere.lmdb")
    reader = RegionFeatureReader(lmdb_path)
    with pytest.raises(DataError, match=r"feats\.lmdb: no image id '123'"):
        reader[123]
    with pytest.raises(DataError, match="no image id 'keys'"):
        reader["keys"]


def test_region_corrupt_records(tmp_path: Path) -> None:
    path = tmp_path / "bad.lmdb"
    good = {"image_id": 1, "image_h": 10, "image_w": 10, "num_boxes": 2}
    feats = base64.b64encode(np.zeros((2, 3), np.float32).tobytes())
    boxes = base64.b64encode(np.zeros((2, 4), np.float32).tobytes())
    _raw_lmdb(
        path,
        {
            b"keys": pickle.dumps([b"1", b"2", b"3", b"4", b"5"]),
            b"1": pickle.dumps({**good, "boxes": boxes, "features": feats})[:-20],  # truncated pickle
            b"2": pickle.dumps({**good, "boxes": boxes, "features": feats[:-5]}),  # truncated base64
            b"3": pickle.dumps({**good, "boxes": boxes, "features": feats[:-4]}),  # 21 bytes: not whole float32s
            b"4": pickle.dumps({**good, "boxes": boxes[:-16], "features": feats}),  # boxes not (2,4)
            b"5": pickle.dumps({**good, "boxes": boxes}),  # no features
        },
    )
    reader = RegionFeatureReader(path)
    for image_id in ("1", "2", "3", "4", "5"):
        with pytest.raises(DataError) as e:
            reader[image_id]
        assert "bad.lmdb" in str(e.value) and f"'{image_id}'" in str(e.value), str(e.value)


def test_region_corrupt_lmdb_files(tmp_path: Path, lmdb_path: Path) -> None:
    not_lmdb = tmp_path / "text.lmdb"
    not_lmdb.write_text("hello, I am not an LMDB\n" * 500)
    with pytest.raises(DataError, match="text.lmdb"):
        RegionFeatureReader(not_lmdb).ids()
    empty_dir = tmp_path / "empty.lmdb"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="empty.lmdb"):
        len(RegionFeatureReader(empty_dir))
    data = lmdb_path / "data.mdb"
    raw = data.read_bytes()
    data.write_bytes(b"\x00" * 8192 + raw[8192:])
    with pytest.raises(DataError, match="feats.lmdb"):
        RegionFeatureReader(lmdb_path)["501"]
    data.write_bytes(raw[: len(raw) // 2])  # truncated: must not crash the process (SIGBUS)
    with pytest.raises(DataError, match="feats.lmdb.*truncated"):
        RegionFeatureReader(lmdb_path)["501"]


def test_region_writer_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "atomic.lmdb"

    def broken():
        yield from _records(3)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_region_lmdb(path, broken())
    assert not path.exists() and list(tmp_path.iterdir()) == []
    write_region_lmdb(path, _records(2))
    write_region_lmdb(path, _records(4))  # replaces
    assert len(RegionFeatureReader(path)) == 4
    with pytest.raises(ValueError):
        write_region_lmdb(tmp_path / "dup.lmdb", _records(2) + _records(1))


def test_region_writer_grows_map(tmp_path: Path) -> None:
    recs = _records(20, dim=4096)
    write_region_lmdb(tmp_path / "grow.lmdb", recs, map_size=1 << 16, commit_every=4)
    reader = RegionFeatureReader(tmp_path / "grow.lmdb")
    np.testing.assert_array_equal(reader[recs[-1]["image_id"]]["features"], recs[-1]["features"])


# ------------------------------------------------------------------------------------------------------------- HDF5


def test_clip_round_trip(h5_path: Path) -> None:
    feats = np.random.default_rng(1).standard_normal((7, 10)).astype(np.float32)
    for in_memory in (None, False, True):
        reader = ClipFeatureReader(h5_path, in_memory=in_memory)
        assert reader.ids() == ["10", "11", "12", "abc", "14", "15", "1000000"]
        assert len(reader) == 7 and reader.dim == 10 and 12 in reader and "13" not in reader
        for i, key in enumerate(reader.ids()):
            got = reader[key]
            assert got.shape == (10,) and got.dtype == np.float32
            np.testing.assert_array_equal(got, feats[i])
        np.testing.assert_array_equal(reader[1000000], feats[6])
        with pytest.raises(DataError, match=r"clip\.hdf5: no image id '13'"):
            reader[13]
        reader.close()
    import h5py

    with h5py.File(h5_path, "r") as f:
        assert f["ids"].dtype == np.dtype("S7") and f["ids"].shape == (7,)


def test_clip_errors_name_file_and_field(tmp_path: Path, h5_path: Path) -> None:
    import h5py

    with pytest.raises(DataError, match="missing.hdf5"):
        ClipFeatureReader(tmp_path / "missing.hdf5")
    text = tmp_path / "text.hdf5"
    text.write_text("not hdf5")
    with pytest.raises(DataError, match="text.hdf5"):
        ClipFeatureReader(text)["1"]
    truncated = tmp_path / "trunc.hdf5"
    truncated.write_bytes(h5_path.read_bytes()[:600])
    with pytest.raises(DataError, match="trunc.hdf5"):
        ClipFeatureReader(truncated)["10"]
    no_ids = tmp_path / "noids.hdf5"
    with h5py.File(no_ids, "w") as f:
        f["features"] = np.zeros((3, 4), np.float32)
    with pytest.raises(DataError, match=r"noids.hdf5: missing dataset 'ids'"):
        len(ClipFeatureReader(no_ids))
    mismatch = tmp_path / "mismatch.hdf5"
    with h5py.File(mismatch, "w") as f:
        f["features"] = np.zeros((3, 4), np.float32)
        f["ids"] = np.array([b"1", b"2"])
    with pytest.raises(DataError, match=r"mismatch.hdf5: dataset 'ids'.*3 rows"):
        _ = ClipFeatureReader(mismatch).dim
    one_d = tmp_path / "oned.hdf5"
    with h5py.File(one_d, "w") as f:
        f["features"] = np.zeros((3,), np.float32)
        f["ids"] = np.array([b"1", b"2", b"3"])
    with pytest.raises(DataError, match=r"oned.hdf5: dataset 'features'"):
        ClipFeatureReader(one_d)["1"]


def test_clip_writer_is_atomic(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_clip_hdf5(tmp_path / "x.hdf5", ["1", "2"], np.zeros((3, 4)))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- pickling and workers


def test_readers_pickle_without_handles(lmdb_path: Path, h5_path: Path) -> None:
    regions, clip = RegionFeatureReader(lmdb_path), ClipFeatureReader(h5_path, in_memory=False)
    a, b = regions["501"], clip["10"]
    regions2, clip2 = pickle.loads(pickle.dumps(regions)), pickle.loads(pickle.dumps(clip))
    assert regions2._env is None and clip2._file is None and clip2._features is None
    np.testing.assert_array_equal(regions2["501"]["features"], a["features"])
    np.testing.assert_array_equal(clip2["10"], b)
    # a handle from another process id is not reused
    regions2._pid = -1
    np.testing.assert_array_equal(regions2["501"]["features"], a["features"])
    assert regions2._pid == os.getpid()


def _as_list(batch: list) -> list:
    return batch


class _PairDataset:
    def __init__(self, regions: RegionFeatureReader, clip: ClipFeatureReader, ids: list[str]) -> None:
        self.regions, self.clip, self.ids = regions, clip, ids
        self.clip_ids = clip.ids()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        import torch

        rec = self.regions[self.ids[i]]
        return {
            "pid": os.getpid(),
            "sum": torch.tensor(float(rec["features"].sum())),
            "clip": torch.from_numpy(self.clip[self.clip_ids[i % len(self.clip_ids)]]),
        }


def test_readers_in_dataloader_workers(lmdb_path: Path, h5_path: Path) -> None:
    import torch

    regions, clip = RegionFeatureReader(lmdb_path), ClipFeatureReader(h5_path, in_memory=False)
    ids = regions.ids() * 4
    regions[ids[0]], clip["10"]  # open handles in the parent before the workers fork
    ds = _PairDataset(regions, clip, ids)
    expected = [float(regions[k]["features"].sum()) for k in ids]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=_as_list)
    items = [x for batch in loader for x in batch]
    assert [float(x["sum"]) for x in items] == pytest.approx(expected)
    for i, x in enumerate(items):
        np.testing.assert_array_equal(x["clip"].numpy(), clip[clip.ids()[i % 7]])
    assert {x["pid"] for x in items} - {os.getpid()}
    assert regions._pid == os.getpid()


def test_readers_in_spawned_workers(lmdb_path: Path, h5_path: Path) -> None:
    import torch

    regions, clip = RegionFeatureReader(lmdb_path), ClipFeatureReader(h5_path)
    ids = regions.ids()
    expected = [float(regions[k]["features"].sum()) for k in ids]
    loader = torch.utils.data.DataLoader(
        _PairDataset(regions, clip, ids), num_workers=2, collate_fn=_as_list, multiprocessing_context="spawn"
    )
    assert [float(x["sum"]) for batch in loader for x in batch] == pytest.approx(expected)


def test_two_readers_share_one_environment(lmdb_path: Path) -> None:
    a, b = RegionFeatureReader(lmdb_path), RegionFeatureReader(lmdb_path)
    np.testing.assert_array_equal(a["501"]["features"], b["501"]["features"])
    a.close()
    assert len(b) == 6 and b["503"]["num_boxes"] >= 1
    assert a["501"]["num_boxes"] >= 1  # reopens after close
    b.close()
    a.close()


def test_the_decoded_item_cache_returns_the_files_values_read_only_within_its_budget(lmdb_path: Path) -> None:
    from vl.data.features.cache import CachedRegions, cached

    reader = RegionFeatureReader(lmdb_path)
    ids = reader.ids()
    sizes = [sum(v.nbytes for v in reader[i].values() if isinstance(v, np.ndarray)) + 256 for i in ids]
    budget = sum(sorted(sizes)[:3])  # room for at most 3 of the 6 images
    cache = CachedRegions(RegionFeatureReader(lmdb_path), max_bytes=budget)
    for sid in ids + ids[::-1] + ids:
        got, want = cache[sid], reader[sid]
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(got[key], value)
            else:
                assert got[key] == value
        with pytest.raises(ValueError, match="read-only"):  # a consumer writing into its item fails, changing nothing
            got["features"][:] = -1.0
        got.pop("features")  # its dict is its own
    np.testing.assert_array_equal(cache[ids[-1]]["features"], reader[ids[-1]]["features"])
    assert cache.hits > 0 and cache._bytes <= budget and 1 <= len(cache._items) <= 3
    assert ids[0] in cache and "nope" not in cache and len(cache) == len(reader) and cache.path == reader.path
    fresh = pickle.loads(pickle.dumps(cache))  # a DataLoader worker starts empty
    assert len(fresh._items) == 0 and fresh.max_bytes == cache.max_bytes
    np.testing.assert_array_equal(fresh[ids[1]]["boxes"], reader[ids[1]]["boxes"])
    assert cached(reader, 0) is reader
    with pytest.raises(DataError, match="no image id"):
        cache["nope"]
