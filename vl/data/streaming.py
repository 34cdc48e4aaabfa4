"""Streaming shards: a corpus's examples as LitData chunks (`python -m vl.tools.shard`), read back with LitData's
`StreamingDataset` / `StreamingDataLoader` when `data.streaming=true`.

What a shard holds is the deterministic part of an example, the dataset's `record(index)` (text, ids, labels, region
features, ...). What changes from epoch to epoch (an ITM negative caption, ...) is not in the shard: the dataset's
`finish(record, epoch)` draws it after the read, from (seed, epoch, index) as for the local corpus, so a streamed run
sees the same examples as the LMDB one. A dataset class is streamable when it has `record`, `finish` and
`stream_context` (the small JSON side data `finish` needs, e.g. the caption list ITM draws negatives from), and its
data module implements `stream_finisher(split, context)`.

Layout of a shard dir (local, or an object-store URL LitData reads: `s3://bucket/vqa`, `gs://...`)::

    <dir>/vl_shards.json      which data module wrote it, and per split: number of examples, the finisher's context
    <dir>/<split>/index.json  LitData's index, and its chunk files

The training split is read with per-rank and per-worker splits and shuffling (LitData's, seeded with the run's seed),
and the loader's position (LitData's `state_dict`) is saved in every checkpoint, so a resumed fit continues with the
examples not yet seen. Under DDP LitData drops the tail that does not divide evenly over the ranks (its `drop_last`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import litdata.helpers
import numpy as np
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.serializers import Serializer

from vl.data.samplers import global_seed
from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# LitData asks PyPI for a newer release whenever a dataset or `optimize` starts (a 30 s timeout per process on a node
# without internet); a training run makes no network call it does not need.
litdata.helpers._get_newer_version = lambda current: None

__all__ = [
    "META_FILE",
    "StreamedExamples",
    "StreamingTrainLoader",
    "check_shards",
    "decode",
    "encode",
    "streaming_train_loader",
    "write_shards",
]

META_FILE = "vl_shards.json"
FORMAT = 1
_NONE_KEY = "__none__"  # names of the keys whose value was None (LitData stores no None)


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    """`root/parts` for a local path or a URL."""
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return str(Path(root).expanduser().joinpath(*parts))


def encode(example: dict[str, Any]) -> dict[str, Any]:
    """An example dict -> what LitData stores: None values dropped (their keys listed under `__none__`), nested
    dicts (the `visual` reader dict) likewise; `epoch` is not part of a record."""
    out: dict[str, Any] = {}
    nones = []
    for key, value in example.items():
        if key == "epoch":
            continue
        if value is None:
            nones.append(key)
        elif isinstance(value, dict):
            out[key] = encode(value)
        else:
            out[key] = value
    out[_NONE_KEY] = ",".join(nones)
    return out


def decode(record: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `encode` (LitData reads Python ints / floats / bools back as NumPy scalars: made Python again)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == _NONE_KEY:
            continue
        if isinstance(value, dict):
            value = decode(value)
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray) and not value.flags.writeable:  # a view of the chunk's bytes
            value = value.copy()
        out[key] = value
    for key in filter(None, str(record.get(_NONE_KEY, "")).split(",")):
        out[key] = None
    return out


#: LitData field formats a vl shard may hold (the part before ':'); no pickle: a loaded file may not run code
SAFE_FORMATS = ("str", "bool", "int", "float", "bytes", "numpy", "no_header_numpy")


class _Refused(Serializer):
    """In place of LitData's pickle / file serializers when reading: a field stored that way is an error."""

    def __init__(self, name: str) -> None:
        self.name = name

    def serialize(self, item: Any) -> Any:
        raise DataError(f"a shard field of type {type(item).__name__} would be stored as {self.name}; vl refuses it")

    def deserialize(self, data: bytes) -> Any:
        raise DataError(f"a shard field is stored as {self.name} (which could run code when read); vl refuses it")

    def can_serialize(self, item: Any) -> bool:
        return False


def _safe_serializers() -> dict[str, Serializer]:
    return {name: _Refused(name) for name in ("pickle", "file")}


def _check_index(index: Path, num_examples: Any) -> None:
    """A local split's LitData index: only safe field formats, every chunk file present, as many examples as the
    side file says (a half-written or half-copied shard dir fails here, not mid-epoch)."""
    try:
        content = json.loads(index.read_text())
        formats, chunks = content["config"]["data_format"], content["chunks"]
        files, total = [str(c["filename"]) for c in chunks], sum(int(c["chunk_size"]) for c in chunks)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{index}: not a LitData index ({type(err).__name__}: {err})") from None
    bad = [f for f in formats if str(f).split(":")[0] not in SAFE_FORMATS]
    if bad:
        raise DataError(f"{index}: field format {bad[0]!r} is not one vl reads (only {', '.join(SAFE_FORMATS)})")
    missing = next((name for name in files if not (index.parent / name).is_file()), None)
    if missing is not None:
        raise DataError(f"{index.parent / missing}: chunk file not found (listed in {index.name})")
    if total != num_examples:
        raise DataError(f"{index}: holds {total} examples, {META_FILE} says {num_examples}")


def _streamable(dataset: Any, where: str) -> None:
    missing = [name for name in ("record", "finish", "stream_context") if not callable(getattr(dataset, name, None))]
    if missing:
        raise ConfigError(
            f"{where}: its dataset {type(dataset).__name__} has no {', '.join(missing)}; streaming needs a dataset "
            "that splits an example into a stored record and a per-epoch finish (vl.data.streaming)"
        )


class _Records:
    """`litdata.optimize`'s function: example index -> encoded record (picklable: the dataset's readers reopen)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __call__(self, index: int) -> dict[str, Any]:
        record = encode(self.dataset.record(index))
        _check_leaves(record, f"{type(self.dataset).__name__}.record({index})")
        return record


_LEAVES = (str, bool, int, float, bytes, np.ndarray)


def _check_leaves(record: dict[str, Any], where: str) -> None:
    """Only what LitData stores without pickle: str, bool, int, float, bytes, NumPy arrays (numeric), nested dicts."""
    for key, value in record.items():
        if isinstance(value, dict):
            _check_leaves(value, f"{where}.{key}")
        elif not isinstance(value, _LEAVES) or isinstance(value, np.ndarray) and value.dtype == object:
            raise DataError(
                f"{where}: field {key!r} is a {type(value).__name__}; a shard stores str, int, float, "
                "bool, bytes or numeric arrays"
            )


def _module_path(dm: Any) -> str:
    return f"{type(dm).__module__}.{type(dm).__qualname__}"


def check_output_dir(output_dir: str) -> None:
    """A local shard dir must be new or empty (LitData would refuse it half-way, or mix two corpora)."""
    if not is_remote(output_dir):
        out = Path(output_dir).expanduser()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DataError(f"{out}: the shard dir exists and is not empty; remove it or choose another --out")


def write_shards(
    dm: Any,
    output_dir: str,
    *,
    splits: tuple[str, ...] = ("train",),
    chunk_bytes: str | int = "64MB",
    num_workers: int = 1,
    compression: str | None = None,
) -> dict[str, Any]:
    """Write `splits` of the data module `dm` as LitData chunks under `output_dir/<split>` with `litdata.optimize`
    (examples in index order: one worker keeps the order, more workers write their own chunks), then the
    `vl_shards.json` side file. `output_dir` may be an object-store URL (`s3://`, `gs://`: LitData uploads the
    chunks and, with the same client, the side file). Returns the side file's content."""
    import litdata

    check_output_dir(output_dir)
    meta: dict[str, Any] = {"format": FORMAT, "data": _module_path(dm), "splits": {}}
    for split in splits:
        dm.setup({"train": "fit", "val": "validate"}.get(split, "test"))
        dataset = dm.datasets[split]
        _streamable(dataset, f"{_module_path(dm)} split {split}")
        n = len(dataset)
        if n == 0:
            raise DataError(f"{dm.root}: split {split} has no examples to shard")
        context = dataset.stream_context()
        dm.stream_finisher(split, context)  # the module reads them back (a ConfigError otherwise), before any write
        litdata.optimize(
            fn=_Records(dataset),
            inputs=list(range(n)),
            output_dir=join(output_dir, split),
            chunk_bytes=chunk_bytes,
            num_workers=num_workers,
            compression=compression,
            reorder_files=False,
            start_method="fork" if sys.platform.startswith("linux") else None,
        )
        meta["splits"][split] = {"num_examples": n, "context": context}
    _write_text(join(output_dir, META_FILE), json.dumps(meta))
    return meta


def _write_text(path: str, text: str) -> None:
    """A local file, or an object (`s3://`, `gs://`) through LitData's own storage client (boto3 / gcs)."""
    if not is_remote(path):
        Path(path).write_text(text)
        return
    import tempfile

    from litdata.streaming.fs_provider import _get_fs_provider

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / META_FILE
        local.write_text(text)
        _get_fs_provider(path).upload_file(str(local), path)


def _read_text(path: str) -> str:
    if not is_remote(path):
        return Path(path).read_text()
    import tempfile

    from litdata.streaming.fs_provider import _get_fs_provider

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / META_FILE
        _get_fs_provider(path).download_file(path, str(local))
        return local.read_text()


def check_shards(root: str | None, split: str, dm: Any) -> dict[str, Any]:
    """The side file's entry for `split`, after checking that `root` is a shard dir of `dm`'s data module holding
    `split`: one DataError naming the path otherwise (before any compute). For an object-store URL only the side
    file is read (the chunks are LitData's to fetch)."""
    if not root:
        raise ConfigError("data.streaming=true needs data.streaming_dir (a dir written by python -m vl.tools.shard)")
    meta_path = join(root, META_FILE)
    if not is_remote(root):
        base = Path(root).expanduser()
        if not base.is_dir():
            raise DataError(f"{base}: data.streaming_dir does not exist or is not a directory")
        if not Path(meta_path).is_file():
            raise DataError(f"{meta_path}: not found; data.streaming_dir must be written by python -m vl.tools.shard")
        index = base / split / "index.json"
        if not index.is_file():
            raise DataError(f"{index}: not found; the shard dir holds no {split} split (python -m vl.tools.shard)")
    try:
        meta = json.loads(_read_text(meta_path))
    except Exception as err:  # noqa: BLE001  (any storage client's error: one line naming the file)
        raise DataError(f"{meta_path}: cannot read the shard side file ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("splits"), dict):
        raise DataError(f"{meta_path}: not a vl shard side file (format {FORMAT})")
    if meta.get("data") != _module_path(dm):
        raise DataError(
            f"{meta_path}: the shards were written by {meta.get('data')}, this run reads {_module_path(dm)}"
        )
    if split not in meta["splits"]:
        raise DataError(f"{meta_path}: no {split} split in the shards (it has {', '.join(meta['splits'])})")
    if not is_remote(root):
        _check_index(Path(root).expanduser() / split / "index.json", meta["splits"][split].get("num_examples"))
    return meta["splits"][split]


class StreamedExamples(StreamingDataset):
    """LitData's `StreamingDataset` whose items are finished examples: the stored record, decoded, through the data
    module's finisher at this epoch (LitData counts epochs from 1, Lightning from 0)."""

    def __init__(self, input_dir: str, finisher: Any, **kwargs: Any) -> None:
        super().__init__(input_dir, **kwargs)
        self.finisher = finisher

    def __getitem__(self, index: Any) -> Any:
        record = super().__getitem__(index)
        if isinstance(record, list):  # a slice
            return [self.finisher.finish(decode(r), self.current_epoch - 1) for r in record]
        return self.finisher.finish(decode(record), self.current_epoch - 1)


class StreamingTrainLoader(StreamingDataLoader):
    """LitData's `StreamingDataLoader` as a `vl` training loader: its `state_dict` (epoch, examples yielded, LitData's
    dataset state) goes into the checkpoint through Lightning's fit loop like `ResumableDataLoader`'s, and
    `load_state_dict` (called by `VLSystem.on_train_start`) continues mid-epoch. A state of another loader (an LMDB
    run's checkpoint), another world size or per-device batch restarts the epoch with a warning; the same state
    applied twice is applied once."""

    def __init__(self, *args: Any, epoch_fn: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._applied: dict[str, Any] | None = None
        self.epoch_fn = epoch_fn  # -> the trainer's epoch (0-based), or None outside a fit

    def __iter__(self) -> Any:
        """LitData counts its own epochs (one per `iter`); under a trainer its epoch is kept at the trainer's + 1, so
        an epoch cut short (`limit_train_batches`, a checkpoint at an epoch end) does not shift the later epochs'
        order or draws, and a saved position of another epoch than the one starting is not resumed."""
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        if epoch is not None:
            if self.restore and self.current_epoch != epoch + 1:
                self.restore = False
            if not self.restore:
                self.current_epoch = epoch  # LitData's __iter__ adds 1
        yield from super().__iter__()

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if obj == self._applied:
            return
        dataset_state = obj.get("dataset") if isinstance(obj, dict) else None
        if not isinstance(dataset_state, dict) or "num_samples_yielded" not in obj:
            log.warning("resume: the checkpoint's loader position is not a streaming one; the epoch restarts")
            return
        saved = (int(dataset_state.get("batch_size", 0)), int(dataset_state.get("world_size", 0)))
        now = (int(self.batch_size or 1), int(self.dataset.distributed_env.world_size))
        if saved != now:
            log.warning(
                "resume: the checkpoint's streaming position is for per-device batch %d x %d processes, this run has "
                "%d x %d; epoch %s restarts at its first batch",
                *saved,
                *now,
                obj.get("current_epoch"),
            )
            return
        super().load_state_dict(obj)
        self._applied = obj


def streaming_train_loader(dm: Any) -> Any:
    """The training loader of `dm` (a `VLDataModule` with `streaming=true`): its shards' train split through LitData,
    shuffled per epoch (`data.shuffle`) with the run's seed, this rank's share (LitData detects the process group)."""
    entry = check_shards(dm.streaming_dir, "train", dm)
    finisher = dm.stream_finisher("train", entry.get("context") or {})
    dataset = StreamedExamples(
        join(dm.streaming_dir, "train"),
        finisher,
        shuffle=bool(dm.shuffle),
        seed=global_seed(),
        serializers=_safe_serializers(),
    )
    return StreamingTrainLoader(
        dataset,
        batch_size=dm.batch_size_per_device,
        num_workers=dm.num_workers,
        collate_fn=dm.loader_collate(dm.collator("train")),
        pin_memory=dm.pin_memory,
        epoch_fn=lambda: dm.trainer.current_epoch if dm.trainer is not None else None,
    )
