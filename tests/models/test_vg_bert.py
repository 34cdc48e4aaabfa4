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
from vl.models.ranking import recall_at_k
from vl.models.vg_bert import CrossAttention, VGBertEncoder, object_pool
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


def test_recall_at_k_counts_ties_against_the_gold() -> None:
    """Ties rank the gold below every tied candidate (vl's rule): a constant scorer gets R@k = 0 (k < N), not 1; on random
    scores with forced ties the ranks equal a loop that counts every candidate scoring >= the gold."""
    n = 20
    r = recall_at_k(torch.zeros(n, n), ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert r[f"r{k}_i2t"] == 0.0 and r[f"r{k}_t2i"] == 0.0
    rng = np.random.default_rng(3)
    sim = np.round(rng.normal(size=(n, n)), 1)  # one decimal: many exact ties
    ranks_i2t = [sum(sim[i, j] >= sim[i, i] for j in range(n)) for i in range(n)]
    ranks_t2i = [sum(sim[j, i] >= sim[i, i] for j in range(n)) for i in range(n)]
    r = recall_at_k(torch.tensor(sim, dtype=torch.float32), ks=(1, 3))
    for k in (1, 3):
        assert r[f"r{k}_i2t"] == pytest.approx(np.mean(np.array(ranks_i2t) <= k))
        assert r[f"r{k}_t2i"] == pytest.approx(np.mean(np.array(ranks_t2i) <= k))


def test_similarity_matrix_chunks_within_its_block(monkeypatch) -> None:
    """The default chunk keeps (chunk, N, P, T) within SIMILARITY_BLOCK values (a whole-split ranking of thousands of
    images no longer holds a fixed 64 images' dot products) and gives the numpy similarity."""
    import vl.heads.vg_bert as vg_heads

    rng = np.random.default_rng(1)
    v, w = rng.normal(size=(7, 5, 4)), rng.normal(size=(6, 3, 4))
    nwords = np.array([1, 3, 2, 3, 1, 2])
    block = 2 * 6 * 5 * 3  # two images' dot products
    monkeypatch.setattr(vg_heads, "SIMILARITY_BLOCK", block)
    seen: list[tuple[int, ...]] = []
    einsum = torch.einsum

    def spy(eq, *ops):
        out = einsum(eq, *ops)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(vg_heads.torch, "einsum", spy)
    tv, tw, tn = (torch.tensor(a, dtype=torch.float64) for a in (v, w, nwords))
    got = vg_heads.similarity_matrix(tv, tw, tn.long())
    assert np.allclose(got.numpy(), np_similarity(v, w, nwords), atol=1e-9)
    assert seen and max(int(np.prod(s)) for s in seen) <= block and sum(s[0] for s in seen) == 7


def _tiny_system(stage: str, objective: str, *, init_from=None, data_info=None, **encoder_options):
    """A seeded tiny `VGBertSystem` of `stage` with one objective (the seed-checkpoint and freezing tests)."""
    from vl.models.vg_bert import VGBertSystem

    torch.manual_seed(0)
    encoder = {"_target_": "vl.models.vg_bert.VGBertEncoder", "stage": stage, "text_encoder": TINY_TEXT,
               "vgg_cfg": TINY_VGG, "visual_heads": 2, "visual_intermediate_size": 32, "num_positions": 16,
               "cross_heads": 2, "learnable_layers": 2, **encoder_options}  # fmt: skip
    return VGBertSystem(
        encoder=encoder, objectives=[objective], data_info={"pixels": True, **(data_info or {})}, init_from=init_from,
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
    )  # fmt: skip


def test_seed_checkpoint_keys_map_to_vl(tmp_path: Path) -> None:
    """A state dict in the seed's layout (`RelationalGrounding` under DataParallel: `module.` + image_model.image_model.N
    / language_model.language_model.* / cross_attention_model.* / object_classifier.*) initialises the vl model."""

    def build(init_from=None):
        info = {"num_relations": 115, "num_object_classes": 56}
        return _tiny_system("relational", "vg_relational", init_from=init_from, data_info=info)

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


def test_the_seeds_transfer_checkpoint_loads_its_projection_heads(tmp_path: Path) -> None:
    """The seed's released model is a `TransferCrossModalRetrieval` state dict: its two-layer heads (Conv1x1 pair on the
    image side, Linear pair on the language side, at `.0` / `.3`) land in vl's transfer head (they were read as stage
    2's one-layer heads and dropped), and compute the seed's pooled embeddings: its conv head on a (B, H, h, w) key map,
    then `torch.mean(..., (2, 3))`, equals vl's head per cell then the mean over cells; its language head likewise."""
    from torch import nn

    def build(init_from=None):
        return _tiny_system("transfer", "vg_transfer", init_from=init_from)

    hidden = build().state_dict()["objectives.vg_transfer.image_projection_head.0.weight"].shape[0]
    torch.manual_seed(1)
    image_head = nn.Sequential(nn.Conv2d(hidden, hidden, 1), nn.ReLU(True), nn.Dropout(), nn.Conv2d(hidden, hidden, 1))
    language_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, hidden))
    seed = {f"module.image_projection_head.{k}": v for k, v in image_head.state_dict().items()}
    seed |= {f"module.language_projection_head.{k}": v for k, v in language_head.state_dict().items()}
    seed["module.cross_attention_model.key_visual.weight"] = torch.randn(hidden, hidden)
    seed["module.image_model.image_model.2.weight"] = torch.randn_like(
        build().state_dict()["encoder.visual.vgg.features.2.weight"]
    )
    torch.save(seed, tmp_path / "best_model.pth")
    model = build(str(tmp_path / "best_model.pth")).eval()
    head = model.objectives["vg_transfer"]
    image_head.eval(), language_head.eval()
    keys = torch.randn(3, hidden, 4, 4)
    want = torch.mean(image_head(keys), (2, 3))
    got = head.image_projection_head(keys.flatten(2).transpose(1, 2)).mean(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    words = torch.randn(3, 7, hidden)
    torch.testing.assert_close(head.language_projection_head(words).mean(1), language_head(words).mean(1))
    state = model.state_dict()
    assert torch.equal(
        state["encoder.cross_attention.key_visual.weight"], seed["module.cross_attention_model.key_visual.weight"]
    )


@pytest.mark.parametrize(
    ("options", "init", "warned"),
    [
        ({"freeze_vgg": True}, False, "freeze_vgg=true without model.encoder.vgg_weights"),
        ({"freeze_vgg": False}, False, None),
        ({"freeze_vgg": True, "stage": "transfer", "freeze_encoder": True}, False, "freeze_encoder=true without"),
        ({"freeze_vgg": True, "stage": "transfer", "freeze_encoder": True}, "stage3", None),
        # a stage-2 model has no cross-attention: transfer's frozen query / key projections would stay random
        ({"freeze_vgg": True, "stage": "transfer", "freeze_encoder": True}, "stage2", "has no cross-attention weights"),
    ],
)
def test_frozen_weights_that_nothing_loaded_are_named(options, init, warned, tmp_path: Path, caplog) -> None:
    """The full-size recipes freeze the VGG convs (and, for transfer, the whole encoder): with no weights loaded they
    stay random for the whole run, where the seed starts from trained ones. One warning naming the keys."""
    import logging

    stage = options.get("stage", "grounding")
    objective = {"grounding": "vg_contrastive", "transfer": "vg_transfer"}[stage]
    encoder_options = {k: v for k, v in options.items() if k != "stage"}
    init_from = None
    if init:
        grounding = _tiny_system("grounding", "vg_contrastive").state_dict()
        seed = {  # the seed's stage-2 `full_model` layout: no cross_attention_model.*
            f"module.image_model.embedder.{k}": grounding[f"encoder.visual.embedder.{k}"] for k in ("weight", "bias")
        }
        if init == "stage3":
            seed["module.cross_attention_model.key_visual.weight"] = torch.randn(16, 16)
        torch.save(seed, tmp_path / "best_model.pth")
        init_from = str(tmp_path / "best_model.pth")
        caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vl.models.vg_bert"):
        _tiny_system(stage, objective, init_from=init_from, **encoder_options)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if warned is None:
        assert not [m for m in messages if "stay" in m]
    else:
        assert [m for m in messages if warned in m]


# ------------------------------------------------------------------------------------------------ whole-batch losses
def _system(stage: str = "grounding", objective: str = "vg_contrastive", **kw):
    from vl.models.vg_bert import VGBertSystem

    torch.manual_seed(0)
    info = {"pixels": True, **({"num_relations": 115, "num_object_classes": 56} if stage == "relational" else {})}
    return VGBertSystem(
        encoder={"_target_": "vl.models.vg_bert.VGBertEncoder", "stage": stage, "text_encoder": TINY_TEXT,
                 "vgg_cfg": TINY_VGG, "visual_heads": 2, "visual_intermediate_size": 32, "num_positions": 16,
                 "cross_heads": 2, "learnable_layers": 2},
        objectives=[objective], data_info=info,
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 5e-5, "betas": [0.95, 0.999],
                   "weight_decay": 5e-7},
        **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("experiment", "batch"),
    [("vg_bert_grounding", 180), ("vg_bert_relational", 180), ("vg_bert_transfer_retrieval", 300)],
)
def test_published_recipes_take_each_loss_over_the_whole_batch(experiment: str, batch: int, make_cfg) -> None:
    """README: --batch-size 180 (stages 2, 3) / 300 (transfer), one loss per batch: one device holds it all, so the
    derived gradient accumulation is 1 (and micro-batch negatives are off)."""
    from types import SimpleNamespace

    from vl.preflight import accumulation

    cfg = make_cfg(f"experiment={experiment}", tiny=False)
    assert cfg.data.batch_size == batch and cfg.data.batch_size_per_device == batch
    dm = SimpleNamespace(batch_size=cfg.data.batch_size, batch_size_per_device=cfg.data.batch_size_per_device)
    assert accumulation(cfg, dm, 1) == 1
    assert cfg.model.micro_batch_negatives is False


@pytest.mark.parametrize(
    ("stage", "objective"),
    [("grounding", "vg_contrastive"), ("relational", "vg_relational"), ("transfer", "vg_transfer")],
)
def test_gradient_accumulation_is_refused_for_batch_level_losses(stage: str, objective: str) -> None:
    import lightning.pytorch as L

    def trainer(accumulate: int) -> L.Trainer:
        return L.Trainer(accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip

    system = _system(stage, objective)
    system.trainer = trainer(6)
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=6 .*data.batch_size_per_device.*"
                                          rf"{objective}.*micro_batch_negatives=true"):  # fmt: skip
        system.setup("fit")
    system.trainer = trainer(1)
    system.setup("fit")  # the whole batch per step: accepted
    opted = _system(stage, objective, micro_batch_negatives=True)
    opted.trainer = trainer(6)
    opted.setup("fit")  # the explicit opt-in
    system.trainer = trainer(6)
    system.setup("validate")  # no optimiser step: nothing to refuse


def test_relational_head_pair_term_takes_the_negatives_of_the_whole_batch() -> None:
    """The head in training mode (gather on, one process): the pair term over the 3-image batch by a per-pair loop
    (negatives from every image), the object CE and the relation CE by hand, all / B."""
    from vl.batch import EncoderOutput
    from vl.heads.vg_bert import RelationalGrounding

    torch.manual_seed(5)
    b, n, h, k = 3, 4, 8, 6
    head = RelationalGrounding(hidden_size=h, num_relations=k, num_object_classes=5, subspace_dim=4, dropout=0.0,
                               classifier_dropout=0.0).double().train()  # fmt: skip
    objects = torch.randn(b, n, h, dtype=torch.float64)
    rel = torch.zeros(b, n, n, dtype=torch.long)
    rel[0, 0, 1], rel[0, 2, 3], rel[1, 1, 0], rel[2, 3, 2], rel[2, 0, 3] = 1, 2, 1, 3, 2
    cls = torch.tensor([[1, 2, 0, 3], [4, 1, 0, 0], [2, 2, 1, 0]])
    result = head(EncoderOutput(text=objects, visual=None, pooled=None),
                  {"relation_target": rel, "object_target": cls, "object_mask": (cls >= 0).long()})  # fmt: skip
    # scores by the bilinear formula with the normalised matrices
    o = head.object_transform(objects).detach()
    mats = head.relational_matrix.detach().flatten(1)
    mats = (mats / mats.norm(dim=1, keepdim=True)).reshape(k, 4, 4)
    r = {(bi, i, j, c): float(o[bi, i] @ mats[c] @ o[bi, j]) for bi in range(b) for i in range(n) for j in range(n)
         for c in range(k)}  # fmt: skip
    pairs = [(bi, i, j, int(rel[bi, i, j])) for bi in range(b) for i in range(n) for j in range(n) if rel[bi, i, j]]
    pair = relation = 0.0
    for bi, i, j, c in pairs:
        negatives = [r[(b2, i2, j2, c)] for b2, i2, j2, c2 in pairs if c2 != c]
        logits = [r[(bi, i, j, c)], *negatives]
        pair += -logits[0] + math.log(sum(math.exp(x) for x in logits))
        row = [r[(bi, i, j, c2)] for c2 in range(k)]
        relation += -row[c] + math.log(sum(math.exp(x) for x in row))
    logits = head.object_classifier(objects).detach()
    obj = sum(
        -float(torch.log_softmax(logits[bi, m], 0)[cls[bi, m]]) for bi in range(b) for m in range(n) if cls[bi, m]
    )
    assert math.isclose(float(head.last_parts["pair"]), pair / b, rel_tol=1e-10)
    assert math.isclose(float(head.last_parts["relation"]), relation / b, rel_tol=1e-10)
    assert math.isclose(float(head.last_parts["object"]), obj / b, rel_tol=1e-10)
    assert math.isclose(float(result.loss.detach()), (pair + relation + obj) / b, rel_tol=1e-10)


# ------------------------------------------------------------------------------------------------ stage-1 weights
def seed_stage1_keys(cfg: list, hidden: int, vgg_out: int, intermediate: int, positions: int) -> dict[str, tuple]:
    """The seed's `VGG16_Attention_classification` state-dict names and shapes, written from its code: torchvision
    features without the last pool as `image_model.<index>` (conv, ReLU pairs, one MaxPool per "M"), `embedder`
    Conv1x1, `attention` (SpatialSelfAttention, use_position=learn), `classifier` (768*49 -> 4096 -> 4096 -> 1000)."""
    keys, index, cin = {}, 0, 3
    for v in cfg:
        if v == "M":
            index += 1
            continue
        keys[f"image_model.{index}.weight"], keys[f"image_model.{index}.bias"] = (v, cin, 3, 3), (v,)
        index, cin = index + 2, v
    keys["embedder.weight"], keys["embedder.bias"] = (hidden, vgg_out, 1, 1), (hidden,)
    keys["attention.position_embeddings.weight"] = (positions, hidden)
    for name in ("query", "key", "value", "dense"):
        keys[f"attention.{name}.weight"], keys[f"attention.{name}.bias"] = (hidden, hidden), (hidden,)
    keys["attention.ffn.weight"], keys["attention.ffn.bias"] = (intermediate, hidden), (intermediate,)
    keys["attention.ffn_output.weight"], keys["attention.ffn_output.bias"] = (hidden, intermediate), (hidden,)
    for name in ("LayerNorm", "full_layernorm"):
        keys[f"attention.{name}.weight"], keys[f"attention.{name}.bias"] = (hidden,), (hidden,)
    keys["classifier.0.weight"], keys["classifier.0.bias"] = (4096, hidden * 49), (4096,)
    keys["classifier.3.weight"], keys["classifier.3.bias"] = (4096, 4096), (4096,)
    keys["classifier.6.weight"], keys["classifier.6.bias"] = (1000, 4096), (1000,)
    return keys


def test_a_seed_stage1_checkpoint_initialises_the_visual_stream(tmp_path: Path) -> None:
    """Both files of the seed's stage 1: `checkpoint.pth.tar` ({"state_dict": DataParallel keys `module.*`, "arch"})
    and the bare state dict that run.py reads as `best_model.pth`. Every seed tensor lands in the vl parameter named
    by the hand-written correspondence; the ImageNet classifier lands nowhere."""
    shapes = seed_stage1_keys(TINY_VGG, hidden=16, vgg_out=16, intermediate=32, positions=16)
    assert sum(k.startswith("image_model.") for k in shapes) == 26  # 13 convs
    g = torch.Generator().manual_seed(9)
    seed = {k: torch.randn(s, generator=g) for k, s in shapes.items()}

    def vl_name(key: str) -> str | None:
        head, _, rest = key.partition(".")
        return {"image_model": f"encoder.visual.vgg.features.{rest}", "embedder": f"encoder.visual.embedder.{rest}",
                "attention": f"encoder.visual.attention.{rest}"}.get(head)  # fmt: skip

    ref = _system().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in seed.items()}, "arch": "vgg16_attention", "epoch": 90},
               tmp_path / "checkpoint.pth.tar")  # fmt: skip
    torch.save(seed, tmp_path / "best_model.pth")
    for name in ("checkpoint.pth.tar", "best_model.pth"):
        got = _system(init_from=str(tmp_path / name)).state_dict()
        landed = set()
        for key, value in seed.items():
            ours = vl_name(key)
            if ours is None:
                assert key.startswith("classifier."), key
                continue
            assert torch.equal(got[ours], value), (name, key, ours)
            landed.add(ours)
        assert len(landed) == 45
        for key in set(ref) - landed:  # the rest is untouched
            assert torch.equal(got[key], ref[key]), (name, key)


def test_an_init_checkpoint_that_loads_nothing_is_an_error(tmp_path: Path) -> None:
    torch.save({"module.classifier.0.weight": torch.randn(3, 3)}, tmp_path / "classifier_only.pth")
    torch.save({"features.0.weight": torch.randn(4, 3, 3, 3)}, tmp_path / "torchvision.pth")  # vgg_weights' file
    torch.save({"image_model.0.weight": torch.randn(5, 3, 3, 3)}, tmp_path / "wrong_shape.pth")  # seed stage 1
    for name in ("classifier_only.pth", "torchvision.pth", "wrong_shape.pth"):
        with pytest.raises(ConfigError, match=rf"model.init_from: '.*{name}'.* loaded nothing"):
            _system(init_from=str(tmp_path / name))


# ------------------------------------------------------------------------------------------------ optimiser options
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("scheduler", {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "_partial_": True, "max_lr": 1.0}),
        ("head_lr", 1.0),
        ("pretrained_lr_mult", 0.0),
    ],
)
def test_optimiser_options_vg_bert_does_not_use_are_refused(option: str, value) -> None:
    with pytest.raises(ConfigError, match=rf"^model.{option}=.* has no effect on VG-BERT"):
        _system(**{option: value})


def test_defaults_build_one_adam_group_with_the_seed_step_decay() -> None:
    """The seed's optimiser (traintest.py): Adam over every trainable parameter, betas (0.95, 0.999), wd 5e-7, lr
    x lr_ratio ** (epoch // lr_decay) with epochs counted from 1 (lr_decay 30 as the transfer script's default)."""
    system = _system(scheduler=None, head_lr=None, pretrained_lr_mult=1.0, lr_decay_epochs=30)
    cfg = system.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    trainable = [p for p in system.parameters() if p.requires_grad]
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == len(trainable)
    assert opt.param_groups[0]["weight_decay"] == 5e-7 and tuple(opt.param_groups[0]["betas"]) == (0.95, 0.999)
    lrs = []
    for _ in range(70):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert np.allclose(lrs, [5e-5 * 0.5 ** (epoch // 30) for epoch in range(1, 71)])


def test_transfer_recipe_is_the_published_command(make_cfg) -> None:
    """README's transfer command: --learning-rate 5e-5 --batch-size 300 --n_epochs 150 --dropout-rate 0.1 --sigma 0.1;
    transfer_cross_modal_retrieval.py's defaults for what it does not set: --lr-decay 30, --lr-ratio 0.5."""
    cfg = make_cfg("experiment=vg_bert_transfer_retrieval", tiny=False)
    assert cfg.model.optimizer.lr == 5e-5 and cfg.data.batch_size == 300 and cfg.trainer.max_epochs == 150
    assert cfg.model.encoder.dropout_rate == 0.1
    assert cfg.model.lr_decay_epochs == 30 and cfg.model.lr_ratio == 0.5
    assert cfg.model.encoder.freeze_encoder is True and list(cfg.data.objectives) == ["vg_transfer"]


def test_relation_and_object_top_k_as_the_seeds_traintest() -> None:
    """`rel_acc` / `rel_acc5` / `rel_acc10` and `obj_acc1/5/10` equal the seed's `traintest.py` meters: per image, the
    non-null pairs' (objects') scores into its `accuracy(output, target, topk=(1, 5, 10))`, averaged weighted by count."""
    from torch import nn

    from vl.batch import EncoderOutput
    from vl.heads.vg_bert import RelationalGrounding

    def seed_accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[float]:
        _, pred = output.topk(max(topk), 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
        return [float(correct[:k].reshape(-1).float().sum() * 100.0 / target.shape[0]) for k in topk]

    torch.manual_seed(6)
    b, n, h, k, c = 4, 6, 8, 20, 15
    head = RelationalGrounding(hidden_size=h, num_relations=k, num_object_classes=c, subspace_dim=4).eval()
    metrics = nn.ModuleDict(head.make_metrics())
    rel = torch.randint(0, k, (b, n, n)) * (torch.rand(b, n, n) < 0.3)
    cls = torch.randint(0, c, (b, n))
    objects = torch.randn(b, n, h)
    batch = {"relation_target": rel, "object_target": cls, "object_mask": torch.ones(b, n, dtype=torch.long)}
    with torch.no_grad():
        result = head(EncoderOutput(text=objects, visual=None, pooled=None), batch)
        head.update_metrics(metrics, result)
        scores, obj_logits = head.outputs(EncoderOutput(text=objects, visual=None, pooled=None))
    sums = {name: 0.0 for name in metrics}
    counts = {"rel": 0, "obj": 0}
    for bi in range(b):  # the seed's per-image loops
        output, target = torch.flatten(scores[bi], 1), torch.flatten(rel[bi])
        mask = target > 0
        if mask.any():
            accs = seed_accuracy(output[:, mask].t(), target[mask], (1, 5, 10))
            for name, acc in zip(("rel_acc", "rel_acc5", "rel_acc10"), accs):
                sums[name] += acc * int(mask.sum())
            counts["rel"] += int(mask.sum())
        mask = cls[bi] > 0
        if mask.any():
            accs = seed_accuracy(obj_logits[bi][mask], cls[bi][mask], (1, 5, 10))
            for name, acc in zip(("obj_acc1", "obj_acc5", "obj_acc10"), accs):
                sums[name] += acc * int(mask.sum())
            counts["obj"] += int(mask.sum())
    for name, metric in metrics.items():
        want = sums[name] / counts[name[:3]] / 100.0
        assert float(metric.compute()) == pytest.approx(want, abs=1e-6), name
