"""MM-BERT's encoder against independent computations: the sin/cos box embedding and the whole-image-box mean by hand
(numpy), the compacted sequence `[CLS] EN [SEP] DE [SEP] [IMG]x(R+1) [END]` (types 0 / 2, shared object position)
built example by example and run through the BERT stack unpadded; the MVRC soft-CE against numpy; the hybrid init."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vl.errors import DataError
from vl.heads.mm_bert import BinaryImageTextMatching, MaskedVisualRegionClassification
from vl.models.mm_bert import MMBertEncoder, MMBertSystem, coordinate_embeddings

D, H, V, C = 12, 16, 50, 7
TINY = {"hidden_size": H, "num_layers": 2, "num_heads": 2, "intermediate_size": 32, "dropout": 0.0}


def numpy_coords(box: np.ndarray, dim: int, base: float) -> np.ndarray:
    """VL-BERT's coordinate embedding of one normalised x1y1x2y2 box, by hand."""
    x1, y1, x2, y2 = (float(v) for v in box)
    pos = [(x1 + x2) / 2 * 100, (y1 + y2) / 2 * 100, (x2 - x1) * 100, (y2 - y1) * 100]
    out = []
    for p in pos:
        angles = [p / base ** (k / dim) for k in range(dim)]
        out += [np.sin(a) for a in angles] + [np.cos(a) for a in angles]
    return np.asarray(out)


def make_encoder(seed: int = 0, coord_dim: int = 4) -> MMBertEncoder:
    torch.manual_seed(seed)
    enc = MMBertEncoder(data_info={"visual_dim": D, "vocab_size": V}, text_encoder=TINY, coord_dim=coord_dim)
    with torch.no_grad():  # non-zero visual LayerNorm weights, so the visual paths matter in the comparison
        for ln in (enc.visual_ln_text, enc.visual_ln_object):
            ln.weight.normal_()
            ln.bias.normal_()
        enc.object_mask_visual_embedding.weight.normal_()
    return enc.eval()


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B, T, R = 3, 9, 5
    text_lens, region_lens = [9, 6, 4], [5, 2, 0]
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    vmask = torch.zeros(B, R, dtype=torch.long)
    for b in range(B):
        mask[b, : text_lens[b]] = 1
        vmask[b, : region_lens[b]] = 1
    ids = ids * mask
    xy = torch.rand(B, R, 2, generator=g) * 0.5
    wh = torch.rand(B, R, 2, generator=g) * 0.5
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.ones(B, T, dtype=torch.long),  # ignored: all text is type 0
        "visual_feats": torch.randn(B, R, D, generator=g) * vmask.unsqueeze(-1),
        "visual_boxes": torch.cat([xy, xy + wh], -1) * vmask.unsqueeze(-1),
        "visual_mask": vmask,
        "visual_image_size": torch.tensor([[640.0, 480.0], [500.0, 375.0], [100.0, 100.0]]),
        "has_image": torch.tensor([True, True, False]),
        "mvrc_replace": torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool),
        "index": torch.arange(B),
    }


def test_coordinate_embedding_is_the_hand_computation() -> None:
    boxes = np.random.default_rng(0).uniform(0, 1, (6, 4))
    boxes[:, 2:] = boxes[:, :2] + 0.3
    got = coordinate_embeddings(torch.tensor(boxes, dtype=torch.float64), dim=256, base=1000.0).numpy()
    want = np.stack([numpy_coords(b, 256, 1000.0) for b in boxes])
    assert got.shape == (6, 4 * 512) == want.shape  # 4 x 512 = 2048-d, as VL-BERT's fast_rcnn
    np.testing.assert_allclose(got, want, atol=1e-9)


@torch.no_grad()
def test_whole_image_box_is_the_mean_of_the_unmasked_regions() -> None:
    enc, batch = make_encoder(), make_batch()
    feats, boxes, valid, replace = enc.region_inputs(batch)
    f = batch["visual_feats"].numpy()
    m = batch["visual_mask"].numpy().astype(bool)
    r = batch["mvrc_replace"].numpy()
    for b in range(3):
        keep = m[b] & ~r[b]
        want = f[b][keep].mean(0) if keep.any() else np.zeros(D)
        np.testing.assert_allclose(feats[b, 0].numpy(), want, atol=1e-6)
        w, h = batch["visual_image_size"][b].tolist()
        np.testing.assert_allclose(boxes[b, 0].numpy(), [0, 0, (w - 1) / w, (h - 1) / h], atol=1e-7)
        # masked regions carry the learned mask feature, the others their own
        for k in range(5):
            expect = enc.object_mask_visual_embedding.weight[0] if r[b, k] and m[b, k] else batch["visual_feats"][b, k]
            torch.testing.assert_close(feats[b, 1 + k], expect)
    assert valid[:, 0].tolist() == [True, True, False]  # the text-only row has no image box
    assert not replace[:, 0].any()  # the image box is never masked


@torch.no_grad()
def test_sequence_layout_types_positions_against_a_per_example_build() -> None:
    enc, batch = make_encoder(), make_batch()
    out = enc(batch)
    bert = enc.bert
    for b in range(3):
        n_t = int(batch["attention_mask"][b].sum())
        n_r = int(batch["visual_mask"][b].sum()) if batch["has_image"][b] else 0
        words = bert.embeddings.word_embeddings(batch["input_ids"][b, :n_t])
        embs, pos, types = [], [], []
        if batch["has_image"][b]:
            feats = batch["visual_feats"][b, :n_r].clone()
            rep = batch["mvrc_replace"][b, :n_r]
            mean = feats[~rep].mean(0) if (~rep).any() else torch.zeros(D)
            feats[rep] = enc.object_mask_visual_embedding.weight[0]
            w, h = batch["visual_image_size"][b].tolist()
            boxes = np.concatenate([[[0, 0, (w - 1) / w, (h - 1) / h]], batch["visual_boxes"][b, :n_r].numpy()])
            coords = torch.tensor(np.stack([numpy_coords(x, 4, 1000.0) for x in boxes]), dtype=torch.float32)
            # VL-BERT's fast_rcnn.py: cat(coordinate embedding, feature), coordinates first
            reps = enc.obj_downsample[1](torch.cat([coords, torch.cat([mean[None], feats])], -1)).relu()
            text_visual = enc.visual_ln_text(reps[0])
        else:  # a text-only row outside the aux corpus (Task C): zeros through the LayerNorm = its bias (closed form)
            text_visual = enc.visual_ln_text.bias
        for j in range(n_t):  # [CLS] EN [SEP] DE [SEP]: positions 0..n-1, type 0
            embs.append(words[j] + text_visual)
            pos.append(j)
            types.append(0)
        if batch["has_image"][b]:
            for k in range(n_r + 1):  # image box first, then the regions: all at position n, type 2
                masked = k > 0 and bool(batch["mvrc_replace"][b, k - 1])
                ling = (enc.object_mask_word_embedding if masked else enc.object_linguistic_embeddings).weight[0]
                embs.append(ling + enc.visual_ln_object(reps[k]))
                pos.append(n_t)
                types.append(2)
        # [END] after the objects in every row, also in the text-only row (VL-BERT's `embedding`): position n + 1,
        # type 2
        embs.append(enc.end_embedding.weight[0])
        pos.append(n_t + 1)
        types.append(2)
        ref = bert(
            inputs_embeds=torch.stack(embs)[None],
            position_ids=torch.tensor([pos]),
            token_type_ids=torch.tensor([types]),
            # explicit: without a mask, transformers 5.x reads position ids that do not rise by 1 (the regions share
            # one position) as packed sequences and blocks attention between them
            attention_mask=torch.ones(1, len(pos), dtype=torch.long),
        )
        states = ref.last_hidden_state[0]
        torch.testing.assert_close(out.text[b, :n_t], states[:n_t], atol=1e-5, rtol=1e-5)
        if batch["has_image"][b]:
            torch.testing.assert_close(out.visual[b, : n_r + 1], states[n_t : n_t + n_r + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooled[b], ref.pooler_output[0], atol=1e-5, rtol=1e-5)
    assert out.visual_prefix == 1 and out.regions().shape[1] == batch["visual_feats"].shape[1]


def seed_layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """VL-BERT's BertLayerNorm (TF style, eps inside the square root), by hand."""
    u = x.mean(-1, keepdims=True)
    s = ((x - u) ** 2).mean(-1, keepdims=True)
    return weight * (x - u) / np.sqrt(s + eps) + bias


@pytest.mark.parametrize("aux_rows", [None, [True, False, True]])
@torch.no_grad()
def test_a_text_only_batch_ends_with_end_like_vl_berts_embedding(aux_rows) -> None:
    """A batch without regions (aux text, Task C): VL-BERT's `embedding` still appends [END] (type 2, position n+1)
    right after the text; built by hand per row. The text's visual embedding as the seed: aux corpus rows (``aux_text``)
    visual_ln_text(aux embedding) (``ResNetVLBERTForPretrainingMultitask``), the others visual_ln_text(zeros) = the
    LayerNorm's bias (``ResNetVLBERTForPretrainingTaskC`` and MT's no-vision modules feed zeros)."""
    enc, batch = make_encoder(), make_batch()
    text_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "index")}
    if aux_rows is not None:
        text_batch["aux_text"] = torch.tensor(aux_rows)
    out = enc(text_batch)
    ln_w, ln_b = enc.visual_ln_text.weight.numpy(), enc.visual_ln_text.bias.numpy()
    for b in range(3):
        n_t = int(batch["attention_mask"][b].sum())
        words = enc.bert.embeddings.word_embeddings(batch["input_ids"][b, :n_t])
        source = enc.aux_text_visual_embedding.weight[0].numpy() if aux_rows and aux_rows[b] else np.zeros(H)
        visual = seed_layer_norm(source.astype(np.float64), ln_w, ln_b)
        if not (aux_rows and aux_rows[b]):
            np.testing.assert_allclose(visual, ln_b)  # zeros through the LayerNorm: its bias alone
        text = words + torch.tensor(visual, dtype=torch.float32)
        ref = enc.bert(
            inputs_embeds=torch.cat([text, enc.end_embedding.weight])[None],
            position_ids=torch.tensor([[*range(n_t), n_t + 1]]),
            token_type_ids=torch.tensor([[0] * n_t + [2]]),
            attention_mask=torch.ones(1, n_t + 1, dtype=torch.long),
        )
        torch.testing.assert_close(out.text[b, :n_t], ref.last_hidden_state[0, :n_t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooled[b], ref.pooler_output[0], atol=1e-5, rtol=1e-5)


def test_visual_layernorms_start_at_zero_and_published_sizes() -> None:
    enc = MMBertEncoder(data_info={"visual_dim": 2048, "vocab_size": V}, text_encoder=TINY)
    assert enc.visual_ln_text.weight.abs().sum() == 0 and enc.visual_ln_object.weight.abs().sum() == 0
    assert enc.obj_downsample[1].in_features == 4096  # 2048 feature + 4 x 512 box embedding
    assert isinstance(enc.obj_downsample[0], nn.Dropout) and isinstance(enc.obj_downsample[2], nn.ReLU)
    assert enc.bert.config.type_vocab_size == 3


def test_mvrc_soft_cross_entropy_equals_numpy() -> None:
    torch.manual_seed(0)
    head = MaskedVisualRegionClassification(hidden_size=H, num_classes=C)
    B, R = 2, 4
    states = torch.randn(B, 1 + R, H)
    target = torch.softmax(torch.randn(B, R, C), -1)
    target[1, 2] *= 0.5  # does not sum to 1: not counted
    chosen = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    out = SimpleNamespace(pooled=states[:, 0], regions=lambda: states[:, 1:])
    result = head(out, {"region_mask_labels": chosen, "region_cls_prob": target})
    logits = head.head(states[:, 1:]).detach().numpy()
    losses = []
    for b, k in [(0, 0), (0, 2), (1, 1)]:
        z = logits[b, k].astype(np.float64)
        logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        losses.append(-(target[b, k].numpy() * logp).sum())
    assert float(result.loss.detach()) == pytest.approx(np.mean(losses), abs=1e-5)


def test_mvrc_counts_the_regions_the_seed_counts() -> None:
    """The seed's ``soft_cross_entropy``: a region counts when |sum(target) - 1| < 0.1 (strict); its mean over those.
    Targets summing to 0.95 and 1.05 count, 0.85 and 1.1 do not (a detector's scores rounded in a JSON file need not
    sum to exactly 1)."""
    torch.manual_seed(0)
    head = MaskedVisualRegionClassification(hidden_size=H, num_classes=C)
    B, R = 1, 5
    states = torch.randn(B, 1 + R, H, dtype=torch.float64)
    head = head.double()
    target = torch.softmax(torch.randn(B, R, C, dtype=torch.float64), -1)
    sums = [1.0, 0.95, 1.05, 0.85, 1.1]
    target = target * torch.tensor(sums, dtype=torch.float64)[None, :, None]
    chosen = torch.ones(B, R, dtype=torch.bool)
    out = SimpleNamespace(pooled=states[:, 0], regions=lambda: states[:, 1:])
    result = head(out, {"region_mask_labels": chosen, "region_cls_prob": target})
    logits = head.head(states[0, 1:]).detach().numpy()
    t = target[0].numpy()
    valid = np.abs(t.sum(-1) - 1) < 1.0e-1  # the seed's rule, transcribed
    assert valid.tolist() == [True, True, True, False, False]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    want = (-(logp[valid] * t[valid]).sum(1)).mean(0)
    assert float(result.loss.detach()) == pytest.approx(want, rel=1e-9)


def test_itm_is_one_logit_bce() -> None:
    torch.manual_seed(0)
    head = BinaryImageTextMatching(hidden_size=H)
    pooled, labels = torch.randn(6, H), torch.tensor([1, 0, 1, 1, 0, 0])
    result = head(SimpleNamespace(pooled=pooled), {"itm_labels": labels})
    z = (pooled @ head.classifier.weight.T + head.classifier.bias).squeeze(-1).detach().numpy().astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    want = -np.mean(labels.numpy() * np.log(p) + (1 - labels.numpy()) * np.log(1 - p))
    assert head.classifier.out_features == 1
    assert float(result.loss) == pytest.approx(want, abs=1e-6)
    np.testing.assert_allclose(head.score(pooled).detach().numpy(), p, atol=1e-6)


def _system(**kwargs) -> MMBertSystem:
    return MMBertSystem(
        encoder={"_target_": "vl.models.mm_bert.MMBertEncoder", "text_encoder": TINY, "coord_dim": 4},
        objectives=["mlm", "mvrc"],
        data_info={"visual_dim": D, "vocab_size": V + 1, "num_region_classes": C},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        **kwargs,
    )


#: the seed's checkpoint key (``ResNetVLBERTForPretrainingMultitask`` under DataParallel) -> (vl parameter, shape)
SEED_KEYS = {
    "module.vlbert.mvrc_head.transform.dense.weight": ("objectives.mvrc.head.0.weight", (H, H)),
    "module.vlbert.mvrc_head.transform.dense.bias": ("objectives.mvrc.head.0.bias", (H,)),
    "module.vlbert.mvrc_head.region_cls_pred.weight": ("objectives.mvrc.head.2.weight", (C, H)),
    "module.vlbert.mvrc_head.region_cls_pred.bias": ("objectives.mvrc.head.2.bias", (C,)),
    "module.image_feature_extractor.obj_downsample.1.weight": ("encoder.obj_downsample.1.weight", (H, 32 + D)),
    "module.image_feature_extractor.obj_downsample.1.bias": ("encoder.obj_downsample.1.bias", (H,)),
    "module.vlbert.visual_ln_text.weight": ("encoder.visual_ln_text.weight", (H,)),
    "module.vlbert.visual_ln_text.bias": ("encoder.visual_ln_text.bias", (H,)),
    "module.vlbert.visual_ln_object.weight": ("encoder.visual_ln_object.weight", (H,)),
    "module.vlbert.visual_ln_object.bias": ("encoder.visual_ln_object.bias", (H,)),
    "module.vlbert.end_embedding.weight": ("encoder.end_embedding.weight", (1, H)),
    "module.vlbert.token_type_embeddings.weight": ("encoder.bert.embeddings.token_type_embeddings.weight", (3, H)),
    "module.vlbert.position_embeddings.weight": ("encoder.bert.embeddings.position_embeddings.weight", (512, H)),
    "module.aux_text_visual_embedding.weight": ("encoder.aux_text_visual_embedding.weight", (1, H)),
    "module.object_mask_word_embedding.weight": ("encoder.object_mask_word_embedding.weight", (1, H)),
    "module.object_linguistic_embeddings.weight": ("encoder.object_linguistic_embeddings.weight", (1, H)),
}
#: seed keys that are not hybrid parts (the spec's list): they must not load
SEED_NOT_LOADED = {
    "module.object_mask_visual_embedding.weight": (1, D),
    "module.vlbert.encoder.layer.0.output.dense.weight": (H, 32),
    "module.vlbert.word_embeddings.weight": (V, H),
    "module.vlbert.embedding_LayerNorm.weight": (H,),
}


def test_hybrid_init_takes_mbert_encoder_and_vlbert_visual_parts(tmp_path, caplog) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    mbert = BertModel(
        BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32),
        add_pooling_layer=True,
    )
    mbert.save_pretrained(tmp_path / "mbert")
    g = torch.Generator().manual_seed(7)
    seed_state = {k: torch.randn(shape, generator=g) for k, (_, shape) in SEED_KEYS.items()}
    seed_state |= {k: torch.randn(shape, generator=g) for k, shape in SEED_NOT_LOADED.items()}
    torch.save({"state_dict": seed_state}, tmp_path / "vl-bert-base-prec.model")
    with caplog.at_level(logging.INFO):
        system = _system(mbert_dir=str(tmp_path / "mbert"), vlbert_checkpoint=str(tmp_path / "vl-bert-base-prec.model"))
    system.eval()
    enc = system.encoder
    own = system.state_dict()
    ref = mbert.state_dict()
    torch.testing.assert_close(
        enc.bert.encoder.layer[1].output.dense.weight, ref["encoder.layer.1.output.dense.weight"]
    )
    torch.testing.assert_close(enc.word_embeddings.weight[:V], ref["embeddings.word_embeddings.weight"])
    assert enc.word_embeddings.weight.shape[0] == V + 1  # [STOP] keeps its init
    torch.testing.assert_close(enc.bert.pooler.dense.weight, ref["pooler.dense.weight"])  # the seed loads it too
    # every seed VL-BERT part lands in its vl parameter (position / token types: VL-BERT's overwrite M-BERT's)
    for key, (target, _) in SEED_KEYS.items():
        torch.testing.assert_close(own[target], seed_state[key], msg=f"{key} -> {target}")
    # not hybrid parts: the mask visual embedding keeps its init 0; encoder layers and words stay M-BERT's
    assert torch.all(enc.object_mask_visual_embedding.weight == 0)
    torch.testing.assert_close(
        enc.bert.encoder.layer[0].output.dense.weight, ref["encoder.layer.0.output.dense.weight"]
    )
    # the loaded obj_downsample Linear reads the box embedding first (VL-BERT's cat(coord_embed, features)), by hand
    W = seed_state["module.image_feature_extractor.obj_downsample.1.weight"].double().numpy()
    bias = seed_state["module.image_feature_extractor.obj_downsample.1.bias"].double().numpy()
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((3, D))
    xy = rng.uniform(0, 0.5, (3, 2))
    boxes = np.concatenate([xy, xy + 0.3], 1)
    with torch.no_grad():
        got = enc.object_reps(torch.tensor(feats[None]).float(), torch.tensor(boxes[None]).float())[0].numpy()
    x = np.concatenate([np.stack([numpy_coords(bx, 4, 1000.0) for bx in boxes]), feats], 1)
    np.testing.assert_allclose(got, np.maximum(x @ W.T + bias, 0.0), atol=1e-4)
    text = caplog.text
    assert "vlbert.encoder.layer.0.output.dense.weight" in text and "object_mask_visual_embedding" in text
    assert "missing keys" in text and "unexpected keys" in text


def _saved_mbert(path, *, seed: int):
    """A tiny M-BERT-layout `BertForPreTraining` with non-default weights, saved as an HF model dir at `path`."""
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(seed)
    mbert = BertForPreTraining(
        BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    )
    with torch.no_grad():
        for p in mbert.parameters():
            p.add_(torch.randn_like(p))
    mbert.save_pretrained(path)
    return mbert


def test_hybrid_init_takes_mberts_mlm_head(tmp_path) -> None:
    """The seed loads the language model's MLM head (`cls.predictions` transform and bias) into its own; the [STOP]
    entry beyond M-BERT's vocabulary keeps its init (0), as its word row does. Checked against the saved HF model."""
    mbert = _saved_mbert(tmp_path / "mbert", seed=4)
    system = _system(mbert_dir=str(tmp_path / "mbert"))
    own, ref = system.state_dict(), mbert.state_dict()
    torch.testing.assert_close(own["objectives.mlm.transform.0.weight"], ref["cls.predictions.transform.dense.weight"])
    torch.testing.assert_close(own["objectives.mlm.transform.2.bias"], ref["cls.predictions.transform.LayerNorm.bias"])
    torch.testing.assert_close(own["objectives.mlm.bias"][:V], ref["cls.predictions.bias"])
    assert own["objectives.mlm.bias"].shape == (V + 1,) and own["objectives.mlm.bias"][V] == 0
    torch.testing.assert_close(system.encoder.word_embeddings.weight[:V], ref["bert.embeddings.word_embeddings.weight"])


def test_init_from_overwrites_the_hybrid_init_and_the_pooler_stays_mberts(tmp_path) -> None:
    """The seed's downstream order (retrieval / MLT): the model is built from M-BERT (pooler included), then
    ``PARTIAL_PRETRAIN`` (a pretraining checkpoint, no pooler) overwrites every key it has. So with `mbert_dir` and
    `init_from` every key of the checkpoint file is the file's tensor and the pooler is M-BERT's, both compared
    exactly against the files as written (safetensors / torch.load, not vl's loaders)."""
    from safetensors.torch import load_file

    _saved_mbert(tmp_path / "mbert", seed=5)
    torch.manual_seed(6)
    pretrain = MMBertSystem(  # a pretraining run: with_pooler false, so its checkpoint has no pooler keys
        encoder={
            "_target_": "vl.models.mm_bert.MMBertEncoder",
            "text_encoder": TINY,
            "coord_dim": 4,
            "with_pooler": False,
        },
        objectives=["mlm", "mvrc"],
        data_info={"visual_dim": D, "vocab_size": V + 1, "num_region_classes": C},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
    )
    with torch.no_grad():
        for p in pretrain.parameters():
            p.add_(torch.randn_like(p))
    torch.save({"state_dict": pretrain.state_dict()}, tmp_path / "pretrain.ckpt")
    system = _system(mbert_dir=str(tmp_path / "mbert"), init_from=str(tmp_path / "pretrain.ckpt"))
    held = torch.load(tmp_path / "pretrain.ckpt", weights_only=True)["state_dict"]
    ref = load_file(str(tmp_path / "mbert" / "model.safetensors"))
    own = system.state_dict()
    assert not any("pooler" in k for k in held)
    for key, value in held.items():
        assert torch.equal(own[key], value), key
    # the hybrid init did load M-BERT's encoder before (and it differs from the checkpoint's): init_from's won
    assert not torch.equal(
        held["encoder.bert.encoder.layer.0.output.dense.weight"], ref["bert.encoder.layer.0.output.dense.weight"]
    )
    missing = sorted(set(own) - set(held))
    assert missing == ["encoder.bert.pooler.dense.bias", "encoder.bert.pooler.dense.weight"]
    for key in missing:
        assert torch.equal(own[key], ref[key.replace("encoder.", "", 1)]), key
    # without mbert_dir the pooler keeps its random init
    plain = _system(init_from=str(tmp_path / "pretrain.ckpt")).state_dict()
    assert not torch.equal(plain["encoder.bert.pooler.dense.weight"], ref["bert.pooler.dense.weight"])


def test_only_mm_bert_overrides_the_initial_weights_step() -> None:
    """`initial_weights` (before `init_from`) is a no-op in the shared system: no other system's load order moves."""
    from vl.models.system import VLSystem

    assert MMBertSystem.initial_weights is not VLSystem.initial_weights
    import vl.models.clip_bert
    import vl.models.clip_vil
    import vl.models.vg_bert

    for module in (vl.models.clip_bert, vl.models.clip_vil, vl.models.vg_bert):
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, VLSystem):
                assert cls.initial_weights is VLSystem.initial_weights, cls


def test_hybrid_init_fails_when_nothing_loads(tmp_path) -> None:
    from vl.errors import ConfigError

    torch.save({"state_dict": {"module.vlbert.mvrc_head.head.2.bias": torch.zeros(C)}}, tmp_path / "vl.model")
    with pytest.raises(ConfigError, match="model.vlbert_checkpoint"):
        _system(vlbert_checkpoint=str(tmp_path / "vl.model"))
    (tmp_path / "mbert").mkdir()
    from safetensors.torch import save_file

    save_file({"cls.predictions.bias": torch.zeros(V)}, str(tmp_path / "mbert" / "model.safetensors"))
    with pytest.raises(ConfigError, match="model.mbert_dir"):
        _system(mbert_dir=str(tmp_path / "mbert"))


def test_lr_is_base_lr_times_total_batch() -> None:
    system = _system(lr_per_example=1e-6)
    dm = SimpleNamespace(batch_size_per_device=8, examples_per_device_step=16)
    system._trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=3, datamodule=dm)
    optimizer = system.configure_optimizers()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6 * 16 * 2 * 3)


@pytest.mark.parametrize("every", [True, False])
def test_weight_decay_groups(every) -> None:
    """`decay_every_parameter` True (the seed's one AdamW group: every parameter decays); False: the shared rule
    (biases, LayerNorm weights and other 1-d parameters get none). Checked by name and shape, written out here."""
    system = MMBertSystem(
        encoder={"_target_": "vl.models.mm_bert.MMBertEncoder", "text_encoder": TINY, "coord_dim": 4},
        objectives=["mlm", "mvrc"],
        data_info={"visual_dim": D, "vocab_size": V + 1, "num_region_classes": C},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 1e-4},
        lr_per_example=1e-6,
        decay_every_parameter=every,
    )
    dm = SimpleNamespace(batch_size_per_device=8, examples_per_device_step=8)
    system._trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1, datamodule=dm)
    optimizer = system.configure_optimizers()
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    wd = float(system.optimizer_cfg["weight_decay"])
    assert wd > 0
    for name, p in system.named_parameters():
        exempt = name.endswith("bias") or "LayerNorm" in name or "visual_ln" in name or p.ndim < 2
        assert decay_of[id(p)] == (wd if every or not exempt else 0.0), name
    if every:
        assert {g["weight_decay"] for g in optimizer.param_groups} == {wd}


class _PairModel(nn.Module):
    """score(caption t, image i) = a fixed function of the caption's token ids and the image's features."""

    device = torch.device("cpu")

    def pair_scorer(self):
        return lambda pooled: pooled[:, 0]

    def forward(self, batch):
        text = (batch["input_ids"].float() * batch["attention_mask"]).sum(1)
        image = batch["visual_feats"][:, 0, 0]
        return SimpleNamespace(pooled=torch.sin(text * 0.37 + image * 3.0).unsqueeze(-1))


class _CharTok:
    """One id per character: a caption's score depends on its text only."""

    pad_token_id = 0

    def __call__(self, text, text_b=None, **kwargs):
        return {"input_ids": [ord(c) % 50 + 1 for c in text]}


def _gallery(n: int, rng: np.random.Generator, *, longest_suffix: int) -> tuple[list[str], list[dict]]:
    """n captions `caption <i> x..x` and n images of 2 random regions (whole-image size 500 x 375)."""
    texts = [f"caption {i} {'x' * int(rng.integers(longest_suffix))}" for i in range(n)]
    visuals = [
        {"features": rng.standard_normal((2, 3)).astype(np.float32), "boxes_norm": np.zeros((2, 4), np.float32),
         "image_w": 500, "image_h": 375}
        for _ in range(n)
    ]  # fmt: skip
    return texts, visuals


def test_exhaustive_retrieval_both_directions_against_a_full_matrix(tmp_path) -> None:
    import json

    from vl.data.multi30k_collate import Multi30kCollator
    from vl.models.ranking import exhaustive_retrieval

    n = 11
    texts, visuals = _gallery(n, np.random.default_rng(0), longest_suffix=5)
    model = _PairModel()
    collator = Multi30kCollator(_CharTok(), max_text_len=32, max_regions=2, fixed_shapes=True)
    metrics = exhaustive_retrieval(model, collator, texts, visuals, text_chunk=4, scores_path=tmp_path / "s.json")
    # independent: the full N x N matrix, pair by pair
    full = np.zeros((n, n))
    for t in range(n):
        ids = np.asarray([ord(c) % 50 + 1 for c in texts[t]], np.float64)
        for i in range(n):
            full[t, i] = np.sin(ids.sum() * 0.37 + float(visuals[i]["features"][0, 0]) * 3.0)
    rows = json.loads((tmp_path / "s.json").read_text())
    assert len(rows) == n * n and set(rows[0]) == {"caption_id", "image_ids", "logit"}
    got = np.zeros((n, n))
    for r in rows:
        got[r["caption_id"], r["image_ids"]] = r["logit"][0]
    np.testing.assert_allclose(got, full, atol=1e-5)  # the file's scores are the pairs' (float32) scores
    # the ranks: the seed's evaluate.py rule (stable sort, exact scores) over those scores
    t2i, i2t = _seed_ranks(got), _seed_ranks(got.T)
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in (1, 5, 10):
            assert metrics[f"{name}_recall@{k}"] == pytest.approx((ranks <= k).mean())
        assert metrics[f"{name}_median_rank"] == pytest.approx(np.floor(np.median(ranks)))  # the seed's medR


def _seed_ranks(scores: np.ndarray) -> np.ndarray:
    """Each row's gold (row i: column i) position, 1-based, in the seed's `sorted(value.items(),
    key=operator.itemgetter(1), reverse=True)` over the row in index order (`retrieval/evaluate.py`): a stable sort of
    the exact scores, so an equal score at a lower index comes first."""
    import operator

    ranks = []
    for i, row in enumerate(scores):
        ranked = sorted(enumerate(row.tolist()), key=operator.itemgetter(1), reverse=True)
        ranks.append([c for c, _ in ranked].index(i) + 1)
    return np.asarray(ranks)


class _TiedPairModel(_PairModel):
    """`_PairModel`'s scores rounded to halves (five values): most pairs tie with several others."""

    def forward(self, batch):
        out = super().forward(batch)
        return SimpleNamespace(pooled=torch.round(out.pooled * 2) / 2)


def _seed_evaluate(scores_file) -> dict[str, float]:
    """MM-BERT's seed `retrieval/evaluate.py`, transcribed: the scores file into {caption: {image: logit}} and
    {image: {caption: logit}} in file order; R@1 when `max` (the first of the highest) is the gold, R@5 / R@10 when
    the gold is among the first k of the stable `sorted(..., reverse=True)`."""
    import json
    import operator

    captions_dict: dict[int, dict[int, float]] = {}
    image_dict: dict[int, dict[int, float]] = {}
    for p in json.loads(scores_file.read_text()):
        captions_dict.setdefault(p["caption_id"], {})[p["image_ids"]] = p["logit"][0]
        image_dict.setdefault(p["image_ids"], {})[p["caption_id"]] = p["logit"][0]
    out = {}
    for name, table in (("t2i", captions_dict), ("i2t", image_dict)):
        correct = [0, 0, 0]
        for index, value in table.items():
            correct[0] += max(value.items(), key=operator.itemgetter(1))[0] == index
            ranked = sorted(value.items(), key=operator.itemgetter(1), reverse=True)
            correct[1] += index in dict(ranked[:5])
            correct[2] += index in dict(ranked[:10])
        for k, c in zip((1, 5, 10), correct):
            out[f"{name}_recall@{k}"] = c / len(table)
    return out


def test_exhaustive_retrieval_breaks_ties_as_the_seeds_evaluate(tmp_path) -> None:
    """With many tied scores, R@1/5/10 both ways equal the seed's `retrieval/evaluate.py` read over the scores file
    vl writes (ties: the lower index first); vl's earlier rule (`ties="gold"`, ties in the gold's favour) is
    another function on these scores."""
    from vl.data.multi30k_collate import Multi30kCollator
    from vl.models.ranking import exhaustive_retrieval

    n = 23
    texts, visuals = _gallery(n, np.random.default_rng(2), longest_suffix=7)
    collator = Multi30kCollator(_CharTok(), max_text_len=32, max_regions=2, fixed_shapes=True)
    got = exhaustive_retrieval(
        _TiedPairModel(), collator, texts, visuals, text_chunk=4, scores_path=tmp_path / "s.json"
    )
    want = _seed_evaluate(tmp_path / "s.json")
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    earlier = exhaustive_retrieval(_TiedPairModel(), collator, texts, visuals, text_chunk=4, ties="gold")
    assert any(earlier[key] != pytest.approx(value) for key, value in want.items())


class _LogitTableModel(nn.Module):
    """MM-BERT's ITM scorer (`BinaryImageTextMatching.score`: a float32 sigmoid) over a fixed logit table: caption t
    (token id t + 1) with image i (feature i), or EN line t (first id t + 1) with DE line j (last id j + 1)."""

    device = torch.device("cpu")

    def __init__(self, logits: np.ndarray) -> None:
        super().__init__()
        self.logits = torch.as_tensor(logits, dtype=torch.float32)

    def pair_scorer(self):
        return lambda pooled: torch.sigmoid(pooled[:, 0])

    def forward(self, batch):
        ids = batch["input_ids"]
        row = ids[:, 0] - 1
        if "visual_feats" in batch:
            col = batch["visual_feats"][:, 0, 0].round().long()
        else:
            col = ids.gather(1, (batch["attention_mask"].sum(1, keepdim=True) - 1).long())[:, 0] - 1
        return SimpleNamespace(pooled=self.logits[row, col].unsqueeze(-1))


class _IndexTok:
    """Text 't<i>' -> id i + 1; a pair (text, text_b) -> [i + 1, 99, j + 1]."""

    pad_token_id = 0

    def __call__(self, text, text_b=None, **kwargs):
        ids = [int(text[1:]) + 1]
        return {"input_ids": ids if text_b is None else [*ids, 99, int(text_b[1:]) + 1]}


def _seed_metrics(logits: np.ndarray, names: tuple[str, str]) -> dict[str, float]:
    """The seed's ranking over its scores: `F.sigmoid(logit)` in float32 (`retrieval/function/test.py`), then
    `retrieval/evaluate.py`'s `max` (R@1) and stable `sorted` (R@5/10) both ways, by `_seed_ranks`."""
    scores = torch.sigmoid(torch.as_tensor(logits, dtype=torch.float32)).double().numpy()
    out = {}
    for name, ranks in zip(names, (_seed_ranks(scores), _seed_ranks(scores.T))):
        for k in (1, 5, 10):
            out[f"{name}_recall@{k}"] = float((ranks <= k).mean())
    return out


def _confident_logits() -> list[np.ndarray]:
    """The 3 x 3 case (gold (0, 0) at logit 14, image 1 at 15 for caption 0: distinct float32 sigmoids 4.8e-7 apart)
    and a 20 x 20 one with logits in [10, 17] (sigmoids within ~5e-5 of 1.0, ~6e-8 apart, some exactly 1.0)."""
    small = np.array([[14.0, 15.0, -5.0], [-5.0, 14.0, -5.0], [-5.0, -5.0, 14.0]])
    return [small, np.random.default_rng(5).uniform(10.0, 17.0, size=(20, 20))]


@pytest.mark.parametrize("text_chunk", [1, 3, 7, 32])
def test_exhaustive_retrieval_ranks_a_confident_models_exact_scores_as_the_seed(text_chunk) -> None:
    """A confident model's float32 sigmoid scores near 1.0 differ by ~6e-8: ranked as the seed's evaluate.py ranks
    them (exact scores, ties only between equal floats, the lower index first), in every chunking; the 3 x 3 case's
    caption 0 ranks its gold 2nd (R@1 2/3), not 1st as a 1e-6 tolerance made it."""
    from vl.data.multi30k_collate import Multi30kCollator
    from vl.models.ranking import exhaustive_retrieval

    for logits in _confident_logits():
        n = len(logits)
        texts = [f"t{i}" for i in range(n)]
        visuals = [
            {"features": np.full((1, 3), i, np.float32), "boxes_norm": np.zeros((1, 4), np.float32),
             "image_w": 500, "image_h": 375}
            for i in range(n)
        ]  # fmt: skip
        collator = Multi30kCollator(_IndexTok(), max_text_len=8, max_regions=1, fixed_shapes=True)
        got = exhaustive_retrieval(
            _LogitTableModel(logits), collator, texts, visuals, text_chunk=text_chunk, batch_size=5
        )
        want = _seed_metrics(logits, ("t2i", "i2t"))
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (n, key)
        if n == 3:
            assert got["t2i_recall@1"] == pytest.approx(2 / 3)
            loose = exhaustive_retrieval(
                _LogitTableModel(logits), collator, texts, visuals, text_chunk=text_chunk, tolerance=1e-6
            )
            assert loose["t2i_recall@1"] == pytest.approx(1.0)  # the opt-in tolerance: 14 and 15 tie


@pytest.mark.parametrize("text_chunk", [4, 32])
def test_translation_retrieval_ranks_exact_scores_as_the_seed(text_chunk) -> None:
    """The same cases through `translation_retrieval` (no image): EN line i x DE line j, ranked as the seed's
    `evaluate_translation.py` (the same `max` / stable `sorted` rule as `evaluate.py`)."""
    from vl.data.multi30k_collate import Multi30kCollator
    from vl.models.ranking import translation_retrieval

    for logits in _confident_logits():
        n = len(logits)
        collator = Multi30kCollator(_IndexTok(), max_text_len=8, max_regions=1, fixed_shapes=True)
        got = translation_retrieval(
            _LogitTableModel(logits),
            collator,
            [f"t{i}" for i in range(n)],
            [f"t{j}" for j in range(n)],
            None,
            text_chunk=text_chunk,
            batch_size=7,
        )
        want = _seed_metrics(logits, ("de", "en"))
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (n, key)


def test_exhaustive_retrieval_scores_joint_caption_pairs(tmp_path) -> None:
    """`data.both_layout: joint`: the gallery's texts are `{"text": EN, "text_b": DE}` rows; each scores as the one
    joint row (EN ids, a separator, DE ids), one N x N matrix, as the seed's test scores `[CLS] EN [SEP] DE [SEP]`."""
    import json

    from vl.data.multi30k_collate import Multi30kCollator
    from vl.models.ranking import exhaustive_retrieval

    class Tok:  # one id per character, 49 between the two texts
        pad_token_id = 0

        def __call__(self, text, text_b=None, **kwargs):
            ids = [ord(c) % 40 + 1 for c in text]
            return {"input_ids": ids if text_b is None else [*ids, 49, *[ord(c) % 40 + 1 for c in text_b]]}

    n = 9
    rng = np.random.default_rng(1)
    texts = [{"text": f"en {i}", "text_b": f"de {'y' * int(rng.integers(4))} {n - i}"} for i in range(n)]
    visuals = [
        {"features": rng.standard_normal((2, 3)).astype(np.float32), "boxes_norm": np.zeros((2, 4), np.float32),
         "image_w": 500, "image_h": 375}
        for _ in range(n)
    ]  # fmt: skip
    collator = Multi30kCollator(Tok(), max_text_len=32, max_regions=2, fixed_shapes=True)
    metrics = exhaustive_retrieval(
        _PairModel(), collator, texts, visuals, text_chunk=4, scores_path=tmp_path / "s.json"
    )
    full = np.zeros((n, n))
    for t in range(n):
        joint = [ord(c) % 40 + 1 for c in texts[t]["text"]] + [49] + [ord(c) % 40 + 1 for c in texts[t]["text_b"]]
        for i in range(n):
            full[t, i] = np.sin(float(sum(joint)) * 0.37 + float(visuals[i]["features"][0, 0]) * 3.0)
    got = np.zeros((n, n))
    for r in json.loads((tmp_path / "s.json").read_text()):
        got[r["caption_id"], r["image_ids"]] = r["logit"][0]
    np.testing.assert_allclose(got, full, atol=1e-5)
    assert metrics["t2i_recall@1"] == pytest.approx((_seed_ranks(got) <= 1).mean())


def _tokenizer(tmp_path: Path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a man dog runs on the grass red ball with".split()]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=False)


def kept_by_closed_form(n_text: int, n_boxes: int, seq_len: int) -> tuple[int, int]:
    """The seed's one-at-a-time truncation (VL-BERT datasets' `seq_len`), in closed form: boxes go while they outnumber
    the tokens, tokens while they do not; once level the two alternate (tokens first if level, boxes first if the
    tokens were cut to one below the boxes); then at least 2 tokens and 1 box."""
    excess = n_text + n_boxes - seq_len
    if excess <= 0:
        return n_text, n_boxes
    t, b = n_text, n_boxes
    if b > t:
        cut = min(excess, b - t)
        b, excess = b - cut, excess - cut
        t, b = t - (excess + 1) // 2, b - excess // 2
    else:
        cut = min(excess, t - b + 1)
        t, excess = t - cut, excess - cut
        t, b = t - excess // 2, b - (excess + 1) // 2
    return max(t, 2), max(b, 1)


def test_joint_truncation_is_the_seeds_on_random_rows() -> None:
    """`Multi30kCollator.pair_batch` (data.seq_len) against the closed form above on 400 random rows: each row keeps
    its first kept-1 tokens and its last ([SEP]), labels alike, its first kept-1 regions (MVRC keys cleared beyond),
    and the whole-image mean mask is every real unreplaced region before truncation; rows without an image and rows
    within the limit are untouched."""
    from vl.data.multi30k_collate import Multi30kCollator, seed_truncation

    rng = np.random.default_rng(0)
    for t, b, L in rng.integers(1, 120, (2000, 3)):
        assert seed_truncation(int(t), int(b), int(L) + 3) == kept_by_closed_form(int(t), int(b), int(L) + 3)
    collator = Multi30kCollator(SimpleNamespace(pad_token_id=0), seq_len=64)
    g = torch.Generator().manual_seed(0)
    B, T, R = 400, 70, 100
    n_text = torch.randint(3, T + 1, (B,), generator=g)
    n_reg = torch.randint(0, R + 1, (B,), generator=g)
    tmask = (torch.arange(T) < n_text[:, None]).long()
    vmask = (torch.arange(R) < n_reg[:, None]).long()
    batch = {
        "input_ids": torch.randint(5, V, (B, T), generator=g) * tmask,
        "attention_mask": tmask,
        "token_type_ids": torch.zeros(B, T, dtype=torch.long),
        "mlm_labels": torch.where(torch.rand(B, T, generator=g) < 0.3, torch.randint(5, V, (B, T), generator=g), -100)
        * tmask
        + (tmask - 1) * 100,
        "visual_mask": vmask,
        "region_mask_labels": (torch.rand(B, R, generator=g) < 0.15) & vmask.bool(),
        "has_image": torch.rand(B, generator=g) < 0.9,
    }
    batch["mvrc_replace"] = batch["region_mask_labels"] & (torch.rand(B, R, generator=g) < 0.9)
    before = {k: v.clone() for k, v in batch.items()}
    collator.pair_batch(batch)
    truncated = 0
    for i in range(B):
        t, r = int(n_text[i]), int(n_reg[i])
        keys = ("input_ids", "mlm_labels", "attention_mask")
        if not before["has_image"][i]:
            assert all(torch.equal(batch[k][i], before[k][i]) for k in (*keys, "visual_mask")), i
            continue
        kt, kb = kept_by_closed_form(t, 1 + r, 64)
        truncated += (kt, kb) != (t, 1 + r)
        for k in ("input_ids", "mlm_labels"):
            row = before[k][i, :t].tolist()
            assert batch[k][i, :kt].tolist() == row[: kt - 1] + row[-1:], (i, k)
        assert batch["attention_mask"][i].tolist() == [1] * kt + [0] * (T - kt)
        assert batch["visual_mask"][i].tolist() == [1] * (kb - 1) + [0] * (R - kb + 1)
        for k in ("region_mask_labels", "mvrc_replace"):
            assert batch[k][i].tolist() == before[k][i, : kb - 1].tolist() + [False] * (R - kb + 1)
        want_mean = before["visual_mask"][i].bool() & ~before["mvrc_replace"][i]
        assert torch.equal(batch["image_mean_mask"][i], want_mean)
    assert 50 < truncated < B  # both kinds of rows occur


def test_whole_image_box_averages_the_regions_before_truncation() -> None:
    """With `image_mean_mask` (set by the joint truncation) the image box's feature is the mean over that mask (the
    seed averages before truncating), the truncated regions themselves not in the sequence."""
    enc, batch = make_encoder(), make_batch()
    batch["image_mean_mask"] = batch["visual_mask"].bool() & ~batch["mvrc_replace"]
    batch["visual_mask"] = batch["visual_mask"].clone()
    batch["visual_mask"][0, 2:] = 0  # row 0 truncated to 2 regions
    feats, _, valid, _ = enc.region_inputs(batch)
    f, keep = batch["visual_feats"].numpy(), batch["image_mean_mask"].numpy()
    np.testing.assert_allclose(feats[0, 0].detach().numpy(), f[0][keep[0]].mean(0), atol=1e-6)  # regions 0, 2, 4
    assert valid[0].tolist() == [True, True, True, False, False, False]


@torch.no_grad()
@pytest.mark.parametrize("seq_len", [None, 9])
def test_gallery_scores_a_pair_as_a_hand_built_training_batch(tmp_path, seq_len) -> None:
    """The retrieval gallery's pair score equals the score of the pair's batch built by hand as training builds it:
    the whole-image box is [0, 0, w-1, h-1] / (w, h) (`visual_image_size`), not [0, 0, 1, 1]. With `seq_len` 9 each
    caption x image pair is truncated jointly as the seed's dataset does (text 8 / 6 tokens, images 5 / 3 regions + the
    image box), the image box still the mean of every region."""
    from vl.data.multi30k_collate import Multi30kCollator
    from vl.models.ranking import gallery_scorer

    tok = _tokenizer(tmp_path)
    torch.manual_seed(0)
    model = MMBertSystem(
        encoder={"_target_": "vl.models.mm_bert.MMBertEncoder", "text_encoder": TINY, "coord_dim": 32},
        objectives=["itm_bce"],
        data_info={"visual_dim": D, "vocab_size": len(tok)},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
    ).eval()
    for ln in (model.encoder.visual_ln_text, model.encoder.visual_ln_object):  # trained: non-zero visual weights
        ln.weight.normal_()
    rng = np.random.default_rng(0)
    R = 5
    visuals = []
    for w, h, n in ((500, 375, 5), (640, 480, 3)):
        xy = rng.uniform(0, 0.5, (n, 2))
        box = np.concatenate([xy, xy + 0.3], 1).astype(np.float32)
        feats = rng.standard_normal((n, D)).astype(np.float32)
        visuals.append({"features": feats, "boxes_norm": box, "cls_prob": None, "image_w": w, "image_h": h})
    texts = ["a man runs on the grass", "a dog with red ball"]
    collator = Multi30kCollator(tok, max_text_len=16, max_regions=R, fixed_shapes=True, seq_len=seq_len)
    gallery = gallery_scorer(model, collator, texts, visuals, batch_size=3)([0, 1], [0, 1])

    def by_hand(text: str, visual: dict, with_size: bool = True) -> dict:
        ids = [tok.cls_token_id, *tok.convert_tokens_to_ids(text.split()), tok.sep_token_id]
        n = visual["features"].shape[0]
        feats, boxes, mask = torch.zeros(1, R, D), torch.zeros(1, R, 4), torch.zeros(1, R, dtype=torch.long)
        feats[0, :n], boxes[0, :n], mask[0, :n] = (
            torch.tensor(visual["features"]),
            torch.tensor(visual["boxes_norm"]),
            1,
        )
        mean_mask = mask.bool().clone()
        if seq_len is not None:
            kt, kb = kept_by_closed_form(len(ids), 1 + n, seq_len)
            ids = ids[: kt - 1] + ids[-1:]
            mask[0, kb - 1 :] = 0
        batch = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "visual_feats": feats,
            "visual_boxes": boxes,
            "visual_mask": mask,
            "has_image": torch.tensor([True]),
            "image_mean_mask": mean_mask,
        }
        if with_size:
            batch["visual_image_size"] = torch.tensor([[float(visual["image_w"]), float(visual["image_h"])]])
        return batch

    score = model.objectives["itm_bce"].score
    for t in range(2):
        for i in range(2):
            want = score(model(by_hand(texts[t], visuals[i])).pooled)[0]
            torch.testing.assert_close(gallery[t, i], want, atol=1e-5, rtol=1e-5)
            unsized = score(model(by_hand(texts[t], visuals[i], with_size=False)).pooled)[0]
            assert abs(float(unsized - want)) > 1e-6  # the image size matters: the check is not vacuous


def test_gallery_images_without_a_size_are_named() -> None:
    from vl.data.multi30k_collate import Multi30kCollator

    collator = Multi30kCollator(None, max_regions=2, fixed_shapes=True)
    visual = {"image_id": "42", "features": np.zeros((1, D), np.float32), "boxes_norm": np.zeros((1, 4), np.float32)}
    with pytest.raises(DataError, match="image 42: no image_w"):
        collator.visual_batch([visual])


def test_the_scheduler_is_vl_berts_triangle() -> None:
    """`model=mm_bert`'s scheduler (vl.schedules.vlbert_triangle with warmup_steps) against VL-BERT's triangle
    as its trainer steps it: ``WarmupLinearSchedule.lr_lambda(s)`` = s / W before W, then (T - s) / (T - W) down to 0,
    and ``lr_scheduler.step()`` runs before ``optimizer.step()``, so update k (0-based) is at lr x lr_lambda(k + 1)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / "mm_bert.yaml").scheduler
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    total, warmup = 100, 10
    sched = instantiate(node, warmup_steps=warmup)(opt, total_steps=total)
    for step in range(total + 3):
        s = step + 1  # the seed's scheduler has stepped once more than the optimizer when the update runs
        want = 2.0 * (s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup)))
        assert abs(opt.param_groups[0]["lr"] - want) < 1e-12, step
        opt.step()
        sched.step()


@torch.no_grad()
def test_blank_vision_is_the_seeds_no_vision_translation_module() -> None:
    """`blank_vision` (the seed's `ResNetVLBERTForPretrainingTranslationNoVision`): `text_visual_embeddings[:] =
    aux_text_visual_embedding` and `object_vl_embeddings = zeros` fed to VL-BERT's `embedding`, so every text token
    gets visual_ln_text(aux), every object (whole-image box + regions, still attended, type 2, position n)
    visual_ln_object(0) = its bias, [END] at n + 1; built by hand per row (numpy LayerNorms)."""
    torch.manual_seed(0)
    enc = make_encoder()
    enc.blank_vision = True
    batch = {**make_batch(), "has_image": torch.ones(3, dtype=torch.bool)}  # translation rows all have an image
    out = enc(batch)
    aux = enc.aux_text_visual_embedding.weight[0].numpy().astype(np.float64)
    text_visual = seed_layer_norm(aux, enc.visual_ln_text.weight.numpy(), enc.visual_ln_text.bias.numpy())
    blank_object = seed_layer_norm(np.zeros(H), enc.visual_ln_object.weight.numpy(), enc.visual_ln_object.bias.numpy())
    for b in range(3):
        n_t = int(batch["attention_mask"][b].sum())
        n_o = 1 + int(batch["visual_mask"][b].sum())  # the whole-image box (ADD_IMAGE_AS_A_BOX) + the regions
        words = enc.bert.embeddings.word_embeddings(batch["input_ids"][b, :n_t])
        embs = torch.cat(
            [
                words + torch.tensor(text_visual, dtype=torch.float32),
                torch.tensor(blank_object, dtype=torch.float32).expand(n_o, -1),
                enc.end_embedding.weight,
            ]
        )
        ref = enc.bert(
            inputs_embeds=embs[None],
            position_ids=torch.tensor([[*range(n_t), *[n_t] * n_o, n_t + 1]]),
            token_type_ids=torch.tensor([[0] * n_t + [2] * (n_o + 1)]),
            attention_mask=torch.ones(1, n_t + n_o + 1, dtype=torch.long),
        )
        states = ref.last_hidden_state[0]
        torch.testing.assert_close(out.text[b, :n_t], states[:n_t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.visual[b, :n_o], states[n_t : n_t + n_o], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooled[b], ref.pooler_output[0], atol=1e-5, rtol=1e-5)
    # nothing of the image but its number of boxes: other features / boxes give the same output, one box fewer not
    other = {
        **batch,
        "visual_feats": torch.randn_like(batch["visual_feats"]),
        "visual_boxes": batch["visual_boxes"] / 2,
    }
    torch.testing.assert_close(enc(other).pooled, out.pooled)
    fewer = {**batch, "visual_mask": batch["visual_mask"].clone()}
    fewer["visual_mask"][0, 4] = 0
    assert (enc(fewer).text[0] - out.text[0]).abs().max() > 1e-4  # the text attends to one blank key fewer


def test_blank_vision_keeps_the_visual_parts_in_the_graph() -> None:
    """Under DDP every parameter must get a gradient each step: the blanked parts get zeros, not None."""
    enc = make_encoder()
    enc.blank_vision = True
    enc.train()
    batch = {**make_batch(), "has_image": torch.ones(3, dtype=torch.bool)}
    enc(batch).pooled.sum().backward()
    weight = enc.obj_downsample[1].weight.grad
    assert weight is not None and weight.abs().sum() == 0
    assert enc.object_linguistic_embeddings.weight.grad is not None
    assert enc.aux_text_visual_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("task", ["translation", "mlt"])
def test_the_no_vision_experiment_is_the_vision_one_with_blank_regions(make_cfg, task) -> None:
    """The seed's no-vision configs differ from their with-vision twins only in MODULE (translation:
    `..._translate_vision` / `..._translate_no_vision`; MLT: `..._MLT_LR6_startLR6[_no_vision]`): vl's experiments
    only in `model.encoder.blank_vision` (and their names / tags)."""
    from omegaconf import OmegaConf

    def flat(experiment: str) -> dict:
        cfg = OmegaConf.to_container(make_cfg(f"experiment={experiment}", name=experiment), resolve=False)
        out: dict = {}

        def walk(node, prefix=""):
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    out[f"{prefix}{key}"] = value

        walk(cfg)
        return out

    for suffix in ("", "_tiny"):
        vision, blank = flat(f"mm_bert_{task}{suffix}"), flat(f"mm_bert_{task}_no_vision{suffix}")
        differ = {k for k in vision.keys() | blank.keys() if vision.get(k) != blank.get(k)}
        differ = {k for k in differ if not k.startswith(("hydra.", "paths."))}  # the run's name and dirs
        assert differ <= {"task_name", "tags", "model.encoder.blank_vision"}, differ
        assert blank["model.encoder.blank_vision"] is True and not vision.get("model.encoder.blank_vision")
