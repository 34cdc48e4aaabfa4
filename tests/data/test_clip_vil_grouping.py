"""CLIP-ViL batches never mix image canvases, checked against independent computations: the seed's aspect-ratio
groups (torchvision's detection-reference `create_aspect_ratio_groups`, written out with the seed's size-file swap),
its `GroupedBatchSampler` (transcribed, leftovers included), val / test batches by canvas orientation (every example
once, also over two simulated ranks), a prediction that does not depend on what shares its batch, and a mixed batch
padded with the transform's own padding value."""

from __future__ import annotations

import bisect
import copy
import logging
import math
from collections import defaultdict
from itertools import chain, repeat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vl.build import build_datamodule, build_model
from vl.data.clip_vil import ClipVilPretrainDataModule, ClipVilVQADataModule
from vl.data.formats.lxmert_pretrain import image_path
from vl.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    AspectGroupedSampler,
    ResizePadNormalize,
    aspect_group,
    aspect_ratio_bins,
    grouped_batches,
    stack_pixels,
)
from vl.data.samplers import GroupedEvalSampler
from vl.errors import ConfigError


# ------------------------------------------------------------------------------------------------ the seed, transcribed
def _seed_quantize(x: list[float], bins: list[float]) -> list[int]:
    """torchvision detection reference `_quantize` (the seed's `vision_helpers.py`)."""
    bins = sorted(copy.deepcopy(bins))
    return [bisect.bisect_right(bins, y) for y in x]


def _seed_groups(stored: list[tuple[int, int]], k: int) -> list[int]:
    """The seed's `create_aspect_ratio_groups(dataset, k)` over `_compute_aspect_ratios_custom_dataset`: its size file
    stores `(w, h) = image.shape[:2]` (rows, columns); `get_height_and_width` does `w, h = records[...]; return h, w`;
    the ratio is `float(width) / float(height)` of that pair."""
    ratios = []
    for record in stored:
        w, h = record
        height, width = h, w  # get_height_and_width's return value, unpacked as (height, width)
        ratios.append(float(width) / float(height))
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    return _seed_quantize(ratios, bins)


def _seed_grouped_batch_sampler(order: list[int], group_ids: list[int], batch_size: int) -> list[list[int]]:
    """The seed's `GroupedBatchSampler.__iter__` (non-exhaustive), line by line; `len` = len(sampler) // batch."""
    buffer_per_group: defaultdict[int, list[int]] = defaultdict(list)
    samples_per_group: defaultdict[int, list[int]] = defaultdict(list)
    out: list[list[int]] = []
    num_batches = 0
    for idx in order:
        group_id = group_ids[idx]
        buffer_per_group[group_id].append(idx)
        samples_per_group[group_id].append(idx)
        if len(buffer_per_group[group_id]) == batch_size:
            out.append(buffer_per_group[group_id])
            num_batches += 1
            del buffer_per_group[group_id]
        assert len(buffer_per_group[group_id]) < batch_size  # (re-creates the deleted key: last in the dict)
    num_remaining = len(order) // batch_size - num_batches
    if num_remaining > 0:
        for group_id, _ in sorted(buffer_per_group.items(), key=lambda x: len(x[1]), reverse=True):
            remaining = batch_size - len(buffer_per_group[group_id])
            samples = samples_per_group[group_id]
            repeated = list(chain.from_iterable(repeat(samples, math.ceil(remaining / len(samples)))))
            buffer_per_group[group_id].extend(repeated[:remaining])
            out.append(buffer_per_group[group_id])
            num_remaining -= 1
            if num_remaining == 0:
                break
    return out


# ------------------------------------------------------------------------------------------------ aspect groups
@pytest.mark.parametrize("k", [0, 1, 2, 5, 7])
def test_aspect_groups_are_the_seeds_create_aspect_ratio_groups(k: int) -> None:
    rng = np.random.default_rng(k)
    sizes = [(int(w), int(h)) for w, h in rng.integers(20, 2000, (2000, 2))]  # PIL (width, height)
    # exact bin edges: h / w = 1/2, 1, 2 (the rational edges), and next to every edge
    sizes += [(200, 100), (100, 200), (300, 300), (640, 320), (320, 640), (641, 320), (320, 641), (501, 500)]
    for edge in aspect_ratio_bins(k):
        w = 1000
        for h in (math.floor(edge * w), math.ceil(edge * w), round(edge * w)):
            sizes.append((w, max(1, h)))
    stored = [(h, w) for w, h in sizes]  # the seed's width_heigths.json pair: image.shape[:2]
    bins = aspect_ratio_bins(k)
    assert [aspect_group(w, h, bins) for w, h in sizes] == _seed_groups(stored, k)


def test_one_is_a_bin_edge_so_every_group_keeps_to_one_side_of_square() -> None:
    for k in range(0, 49):
        assert aspect_ratio_bins(k)[k] == 1.0, k
    bins = aspect_ratio_bins(5)
    assert aspect_group(10, 10, bins) == 6 and aspect_group(11, 10, bins) == 5  # square: the first group above 1
    assert aspect_group(2, 1, bins) == 1 and aspect_group(1, 2, bins) == 11  # h / w = 0.5, 2: bisect_right
    with pytest.raises(ConfigError, match=r"data\.aspect_ratio_group_factor"):
        aspect_ratio_bins(-1)


def test_a_negative_group_factor_fails_in_one_line_before_anything_is_built(make_cfg) -> None:
    from vl.config import check_config

    cfg = make_cfg("experiment=clip_vil_vqa_tiny", "data.aspect_ratio_group_factor=-1")
    with pytest.raises(ConfigError, match=r"^data\.aspect_ratio_group_factor=-1: must be an integer >= 0"):
        check_config(cfg)
    assert make_cfg("experiment=clip_vil_pretrain", tiny=False).data.aspect_ratio_group_factor == 5
    assert make_cfg("experiment=clip_vil_vqa", tiny=False).data.aspect_ratio_group_factor == 0


def test_training_groups_split_an_aspect_group_where_the_canvas_differs(data_dir: Path) -> None:
    """A near-square landscape image (500 x 499 -> 384 x 384) gets the portrait canvas: it is grouped apart from the
    landscapes of its aspect group, so no training batch mixes canvases."""
    dm = _dm(ClipVilVQADataModule, data_dir, aspect_ratio_group_factor=5, transform_options={})
    bins = dm.aspect_bins
    assert dm.canvas((640, 480)) == 0 and dm.canvas((480, 640)) == 1 and dm.canvas((500, 500)) == 1
    assert aspect_group(500, 499, bins) == aspect_group(640, 600, bins) == 5
    assert dm.canvas((500, 499)) == 1 != dm.canvas((640, 600))
    assert dm.transform(Image.new("RGB", (500, 499))).shape[1:] == (640, 384)  # its canvas, as the transform pads


# ------------------------------------------------------------------------------------------------ training leftovers
@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 8])
def test_training_batches_are_the_seeds_grouped_batch_sampler(batch_size: int) -> None:
    rng = np.random.default_rng(batch_size)
    for trial in range(200):
        n = int(rng.integers(batch_size, 60))
        groups = [int(g) for g in rng.integers(0, int(rng.integers(1, 5)), n)]
        order = [int(i) for i in rng.permutation(n)]
        want = _seed_grouped_batch_sampler(order, groups, batch_size)
        got = grouped_batches(order, groups, batch_size)
        assert got == want, (trial, n)
        assert len(got) == n // batch_size
        assert all(len(b) == batch_size and len({groups[i] for i in b}) == 1 for b in got)
    # fewer examples than a batch: one batch (the seed: none), the largest group's completed by repeats
    assert grouped_batches([4, 0, 2], [1, 1, 0, 1, 0], 4) == [[4, 2, 4, 2]]
    assert grouped_batches([], [], 4) == []


def test_grouped_sampler_epochs_cover_its_batches_and_resume_mid_epoch_exactly() -> None:
    """Every epoch is len(sampler) examples in whole single-group batches of this rank's shard (the seed's rule on
    the DistributedSampler shard); the order depends on (seed, epoch) only, and a resume skips whole batches."""
    n, batch = 53, 4
    groups = [int(g) for g in np.random.default_rng(0).integers(0, 3, n)]
    dataset = list(range(n))
    for rank in (0, 1):
        make = lambda rank=rank: AspectGroupedSampler(  # noqa: E731
            dataset, num_replicas=2, rank=rank, shuffle=True, seed=7, groups=groups, batch_size=batch
        )
        sampler = make()
        for epoch in (0, 3):
            sampler.set_epoch(epoch)
            keys = list(sampler)
            assert len(keys) == len(sampler) == 27 // batch * batch and {e for e, _ in keys} == {epoch}
            ids = [i for _, i in keys]
            batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
            assert all(len({groups[i] for i in b}) == 1 for b in batches)
            ref = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=7)
            ref.set_epoch(epoch)
            assert batches == _seed_grouped_batch_sampler(list(ref), groups, batch)
            again = make()
            again.set_epoch(epoch)
            again.resume_at = (epoch, 2 * batch)  # two batches consumed
            assert list(again) == keys[2 * batch :]


def test_pretrain_training_batches_hold_one_canvas(data_dir: Path) -> None:
    dm = _dm(ClipVilPretrainDataModule, data_dir, aspect_ratio_group_factor=5)
    dm.prepare_data()
    loader = dm.train_dataloader()
    groups = dm.groups("train")
    n = 0
    for batch in loader:
        assert batch["pixel_values"].shape[0] == 8
        assert len({groups[i] for i in batch["index"].tolist()}) == 1
        n += 1
    assert n == len(loader) == len(dm.datasets["train"]) // 8


# ------------------------------------------------------------------------------------------------ val / test
def _dm(cls, data_dir: Path, **kwargs):
    kwargs.setdefault("objectives", ["mlm", "itm"] if cls is ClipVilPretrainDataModule else ["vqa"])
    kwargs.setdefault("transform_options", {"min_size": 64, "max_size": 96})
    return cls(cache_dir=str(data_dir), corpus={"num_images": 60}, batch_size=8, **kwargs)


def _portrait(dm, split: str) -> list[int]:
    """Independent of the module's grouping: each example's canvas from its image's decoded pixels."""
    ds = dm.datasets[split]
    rows = ds.examples if hasattr(ds, "examples") else ds.questions
    seen: dict[str, int] = {}
    for r in rows:
        if r["img_id"] not in seen:
            with Image.open(dm.root / image_path(r["img_id"])) as img:
                seen[r["img_id"]] = int(dm.transform(img.convert("RGB")).shape[1] > 64)
    return [seen[r["img_id"]] for r in rows]


@pytest.mark.parametrize("cls", [ClipVilVQADataModule, ClipVilPretrainDataModule])
def test_eval_batches_hold_one_canvas_and_every_example_once(cls, data_dir: Path) -> None:
    dm = _dm(cls, data_dir)
    dm.prepare_data()
    for split in ("val", "test"):
        dm.setup({"val": "validate", "test": "test"}[split])
        portrait = _portrait(dm, split)
        n = len(dm.datasets[split])
        assert 0 < sum(portrait) < n  # the corpus mixes orientations
        # one process: each orientation's examples in file order, cut into batches of at most 8
        seen = []
        for batch in dm.loader(split):
            ids = batch["index"].tolist()
            assert len({portrait[i] for i in ids}) == 1 and len(ids) <= 8
            assert batch["pixel_values"].shape[2:] == ((96, 64) if portrait[ids[0]] else (64, 96))
            seen.append(ids)
        want = [
            ids[s : s + 8] for o in (0, 1) for ids in [[i for i in range(n) if portrait[i] == o]]
            for s in range(0, len(ids), 8)
        ]  # fmt: skip
        assert sorted(seen) == sorted(want)
        # two simulated ranks: rank r scores examples r, r + 2, ... (each once over both), grouped within the rank
        union = []
        for rank in (0, 1):
            sampler = GroupedEvalSampler(dm.datasets[split], groups=portrait, batch_size=8, num_replicas=2, rank=rank)
            mine = list(range(rank, n, 2))
            want = [
                ids[s : s + 8] for o in (0, 1) for ids in [[i for i in mine if portrait[i] == o]]
                for s in range(0, len(ids), 8)
            ]  # fmt: skip
            got = [list(b) for b in sampler]
            assert sorted(got) == sorted(want) and len(sampler) == len(got)
            assert [b[0] for b in got] == sorted(b[0] for b in got)  # batches in file order of their first example
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0)
            try:
                loaded = [b["index"].tolist() for b in dm.loader(split)]
            finally:
                dm.trainer = None
            assert loaded == got
            union += [i for b in got for i in b]
        assert sorted(union) == list(range(n))


def test_a_prediction_does_not_depend_on_its_batch(make_cfg) -> None:
    """Eval mode, tiny model, every grid cell (VQA: no sub-sampling): each example's VQA logits in its val batch equal
    its logits alone (a batch of one); a batch mixing a landscape and a portrait image changes them (the check can
    fail)."""
    cfg = make_cfg("experiment=clip_vil_vqa_tiny", "data.corpus.num_images=60", "data.num_workers=0",
                   "data.batch_size=8", "data.batch_size_per_device=8")  # fmt: skip
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    system = build_model(cfg, dm).eval()
    assert not system.encoder.sub_sampling
    collate, ds = dm.collator("val"), dm.datasets["val"]

    def logits(batch):
        with torch.no_grad():
            return system.objectives["vqa"].classifier(system(batch).pooled)

    for b, batch in enumerate(dm.val_dataloader()):
        together = logits(batch)
        for row, i in enumerate(batch["index"].tolist()):
            alone = logits(collate([ds[(0, i)]]))
            torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=1e-5)
        if b == 1:
            break
    portrait = _portrait(dm, "val")
    a, p = portrait.index(0), portrait.index(1)
    mixed = logits(collate([ds[(0, a)], ds[(0, p)]]))
    assert not torch.allclose(mixed[0], logits(collate([ds[(0, a)]]))[0], atol=1e-4)


# ------------------------------------------------------------------------------------------------ a mixed batch
def test_a_mixed_batch_is_padded_with_the_transforms_own_padding(caplog, monkeypatch) -> None:
    import vl.data.images

    monkeypatch.setattr(vl.data.images, "_MIXED_LOGGED", False)  # logged once per process
    land, port = Image.new("RGB", (200, 100), (10, 200, 30)), Image.new("RGB", (100, 200), (10, 200, 30))
    padded = ResizePadNormalize(64, 96)
    x, y = padded(land), padded(port)
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)  # what the transform pads with, after normalisation
    with caplog.at_level(logging.WARNING, logger="vl.data.images"):
        out = stack_pixels([x, y], padded.batch_pad_value)
    assert out.shape == (2, 3, 96, 96)
    torch.testing.assert_close(out[0, :, :64, :], x, rtol=0, atol=0)
    torch.testing.assert_close(out[0, :, 64:, :], black[:, None, None].expand(3, 32, 96), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1, :, :, :64], y, rtol=0, atol=0)
    torch.testing.assert_close(out[1, :, :, 64:], black[:, None, None].expand(3, 96, 32), rtol=0, atol=1e-6)
    # the canvas's own padding rows are the same value: the extra cells look like the image's own padding
    torch.testing.assert_close(x[:, 0, 0], black, rtol=0, atol=1e-6)
    assert "mixes image canvases" in caplog.text
    # unpadded transform (the seed's to_image_list): zeros, no warning
    unpadded = ResizePadNormalize(64, 96, pad=False)
    assert unpadded.batch_pad_value is None
    caplog.clear()
    monkeypatch.setattr(vl.data.images, "_MIXED_LOGGED", False)
    with caplog.at_level(logging.WARNING, logger="vl.data.images"):
        out = stack_pixels([unpadded(land), unpadded(port)], unpadded.batch_pad_value)
    assert out.shape == (2, 3, 96, 96) and float(out[0, :, 48:].abs().max()) == 0.0 and not caplog.text
