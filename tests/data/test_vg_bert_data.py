"""VG-BERT's data: the embedded corpus in the seed's COCO / VG JSON layouts (phrases, classes and relations true of the
drawn scene), the readers' one-line errors naming file and record, batches of the two data modules, and the
published configs composing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from vl.data.formats.vg_bert import load_coco_json, load_vg_json
from vl.data.scenes import SceneSettings, generate_scenes
from vl.data.scenes.writers.images import image_id_of, pixel_scene
from vl.data.scenes.writers.vg_bert import RELATIONS, write_vg_bert_corpus
from vl.errors import DataError


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list]:
    scenes = generate_scenes(SceneSettings(num_images=60))
    out = tmp_path_factory.mktemp("vgb") / "vg_bert"
    write_vg_bert_corpus(out, scenes)
    return out, scenes


def test_layout_and_truth_of_phrases_classes_relations(written) -> None:
    out, scenes = written
    by_id = {image_id_of(s): s for s in scenes}
    coco = json.loads((out / "coco_train.json").read_text())
    assert coco["image_base_path"] == ".." and coco["caption_base_path"] == "captions"
    for rec in coco["data"]:
        lines = (out / "captions" / rec["caption"]).read_text().splitlines()
        scene = by_id[rec["caption"].removesuffix(".txt")]
        assert len(lines) == 5 and lines[0] == scene.captions[0] and scene.image_id % 3 == 0
    seen = set()
    for split in ("train", "val", "test"):
        vg = json.loads((out / f"vg_{split}.json").read_text())
        for rec in vg["data"]:
            img_id = Path(rec["image"]).stem
            shapes = pixel_scene(by_id[img_id]).shapes
            assert rec["object_description"] == [f"{p.size} {p.colour} {p.shape}" for p in shapes]
            n = len(shapes)
            for i, a in enumerate(shapes):
                for j, b in enumerate(shapes):
                    name = RELATIONS[rec["relation"][i][j]]
                    seen.add(name)
                    (ax, ay), (bx, by) = a.centre, b.centre
                    truth = {
                        "__none__": i == j,
                        "left of": ax < bx,
                        "right of": ax > bx,
                        "above": ay < by,
                        "below": ay > by,
                        "bigger than": (a.size, b.size) == ("large", "small"),
                        "smaller than": (a.size, b.size) == ("small", "large"),
                        "same colour as": a.colour == b.colour and i != j,
                    }[name]
                    assert truth, (img_id, i, j, name)
            assert len(rec["object_class"]) == n and all(1 <= c <= 32 for c in rec["object_class"])
    assert {"left of", "bigger than", "smaller than"} <= seen
    records = load_vg_json(out / "vg_train.json")
    assert Path(records[0]["image"]).is_absolute() or records[0]["image"].startswith(str(out))


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_bad_inputs_fail_naming_file_and_record(tmp_path: Path) -> None:
    (tmp_path / "caps").mkdir()
    (tmp_path / "caps" / "a.txt").write_text("one\ntwo\n")
    coco = {"image_base_path": ".", "caption_base_path": "caps", "data": [{"image": "a.jpg", "caption": "a.txt"},
                                                                        {"image": "b.jpg", "caption": "b.txt"}]}  # fmt: skip
    path = _write(tmp_path / "coco.json", coco)
    with pytest.raises(DataError, match=r"coco\.json: data\[1\]: caption file .*b\.txt not found"):
        load_coco_json(path)
    good = {"image": "a.jpg", "object_description": ["a", "b"], "object_class": [1, 2], "relation": [[0, 1], [2, 0]]}
    assert len(load_vg_json(_write(tmp_path / "vg.json", {"image_base_path": ".", "data": [good]}))) == 1
    cases = [
        (
            {"relation": [[0, 1, 0], [2, 0, 0], [0, 0, 0]]},
            r"data\[0\]: 'relation' must be a 2 x 2 matrix for 2 objects",
        ),
        ({"object_class": [1, 56]}, r"data\[0\]: object_class\[1\] = 56 is out of range 0\.\.55"),
        ({"relation": [[0, 115], [0, 0]]}, r"data\[0\]: relation\[0\]\[1\] = 115 is out of range 0\.\.114"),
        ({"object_class": [1]}, r"data\[0\]: 'object_class' has 1 entries for 2 objects"),
    ]
    for change, message in cases:
        path = _write(tmp_path / "bad.json", {"image_base_path": ".", "data": [{**good, **change}]})
        with pytest.raises(DataError, match=r"bad\.json: " + message):
            load_vg_json(path)


def test_data_modules_make_batches(make_cfg) -> None:
    from vl.build import build_datamodule

    cfg = make_cfg("experiment=vg_bert_relational_tiny", "data.num_workers=0", "data.corpus.num_images=150")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["object_ids"].shape[1:] == (32, 10) and batch["relation_target"].shape[1:] == (32, 32)
    assert batch["pixel_values"].shape[1:] == (3, 64, 64)
    n = batch["object_mask"].sum(1)
    for b in range(len(n)):
        assert batch["relation_target"][b, n[b] :].abs().sum() == 0 and batch["object_target"][b, n[b] :].sum() == 0
        ids = batch["object_ids"][b, 0]
        assert ids[0] == dm.tokenizer.cls_token_id and dm.tokenizer.sep_token_id in ids.tolist()
    base = dm.baselines("val")
    assert 0 < base["val/rel_acc_majority"] < 1 and 0 <= base["val/obj_acc1_majority"] < 1
    cfg = make_cfg("experiment=vg_bert_grounding_tiny", "data.num_workers=0", "data.corpus.num_images=150")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[1] == cfg.data.max_text_len and bool((batch["input_ids"][:, 0] == 101).all())
    again = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["input_ids"], again["input_ids"])  # one epoch's validation draws the same caption lines
    n = len(dm.records("test"))
    assert dm.baselines("test")["test/r1_i2t_chance"] == pytest.approx(1 / n)


@pytest.mark.parametrize("eval_caption", ["random", "fixed"])
def test_validation_draws_a_caption_line_per_epoch_as_the_seed_or_a_fixed_one(eval_caption: str, make_cfg) -> None:
    """The seed's val loader draws `lines[np.random.randint(len(lines))]` on every call: `eval_caption: random` (the
    default) draws by the epoch Lightning sets on the val sampler before each validation (`_set_sampler_epoch`, what
    its evaluation loop calls), uniformly among the image's lines; `fixed`: the same line in every epoch."""
    from lightning.fabric.utilities.data import _set_sampler_epoch

    from vl.build import build_datamodule

    overrides = ("experiment=vg_bert_grounding_tiny", "data.num_workers=0", "data.corpus.num_images=150")
    cfg = make_cfg(*overrides, f"data.eval_caption={eval_caption}")
    assert make_cfg(*overrides).data.eval_caption == "random"
    dm = build_datamodule(cfg)
    dm.setup("fit")
    tok = dm.tokenizer
    records = dm.records("val")
    loader = dm.val_dataloader()

    def words(ids: torch.Tensor) -> tuple[str, ...]:
        kept = [t for t in tok.convert_ids_to_tokens(ids.tolist()) if t not in ("[CLS]", "[SEP]", "[PAD]")]
        return tuple(kept)

    drawn: list[list[tuple[str, ...]]] = []
    for epoch in range(6):
        _set_sampler_epoch(loader, epoch)
        drawn.append([words(row) for batch in loader for row in batch["input_ids"]])
    for epoch_draws in drawn:
        assert len(epoch_draws) == len(records)
        for got, rec in zip(epoch_draws, records, strict=True):
            assert got in {tuple(tok.tokenize(line)) for line in rec["captions"]}
    per_image = [len({d[i] for d in drawn}) for i in range(len(records))]
    if eval_caption == "fixed":
        assert max(per_image) == 1
    else:  # 6 uniform draws among >= 2 lines: most images show more than one
        assert sum(c > 1 for c in per_image) > len(records) // 2


@pytest.mark.parametrize(
    ("experiment", "stage", "lr"),
    [("vg_bert_grounding", "grounding", 5e-5), ("vg_bert_relational", "relational", 1e-5),
     ("vg_bert_transfer_retrieval", "transfer", 5e-5)],
)  # fmt: skip
def test_published_configs_compose(make_cfg, experiment, stage, lr) -> None:
    cfg = make_cfg(f"experiment={experiment}", tiny=False)
    enc = cfg.model.encoder
    assert enc.stage == stage and enc.text_encoder.num_layers == 12 and enc.text_encoder.hidden_size == 768
    assert enc.vgg_cfg is None and enc.num_positions == 196 and enc.visual_heads == 12 and enc.cross_heads == 8
    assert enc.freeze_qk and enc.freeze_vgg and enc.segment_id == 1 and enc.object_pool == "all_positions"
    assert cfg.model.optimizer._target_ == "torch.optim.Adam" and cfg.model.optimizer.lr == lr
    assert list(cfg.model.optimizer.betas) == [0.95, 0.999] and cfg.model.optimizer.weight_decay == 5e-7
    # README / run.py: --lr-decay 15 --lr-ratio 0.5; transfer_cross_modal_retrieval.py's --lr-decay default is 30
    assert cfg.model.lr_decay_epochs == (30 if stage == "transfer" else 15) and cfg.model.lr_ratio == 0.5
    if stage == "grounding":
        assert enc.learnable_layers == 8 and enc.dropout_rate == 0.3 and cfg.data.monitor == "val/loss"
        assert cfg.data.transform_options.size == 256 and cfg.data.transform_options.crop == 224
        assert cfg.data.batch_size == 180 and cfg.trainer.max_epochs == 100 and cfg.data.max_text_len == 32
    if stage == "relational":
        assert enc.learnable_layers == 2 and enc.dropout_rate == 0.1 and cfg.data.monitor == "val/rel_acc"
        assert cfg.data.transform_options.size == 224 and cfg.data.max_objects == 32
        assert cfg.data.num_relations == 115 and cfg.data.num_object_classes == 56
        # run.py: CrossAttention(dropout_rate=args.dropout_rate): the relation matrices' dropout is the one flag's
        assert cfg.model.heads.vg_relational.dropout == 0.1
        other = make_cfg(f"experiment={experiment}", "model.encoder.dropout_rate=0.3", tiny=False)
        assert other.model.heads.vg_relational.dropout == 0.3
    if stage == "transfer":
        assert enc.freeze_encoder and list(cfg.data.objectives) == ["vg_transfer"] and cfg.data.batch_size == 300
        assert enc.dropout_rate == 0.1 and cfg.trainer.max_epochs == 150  # README: --dropout-rate 0.1 --n_epochs 150
        # its training loader: Resize(224) + CenterCrop(224); evaluation: data=vg_bert_coco's 256 / 224
        assert dict(cfg.data.train_transform_options) == {"size": 224, "crop": 224}
        assert cfg.data.transform_options.size == 256 and cfg.data.transform_options.crop == 224


def test_the_training_split_can_have_its_own_transform(make_cfg) -> None:
    from vl.build import build_datamodule

    overrides = (
        "data.num_workers=0",
        "data.corpus.num_images=150",
        "data.batch_size=8",
        "data.batch_size_per_device=8",
    )
    cfg = make_cfg(
        "experiment=vg_bert_transfer_retrieval_tiny", *overrides, "data.train_transform_options={size: 56, crop: 48}"
    )
    dm = build_datamodule(cfg)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape[1:] == (3, 48, 48)
    assert next(iter(dm.val_dataloader()))["pixel_values"].shape[1:] == (3, 64, 64)


def _seed_tokens(tok, text: str, length: int) -> tuple[list[int], list[int]]:
    """The seed's `image_caption_dataset.py`, transcribed (captions at 32, object phrases at 10): `tokenize('[CLS] ' +
    text + ' [SEP]')`, ids, zero-padded to `length` or cut to its first `length` tokens; mask 1 on the kept tokens."""
    tokens = tok.tokenize("[CLS] " + text + " [SEP]")
    ids, mask = tok.convert_tokens_to_ids(tokens), [1] * len(tokens)
    p = length - len(ids)
    if p > 0:
        return ids + [0] * p, mask + [0] * p
    return ids[:length], mask[:length]


@pytest.mark.parametrize("length", [10, 32])
def test_captions_and_phrases_are_cut_as_the_seeds_loaders(length: int) -> None:
    """Over-long captions (at 32) and object phrases (at 10) lose their [SEP] as in the seed's loaders (HF truncation,
    `text_truncation=tokenizer`, keeps it); shorter ones are padded alike. Token types: the model sets them (1)."""
    import numpy as np

    from vl.data.collate import load_tokenizer
    from vl.data.vg_bert import CaptionCollator, encode_padded

    tok = load_tokenizer("minilm")
    rng = np.random.default_rng(5)
    words = "a small brown dog runs across the green grass towards an old wooden fence".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(2, length + 6)))) for _ in range(30)]
    enc = encode_padded(tok, texts, length, "seed")
    cut = 0
    for i, text in enumerate(texts):
        ids, mask = _seed_tokens(tok, text, length)
        assert enc["input_ids"][i].tolist() == ids and enc["attention_mask"][i].tolist() == mask
        cut += len(tok.tokenize(text)) + 2 > length
    assert cut >= 5
    plain = encode_padded(tok, texts, length, "tokenizer")
    assert not torch.equal(plain["input_ids"], enc["input_ids"])
    examples = [{"text": t, "pixels": torch.zeros(3, 4, 4), "index": i} for i, t in enumerate(texts)]
    batch = CaptionCollator(tok, length)(examples)  # the default is the seed's
    assert torch.equal(batch["input_ids"], enc["input_ids"])


@pytest.mark.parametrize("data", ["vg_bert_coco", "vg_bert_vg"])
def test_missing_image_files_fail_in_prepare_data_naming_json_record_and_path(
    make_cfg, tmp_path: Path, data: str, caplog
) -> None:
    """`image_base_path: /nonexistent` loaded and failed at the first decode, mid-fit. `prepare_data` stats every
    image: under `on_bad_image=error` the first missing one is named; `=skip` (a missing image is skipped when read)
    fails only when a split has none of its images, and logs the count otherwise."""
    from hydra.utils import instantiate
    from PIL import Image

    root = tmp_path / "root"
    (root / "vg_bert" / "captions").mkdir(parents=True)
    (root / "images").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(root / "images" / f"{name}.jpg")
    for name in ("a", "b", "c"):  # c.jpg is never written
        (root / "vg_bert" / "captions" / f"{name}.txt").write_text("a red square\n")
    obj = {"object_description": ["a red square"], "object_class": [1], "relation": [[0]]}

    def write(base: str, images: tuple[str, str] = ("a", "b")) -> None:
        for split in ("train", "val", "test"):
            if data == "vg_bert_coco":
                rows = [{"image": f"images/{i}.jpg", "caption": f"{i}.txt"} for i in images]
                doc = {"image_base_path": base, "caption_base_path": "captions", "data": rows}
            else:
                doc = {"image_base_path": base, "data": [{"image": f"images/{i}.jpg", **obj} for i in images]}
            _write(root / "vg_bert" / f"{data.removeprefix('vg_bert_')}_{split}.json", doc)

    def prepare(*overrides: str) -> None:
        cfg = make_cfg("experiment=none", f"data={data}", f"data.root={root}", *overrides)
        instantiate(cfg.data).prepare_data()

    write("..")
    prepare()
    train_json = root / "vg_bert" / f"{data.removeprefix('vg_bert_')}_train.json"
    write("/nonexistent")
    message = (
        f"{train_json}: data[0]: image file /nonexistent/images/a.jpg not found (its 'image' under 'image_base_path')"
    )
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        prepare()
    with pytest.raises(DataError, match=re.escape(f"{train_json}: none of its 2 image files exists (first: data[0]")):
        prepare("data.on_bad_image=skip")
    write("..", images=("a", "c"))
    with pytest.raises(DataError, match=re.escape(f"{train_json}: data[1]: image file {root}/vg_bert/../images/c.jpg")):
        prepare()
    with caplog.at_level("WARNING"):
        prepare("data.on_bad_image=skip")  # the promise of skip: a missing image is skipped (and counted) when read
    assert f"{train_json}: 1 of 2 image files not found, skipped when read" in caplog.text
