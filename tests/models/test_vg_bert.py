"""VG-BERT's numbers against independent computations (spec: vg_bert.md): the VGG16 layout and key names, the spatial
attention block, the similarity S and the contrastive losses (numpy), the relation pair / relation terms (a hand
computation on a 2-image batch, and a per-pair loop as the seed's), the divide-by-10 object mean, freezing (frozen
parameters bit-identical after a step, the learnable layer count), segment ids all 1, the schedule, and weight
loading (strict key report, weights-only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vl.errors import ConfigError
from vl.heads.vg_bert import (
    cross_modal_contrastive_loss,
    pooled_contrastive_loss,
    relation_contrastive_loss,
    relation_scores,
    similarity_matrix,
)
from vl.models.vg_bert import CrossAttention, VGBertEncoder, object_pool, recall_at_k
from vl.models.vgg import SpatialSelfAttention, VGG16Features, VGGAttention, load_vgg_features

# torchvision's vgg16 "D" configuration, written out by hand (not imported from vl)
TORCHVISION_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
TINY_VGG = [4, 4, "M", 8, 8, "M", 8, 8, 8, "M", 16, 16, 16, "M", 16, 16, 16]
TINY_TEXT = {"hidden_size": 16, "num_layers": 3, "num_heads": 2, "intermediate_size": 32}


def torchvision_feature_keys() -> dict[str, tuple[int, ...]]:
    """`vgg16().features` state-dict keys and shapes, from the configuration (conv i at index i of the Sequential:
    conv, ReLU pairs and one MaxPool per "M"), the last max pool (index 30) included in the count but holding no key."""
    keys, index, cin = {}, 0, 3
    for v in TORCHVISION_VGG16:
        if v == "M":
            index += 1
            continue
        keys[f"features.{index}.weight"] = (v, cin, 3, 3)
        keys[f"features.{index}.bias"] = (v,)
        index += 2
        cin = v
    assert index == 31
    return keys


def _encoder(stage: str = "grounding", **kw) -> VGBertEncoder:
    torch.manual_seed(0)
    args = dict(
        data_info={"pixels": True, **({"num_relations": 115} if stage == "relational" else {})},
        stage=stage,
        text_encoder=TINY_TEXT,
        dropout_rate=0.0,
        vgg_cfg=TINY_VGG,
        visual_heads=2,
        visual_intermediate_size=32,
        num_positions=16,
        cross_heads=2,
        learnable_layers=2,
    )
    return VGBertEncoder(**{**args, **kw})


# ------------------------------------------------------------------------------------------------ visual stream
def test_vgg16_features_have_torchvision_keys_and_give_14x14x512() -> None:
    vgg = VGG16Features()
    own = {k: tuple(v.shape) for k, v in vgg.state_dict().items()}
    assert own == torchvision_feature_keys()
    assert max(int(k.split(".")[1]) for k in own) == 28 and len(vgg.features) == 30  # indices 0..29, no pool 30
    assert vgg.out_channels == 512 and vgg.stride == 16
    with torch.no_grad():
        assert tuple(vgg(torch.zeros(1, 3, 224, 224)).shape) == (1, 512, 14, 14)


def test_vgg_weights_load_weights_only_with_a_key_report(tmp_path: Path) -> None:
    vgg = VGG16Features(TINY_VGG)
    state = {k: torch.randn_like(v) for k, v in vgg.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # the rest of a torchvision vgg16 state dict
    torch.save(state, tmp_path / "vgg.pth")
    report = load_vgg_features(vgg, tmp_path / "vgg.pth")
    assert report["unused"] == ["classifier.0.weight"] and len(report["loaded"]) == 26
    assert all(torch.equal(vgg.state_dict()[k], state[k]) for k in report["loaded"])
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if k.startswith("features")}, str(tmp_path / "vgg.safetensors"))
    load_vgg_features(VGG16Features(TINY_VGG), tmp_path / "vgg.safetensors")
    del state["features.0.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"features\.0\.weight \(missing\)"):
        load_vgg_features(VGG16Features(TINY_VGG), tmp_path / "bad.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"features.0.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError):
        load_vgg_features(VGG16Features(TINY_VGG), tmp_path / "evil.pth")


def test_spatial_attention_matches_a_functional_recomputation() -> None:
    torch.manual_seed(1)
    att = SpatialSelfAttention(hidden_size=8, num_heads=2, intermediate_size=12, num_positions=6, dropout=0.0).eval()
    x = torch.randn(2, 8, 2, 3)
    got = att(x)
    p = dict(att.named_parameters())
    seq = x.permute(0, 2, 3, 1).reshape(2, 6, 8)  # row-major cells
    inp = seq + p["position_embeddings.weight"][:6]

    def lin(t, name):
        return t @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def heads(t):
        return t.reshape(2, 6, 2, 4).permute(0, 2, 1, 3)

    q, k, v = heads(lin(inp, "query")), heads(lin(inp, "key")), heads(lin(inp, "value"))
    ctx = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    ctx = ctx.permute(0, 2, 1, 3).reshape(2, 6, 8)
    h1 = F.layer_norm(lin(ctx, "dense") + seq, (8,), p["LayerNorm.weight"], p["LayerNorm.bias"])
    h2 = lin(torch.relu(lin(h1, "ffn")), "ffn_output")
    ref = F.layer_norm(h2 + h1, (8,), p["full_layernorm.weight"], p["full_layernorm.bias"])
    assert torch.allclose(got, ref.reshape(2, 2, 3, 8).permute(0, 3, 1, 2), atol=1e-5)
    with pytest.raises(ConfigError, match="num_positions"):
        att(torch.randn(1, 8, 3, 3))


def test_stage1_classifier_builds() -> None:
    from vl.models.vgg import VGGAttentionClassification

    model = VGGAttentionClassification(cfg=TINY_VGG, hidden_size=8, num_heads=2, intermediate_size=8, num_positions=16,
                                       classifier_width=16, num_classes=10)  # fmt: skip
    assert tuple(model(torch.randn(2, 3, 64, 64)).shape) == (2, 10)
    assert model.classifier[0].in_features == 8 * 49
    published = VGGAttention()  # VGG16 + 768 / 12 heads / 3072 / 196 positions
    assert published.attention.position_embeddings.weight.shape == (196, 768)
    assert published.attention.ffn.out_features == 3072 and published.attention.num_heads == 12


# ------------------------------------------------------------------------------------------------ objectives
def np_similarity(v: np.ndarray, w: np.ndarray, nwords: np.ndarray) -> np.ndarray:
    s = np.zeros((v.shape[0], w.shape[0]))
    for i in range(v.shape[0]):
        for j in range(w.shape[0]):
            n = max(1, int(nwords[j]))
            per_word = [max(float(v[i, p] @ w[j, t]) for p in range(v.shape[1])) for t in range(n)]
            s[i, j] = sum(per_word) / n
    return s


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_similarity_and_contrastive_loss_equal_numpy() -> None:
    rng = np.random.default_rng(0)
    v, w = rng.normal(size=(5, 7, 6)), rng.normal(size=(5, 9, 6))
    nwords = np.array([3, 9, 1, 5, 2])
    s = np_similarity(v, w, nwords)
    tv, tw, tn = (torch.tensor(a, dtype=torch.float64) for a in (v, w, nwords))
    got = similarity_matrix(tv, tw, tn.long(), chunk=2)
    assert np.allclose(got.numpy(), s, atol=1e-9)
    i2l = np.mean([-np_log_softmax(s[i, :] / 0.1)[i] for i in range(5)])
    l2i = np.mean([-np_log_softmax(s[:, i] / 0.1)[i] for i in range(5)])
    a, b = cross_modal_contrastive_loss(tv, tw, tn.long(), sigma=0.1)
    assert math.isclose(float(a), i2l, rel_tol=1e-9) and math.isclose(float(b), l2i, rel_tol=1e-9)
    img, txt = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    i2l = np.mean([-np_log_softmax(cos[i, :] / 0.1)[i] for i in range(4)])
    l2i = np.mean([-np_log_softmax(cos[:, i] / 0.1)[i] for i in range(4)])
    a, b = pooled_contrastive_loss(torch.tensor(img), torch.tensor(txt), sigma=0.1)
    assert math.isclose(float(a), i2l, rel_tol=1e-9) and math.isclose(float(b), l2i, rel_tol=1e-9)


def test_relation_pair_term_by_hand_on_a_two_image_batch() -> None:
    """Image 0: pair (0,1) class 1, pair (1,0) class 2; image 1: pair (0,1) class 1. N = 2 objects, K = 3, T = 1."""
    scores = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    # r_k(i, j) chosen by hand
    scores[0, 1, 0, 1], scores[0, 2, 0, 1], scores[0, 0, 0, 1] = 2.0, 0.5, 0.1
    scores[0, 1, 1, 0], scores[0, 2, 1, 0], scores[0, 0, 1, 0] = -1.0, 1.5, 0.0
    scores[1, 1, 0, 1], scores[1, 2, 0, 1], scores[1, 0, 0, 1] = 0.3, -0.2, 0.4
    target = torch.zeros(2, 2, 2, dtype=torch.long)
    target[0, 0, 1], target[0, 1, 0], target[1, 0, 1] = 1, 2, 1
    pair, relation = relation_contrastive_loss(scores, target, temperature=1.0)
    # pair terms: class-1 pairs' negatives = r_1 at every non-null pair of another class = r_1 at (img0, 1, 0) = -1.0
    p1 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(-1.0)))
    p3 = -math.log(math.exp(0.3) / (math.exp(0.3) + math.exp(-1.0)))
    # class-2 pair's negatives: r_2 at the class-1 pairs (img0 (0,1): 0.5, img1 (0,1): -0.2)
    p2 = -math.log(math.exp(1.5) / (math.exp(1.5) + math.exp(0.5) + math.exp(-0.2)))
    assert math.isclose(float(pair), (p1 + p2 + p3) / 2, rel_tol=1e-12)

    def rel(c, values):
        return -math.log(math.exp(values[c]) / sum(math.exp(x) for x in values))

    r = rel(1, [0.1, 2.0, 0.5]) + rel(2, [0.0, -1.0, 1.5]) + rel(1, [0.4, 0.3, -0.2])
    assert math.isclose(float(relation), r / 2, rel_tol=1e-12)


def test_relation_loss_equals_the_seed_per_pair_loop_with_temperature() -> None:
    torch.manual_seed(3)
    b, k, n, t = 3, 5, 4, 0.7
    scores = torch.randn(b, k, n, n, dtype=torch.float64)
    target = torch.randint(0, k, (b, n, n))
    pair, relation = relation_contrastive_loss(scores, target, temperature=t)
    flat, tgt = scores.reshape(b, k, -1), target.reshape(b, -1)
    ref_pair = ref_rel = 0.0
    for bi in range(b):
        for m in tgt[bi].nonzero().flatten().tolist():
            c = int(tgt[bi, m])
            neg = flat[:, c, :][(tgt != 0) & (tgt != c)]
            vec = torch.cat([flat[bi, c, m : m + 1], neg]) / t
            ref_pair += float(-torch.log_softmax(vec, 0)[0])
            ref_rel += float(-torch.log_softmax(flat[bi, :, m] / t, 0)[c])
    assert math.isclose(float(pair), ref_pair / b, rel_tol=1e-10)
    assert math.isclose(float(relation), ref_rel / b, rel_tol=1e-10)


def test_relation_scores_bilinear_and_matrices_normalised() -> None:
    from vl.heads.vg_bert import RelationalGrounding

    torch.manual_seed(4)
    o, m = torch.randn(2, 3, 4), torch.randn(5, 4, 4)
    got = relation_scores(o, m)
    assert torch.allclose(got[1, 2, 0, 2], o[1, 0] @ m[2] @ o[1, 2], atol=1e-6)
    head = RelationalGrounding(hidden_size=8, num_relations=115, num_object_classes=56, subspace_dim=32).eval()
    mats = head.normalized_matrices()
    assert mats.shape == (115, 32, 32)
    assert torch.allclose(mats.flatten(1).norm(dim=1), torch.ones(115), atol=1e-6)
    bound = math.sqrt(6.0 / (32 * 32 + 115 * 32))  # xavier_uniform fan_in / fan_out of a (115, 32, 32) tensor
    assert float(head.relational_matrix.detach().abs().max()) <= bound + 1e-7
    cls = head.object_classifier
    assert (cls[0].in_features, cls[0].out_features, cls[3].out_features) == (8, 256, 56)


def test_object_pool_divides_by_all_ten_positions() -> None:
    hidden = torch.arange(2 * 10 * 3, dtype=torch.float64).reshape(2, 10, 3)
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, :4], mask[1, :7] = 1, 1
    got = object_pool(hidden, mask)
    assert torch.allclose(got[0], hidden[0, :4].sum(0) / 10) and torch.allclose(got[1], hidden[1, :7].sum(0) / 10)
    assert torch.allclose(object_pool(hidden, mask, "tokens")[0], hidden[0, :4].mean(0))


def test_encoder_object_states_and_segment_ids() -> None:
    enc = _encoder("relational").eval()
    ids = torch.randint(1000, 2000, (2, 3, 10))
    tmask = torch.zeros(2, 3, 10, dtype=torch.long)
    tmask[..., :4] = 1
    omask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = enc.encode_objects(ids, tmask, omask)
    seg = torch.ones(1, 10, dtype=torch.long)  # segment ids all 1
    ref = enc.bert(input_ids=ids[0, 1:2], attention_mask=tmask[0, 1:2], token_type_ids=seg).last_hidden_state
    assert torch.allclose(got[0, 1], (ref[0] * tmask[0, 1, :, None]).sum(0) / 10, atol=1e-5)
    assert torch.equal(got[0, 2], torch.zeros(16)) and torch.equal(got[1, 1:], torch.zeros(2, 16))
    zero_seg = enc.bert(input_ids=ids[0, 1:2], attention_mask=tmask[0, 1:2]).last_hidden_state
    assert not torch.allclose(ref, zero_seg)  # segment 1 is really used


def test_cross_attention_matches_a_recomputation() -> None:
    torch.manual_seed(5)
    att = CrossAttention(hidden_size=8, num_heads=2)
    assert att.query_language.bias is None and att.key_visual.bias is None and att.value_visual.bias is not None
    vis, lang = torch.randn(2, 6, 8), torch.randn(2, 3, 8)
    q = (lang @ att.query_language.weight.T).reshape(2, 3, 2, 4).transpose(1, 2)
    k = (vis @ att.key_visual.weight.T).reshape(2, 6, 2, 4).transpose(1, 2)
    v = att.value_visual(vis).reshape(2, 6, 2, 4).transpose(1, 2)
    ref = (torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v).transpose(1, 2).reshape(2, 3, 8)
    assert torch.allclose(att(vis, lang), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------ freezing
def test_freezing_groups_and_frozen_parameters_bit_identical_after_a_step() -> None:
    enc = _encoder("grounding", learnable_layers=2)
    layers = enc.bert.encoder.layer
    assert not any(p.requires_grad for p in enc.bert.embeddings.parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())  # 3 layers, last 2 learnable
    for layer in layers[1:]:
        assert layer.output.dense.weight.requires_grad and layer.attention.self.value.weight.requires_grad
    for layer in layers:  # freeze_qk: Q / K of all layers
        assert not layer.attention.self.query.weight.requires_grad and not layer.attention.self.key.bias.requires_grad
    assert not any(p.requires_grad for p in enc.visual.vgg.parameters())
    assert all(p.requires_grad for p in enc.visual.attention.parameters()) and enc.visual.embedder.weight.requires_grad
    learnable_layers = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    assert learnable_layers == [1, 2]
    counts = enc.parameter_counts
    assert counts["trainable"] == sum(p.numel() for p in enc.parameters() if p.requires_grad) > 0
    assert counts["frozen"] == sum(p.numel() for p in enc.parameters() if not p.requires_grad) > 0
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = torch.optim.Adam([p for p in enc.parameters() if p.requires_grad], lr=1e-2, weight_decay=5e-7)
    batch = {
        "pixel_values": torch.randn(3, 3, 64, 64),
        "input_ids": torch.randint(1000, 2000, (3, 7)),
        "attention_mask": torch.ones(3, 7, dtype=torch.long),
    }
    out = enc(batch)
    cross_modal_contrastive_loss(out.visual, out.text, batch["attention_mask"].sum(1))[0].backward()
    opt.step()
    for n, p in enc.named_parameters():
        if p.requires_grad:
            continue
        assert torch.equal(p, before[n]), n
    assert not torch.equal(enc.visual.embedder.weight, before["visual.embedder.weight"])
    transfer = _encoder("transfer", freeze_encoder=True)
    assert transfer.parameter_counts["trainable"] == 0
    with pytest.raises(ConfigError, match="learnable_layers"):
        _encoder(learnable_layers=4)
    with pytest.raises(ConfigError, match="stage=relational reads data=vg_bert_vg"):
        _encoder("relational", data_info={"pixels": True})
    with pytest.raises(ConfigError, match="stage=grounding reads data=vg_bert_coco"):
        _encoder("grounding", data_info={"pixels": True, "num_relations": 115})


def test_step_decay_halves_in_the_fifteenth_epoch_as_the_seed() -> None:
    from torch.optim.lr_scheduler import LambdaLR

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    sched = LambdaLR(opt, lambda epoch: 0.5 ** ((epoch + 1) // 15))
    lrs = []
    for _ in range(31):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    seed = [5e-5 * 0.5 ** (e // 15) for e in range(1, 32)]  # the seed's adjust_learning_rate, epochs from 1
    assert np.allclose(lrs, seed)


def test_recall_at_k_by_hand() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.95, 0.5, 0.2], [0.0, 0.1, 0.3]])
    r = recall_at_k(sim, ks=(1, 2))
    assert r["r1_i2t"] == pytest.approx(2 / 3) and r["r1_t2i"] == pytest.approx(2 / 3)
    assert r["r2_i2t"] == 1.0 and r["r2_t2i"] == 1.0


def test_seed_checkpoint_keys_map_to_vl(tmp_path: Path) -> None:
    """A state dict in the seed's layout (`RelationalGrounding` under DataParallel: `module.` + image_model.image_model.N
    / language_model.language_model.* / cross_attention_model.* / object_classifier.*) initialises the vl model."""
    from vl.models.vg_bert import VGBertSystem

    def build(init_from=None):
        torch.manual_seed(0)
        return VGBertSystem(
            encoder={"_target_": "vl.models.vg_bert.VGBertEncoder", "stage": "relational", "text_encoder": TINY_TEXT,
                     "vgg_cfg": TINY_VGG, "visual_heads": 2, "visual_intermediate_size": 32, "num_positions": 16,
                     "cross_heads": 2, "learnable_layers": 2},
            objectives=["vg_relational"], data_info={"pixels": True, "num_relations": 115, "num_object_classes": 56},
            optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}, init_from=init_from,
        )  # fmt: skip

    ref = build().state_dict()
    seed = {
        "module.image_model.image_model.2.weight": torch.randn_like(ref["encoder.visual.vgg.features.2.weight"]),
        "module.image_model.attention.query.weight": torch.randn_like(ref["encoder.visual.attention.query.weight"]),
        "module.language_model.language_model.encoder.layer.1.attention.self.key.weight": torch.randn(16, 16),
        "module.language_model.language_model.pooler.dense.weight": torch.randn(16, 16),  # vl builds no pooler
        "module.cross_attention_model.key_visual.weight": torch.randn(16, 16),
        "module.cross_attention_model.relational_matrix": torch.randn(115, 32, 32),
        "module.object_classifier.3.weight": torch.randn(56, 256),
    }
    torch.save(seed, tmp_path / "best_model.pth")
    got = build(str(tmp_path / "best_model.pth")).state_dict()
    pairs = {
        "encoder.visual.vgg.features.2.weight": "module.image_model.image_model.2.weight",
        "encoder.visual.attention.query.weight": "module.image_model.attention.query.weight",
        "encoder.bert.encoder.layer.1.attention.self.key.weight":
            "module.language_model.language_model.encoder.layer.1.attention.self.key.weight",
        "encoder.cross_attention.key_visual.weight": "module.cross_attention_model.key_visual.weight",
        "objectives.vg_relational.relational_matrix": "module.cross_attention_model.relational_matrix",
        "objectives.vg_relational.object_classifier.3.weight": "module.object_classifier.3.weight",
    }  # fmt: skip
    for ours, theirs in pairs.items():
        assert torch.equal(got[ours], seed[theirs]), ours
    assert torch.equal(got["encoder.visual.embedder.weight"], ref["encoder.visual.embedder.weight"])  # not in file
