"""Worker batches through reused shared-memory slots (`vl.data.transport`): the same batches as PyTorch's own path,
bit for bit, whatever the consumer keeps; a slot is written again only once nothing holds its batch."""

from __future__ import annotations

import gc
import io
import pickle
from collections import OrderedDict
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor reducers with ForkingPickler)
from torch.utils.data import DataLoader, Dataset

from vl.data.transport import SlotCollate, worker_collate


class _Items(Dataset):
    def __len__(self) -> int:
        return 23

    def __getitem__(self, i: int) -> int:
        return i


def _collate(items: list[int]) -> dict:
    """Every kind of value a batch holds: float / long / bool / bf16 tensors of varying shape, a 0-dim and an empty
    tensor, one tensor under two keys, a non-contiguous one, strings and a nested dict."""
    g = torch.Generator().manual_seed(sum(items) * 7 + len(items))
    n = 1 + sum(items) % 4  # the padded length varies from batch to batch
    feats = torch.randn(len(items), n, 5, generator=g)
    return {
        "visual_feats": feats,
        "region_feat_targets": feats,
        "input_ids": torch.tensor(items) * 3,
        "mask": torch.rand(len(items), n, generator=g) > 0.5,
        "half": torch.randn(len(items), 3, generator=g).to(torch.bfloat16),
        "transposed": torch.randn(3, len(items), generator=g).t(),
        "scalar": torch.tensor(float(sum(items))),
        "empty": torch.zeros(len(items), 0),
        "ids": [f"item{i}" for i in items],
        "nested": {"t": torch.tensor(items)},
    }


def _ordered_collate(items: list[int]) -> OrderedDict:
    return OrderedDict(_collate(items))


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            assert torch.equal(a[key]["t"], b[key]["t"])
        else:
            assert a[key] == b[key], key


def _loader(collate, workers: int = 2, **kwargs) -> DataLoader:
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0)).tolist()  # the same in both processes
    return DataLoader(
        _Items(), batch_size=4, sampler=order, num_workers=workers, collate_fn=collate,
        persistent_workers=workers > 0, **kwargs,
    )  # fmt: skip


def _epochs(loader: DataLoader, epochs: int = 2) -> list[dict]:
    return [batch for _ in range(epochs) for batch in loader]


def test_kept_batches_equal_the_in_process_batches_over_two_epochs() -> None:
    """The consumer keeps every batch of two epochs (so every slot stays held and the workers must fall back): each
    batch still equals what the collate function made in-process, and the two keys of one tensor still share it."""
    reference = _epochs(_loader(_collate, workers=0))
    received = _epochs(_loader(worker_collate(_collate, num_workers=2)))
    assert len(received) == len(reference) == 12
    # each worker's 6 batches: 5 through its 5 slots (2 prefetched + 3 spare), the 6th the ordinary way
    assert sum(batch["input_ids"]._base is not None for batch in received) == 10
    for got, want in zip(received, reference, strict=True):
        _assert_same(got, want)
        assert got["visual_feats"].data_ptr() == got["region_feat_targets"].data_ptr()


def test_a_consumer_that_drops_its_batches_gets_every_batch_through_a_slot() -> None:
    """A training loop that lets each batch go: every batch arrives as views of a slot (no fallback to the
    per-tensor path), the slots are reused, and the values are right."""
    reference = _epochs(_loader(_collate, workers=0))
    loader = _loader(worker_collate(_collate, num_workers=2))
    through_slot = []
    for want, got in zip(reference, (b for _ in range(2) for b in loader), strict=True):
        _assert_same(got, want)
        through_slot.append(got["input_ids"]._base is not None)  # a view of the slot's bytes
        del got
    assert all(through_slot)


def test_a_slot_is_written_again_only_after_its_batch_is_gone() -> None:
    """Worker side and receiving side in one process: the slot stays taken while any tensor of its batch lives; with
    every slot taken the batch goes the ordinary way (counted), never over a batch someone holds."""
    collate = SlotCollate(_collate, slots=1)

    def send(items: list[int]):
        buf = io.BytesIO()
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(collate.pack(_collate(items)))
        return pickle.loads(buf.getvalue())

    first = send([1, 2, 3])
    kept = first["mask"]  # one tensor of the batch is enough to hold the slot
    del first
    gc.collect()
    second = send([4, 5, 6])
    assert collate.fallbacks == 1 and second["input_ids"]._base is None  # sent as the batch itself
    _assert_same(second, _collate([4, 5, 6]))
    _assert_same({"mask": kept}, {"mask": _collate([1, 2, 3])["mask"]})
    del kept
    gc.collect()
    third = send([7, 8])
    assert collate.fallbacks == 1 and third["input_ids"]._base is not None  # the slot was free again
    _assert_same(third, _collate([7, 8]))
    third["visual_feats"].add_(1)  # a consumer may write its batch: it is its own until released
    assert torch.equal(third["region_feat_targets"], _collate([7, 8])["visual_feats"] + 1)


def test_spawned_workers_and_the_switch_off() -> None:
    """Spawned workers (the collate object is pickled to them) give the same batches; `slots=False` / no workers
    leave the collate function as it is."""
    reference = _epochs(_loader(_collate, workers=0), epochs=1)
    spawned = _loader(worker_collate(_collate, num_workers=1), workers=1, multiprocessing_context="spawn")
    for got, want in zip(_epochs(spawned, epochs=1), reference, strict=True):
        _assert_same(got, want)
    ordered = _loader(worker_collate(_ordered_collate, num_workers=1), workers=1)
    assert all(type(batch) is OrderedDict for batch in ordered)  # other batch types travel as they are
    assert worker_collate(_collate, num_workers=2, slots=False) is _collate
    assert worker_collate(_collate, num_workers=0) is _collate
    with pytest.raises(ValueError, match="slots"):
        SlotCollate(_collate, slots=0)


def test_vqa_loader_with_a_worker_equals_the_in_process_loader(make_cfg) -> None:
    """The default VQA data module: one worker (slots) and none give identical training batches."""
    from vl.pipeline import build_datamodule

    def batches(workers: int) -> list[dict]:
        dm = build_datamodule(make_cfg("data=vqa", f"data.num_workers={workers}"))
        dm.setup("fit")
        return list(dm.train_dataloader())

    for got, want in zip(batches(1), batches(0), strict=True):
        assert list(got) == list(want)
        for key in want:
            if isinstance(want[key], torch.Tensor):
                assert torch.equal(got[key], want[key]), key
            else:
                assert got[key] == want[key], key


def test_slots_of_ended_workers_are_let_go() -> None:
    """A new loader's workers (a new fit or stage) send new slots; the receiving process drops those of workers that
    have ended, so their shared memory does not pile up across stages."""
    from vl.data import transport

    ended: set[int] = set()
    earlier = {key[0] for key in transport._RECEIVED}  # other tests' loaders (their workers may still run)
    for _ in range(3):
        loader = _loader(worker_collate(_collate, num_workers=2))
        for batch in loader:
            del batch
        pids = {key[0] for key in transport._RECEIVED}
        assert not pids & ended  # the previous loaders' workers: let go
        ended |= pids - earlier  # this loader's workers, about to end
        del loader
        gc.collect()
