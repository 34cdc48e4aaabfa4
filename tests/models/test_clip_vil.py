"""CLIP-ViL's model: the CLIP ResNet grid (shape / stride by hand; the forward against a functional re-computation),
the encoder against an independent computation (position embeddings, visn_fc, no visual position/type embeddings,
all-ones visual mask, BERT layers, pooler without tanh), sub-sampling, weight loading from a local state dict, the
two optimisers (parameter deltas, schedules, exact state round trip), the QA -> VQA head copy, freezing."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vl.errors import ConfigError
from vl.heads.qa import answer_mlp
from vl.models.clip_resnet import CLIP_RESNETS, build_clip_resnet
from vl.models.clip_vil import ClipVilEncoder, ClipVilSystem, copy_answer_rows
from vl.optimizers import FusedOptimizer

TINY_TEXT = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "dropout": 0.0}
TINY_BACKBONE = {"layers": [1, 2, 1, 1], "width": 8}


def tiny_encoder(**kwargs) -> ClipVilEncoder:
    options = {"text_encoder": TINY_TEXT, "backbone": TINY_BACKBONE, "visual_dropout": 0.0} | kwargs
    return ClipVilEncoder(data_info={"pixels": True}, **options)


def randomise_bn(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------------ backbone
def test_grid_shape_and_stride_for_384x640_match_a_hand_calculation() -> None:
    # stem conv stride 2 (384x640 -> 192x320), avgpool 2 (96x160), layer2..4 stride 2 each (48x80, 24x40, 12x20)
    with torch.device("meta"):  # shapes only: the published sizes without their compute
        rn50 = build_clip_resnet("RN50").eval()
        grid = rn50(torch.empty(1, 3, 384, 640))
        rn50x4 = build_clip_resnet("RN50x4")
        portrait = rn50x4(torch.empty(1, 3, 640, 384))
    assert grid.shape == (1, 2048, 12, 20) and rn50.stride == 32
    assert portrait.shape == (1, 2560, 20, 12)
    assert rn50.attnpool is None  # skipped: not built
    tiny = build_clip_resnet(**TINY_BACKBONE).eval()
    with torch.no_grad():
        assert tiny(torch.randn(1, 3, 384, 640)).shape == (1, 8 * 32, 12, 20)
    assert rn50x4.out_channels == 2560 and CLIP_RESNETS["RN50x4"]["layers"] == (4, 6, 10, 6)
    assert sum(len(getattr(rn50, f"layer{i}")) for i in range(1, 5)) == 16  # 3 + 4 + 6 + 3 bottlenecks


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def reference_resnet(net, x: torch.Tensor) -> torch.Tensor:
    """CLIP's modified ResNet written out with functional ops (BN in eval mode) from the module's weights."""
    for i in (1, 2, 3):
        conv = getattr(net, f"conv{i}")
        x = F.relu(_bn(F.conv2d(x, conv.weight, stride=2 if i == 1 else 1, padding=1), getattr(net, f"bn{i}")))
    x = F.avg_pool2d(x, 2)
    for stage, stride in zip(range(1, 5), (1, 2, 2, 2)):
        for k, block in enumerate(getattr(net, f"layer{stage}")):
            s = stride if k == 0 else 1
            out = F.relu(_bn(F.conv2d(x, block.conv1.weight), block.bn1))
            out = F.relu(_bn(F.conv2d(out, block.conv2.weight, padding=1), block.bn2))
            if s > 1:
                out = F.avg_pool2d(out, s)  # anti-aliased: pool after the 3x3 conv, which has stride 1
            out = _bn(F.conv2d(out, block.conv3.weight), block.bn3)
            if block.downsample is not None:
                idn = F.avg_pool2d(x, s) if s > 1 else x
                idn = _bn(F.conv2d(idn, block.downsample[1].weight), block.downsample[2])
            else:
                idn = x
            x = F.relu(out + idn)
    return x


def test_resnet_matches_a_functional_computation() -> None:
    net = build_clip_resnet(**TINY_BACKBONE)
    randomise_bn(net)
    net.eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference_resnet(net, x), atol=1e-5, rtol=1e-5)
    assert [k for k in net.state_dict() if "downsample" in k][:2] == [
        "layer1.0.downsample.0.weight",  # CLIP's key names: downsample.-1 is the (parameter-free) AvgPool
        "layer1.0.downsample.1.weight",
    ]


# ------------------------------------------------------------------------------------------------ encoder
def reference_encoder(enc: ClipVilEncoder, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-ViL's encoder from the spec, in plain torch, with the encoder's weights: (states, pooled)."""
    p = dict(enc.named_parameters())
    cfg = enc.bert.config
    grid = reference_resnet(enc.backbone, batch["pixel_values"])
    b, c, h, w = grid.shape
    feats = torch.zeros(b, h * w, c)
    for y in range(h):
        for x in range(w):
            # the seed's order: its x-embedding indexes the rows (dim 2, which it calls "width")
            feats[:, y * w + x] = grid[:, :, y, x] + p["pos_x.weight"][y] + p["pos_y.weight"][x]
    vis = F.layer_norm(feats @ p["visual_fc.weight"].T + p["visual_fc.bias"], (cfg.hidden_size,),
                       p["visual_norm.weight"], p["visual_norm.bias"], 1e-12)  # fmt: skip
    ids = batch["input_ids"]
    t = ids.shape[1]
    emb = (
        p["bert.embeddings.word_embeddings.weight"][ids]
        + p["bert.embeddings.position_embeddings.weight"][:t]
        + p["bert.embeddings.token_type_embeddings.weight"][batch["token_type_ids"]]
    )
    emb = F.layer_norm(emb, (cfg.hidden_size,), p["bert.embeddings.LayerNorm.weight"],
                       p["bert.embeddings.LayerNorm.bias"], cfg.layer_norm_eps)  # fmt: skip
    x = torch.cat([emb, vis], 1)
    keep = torch.cat([batch["attention_mask"].bool(), torch.ones(b, h * w, dtype=torch.bool)], 1)
    nh, dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def lin(v, name):
        return v @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    for i in range(cfg.num_hidden_layers):
        pre = f"bert.encoder.layer.{i}"
        q, k, v = (
            lin(x, f"{pre}.attention.self.{n}").view(b, -1, nh, dh).transpose(1, 2) for n in ("query", "key", "value")
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, cfg.hidden_size)
        a = lin(ctx, f"{pre}.attention.output.dense") + x
        a = F.layer_norm(a, (cfg.hidden_size,), p[f"{pre}.attention.output.LayerNorm.weight"],
                         p[f"{pre}.attention.output.LayerNorm.bias"], cfg.layer_norm_eps)  # fmt: skip
        f = lin(F.gelu(lin(a, f"{pre}.intermediate.dense")), f"{pre}.output.dense") + a
        x = F.layer_norm(f, (cfg.hidden_size,), p[f"{pre}.output.LayerNorm.weight"],
                         p[f"{pre}.output.LayerNorm.bias"], cfg.layer_norm_eps)  # fmt: skip
    pooled = lin(x[:, 0], "pooler")  # no tanh
    return x, pooled


def _batch(b: int = 2, t: int = 7, h: int = 96, w: int = 160) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, 5:] = 0
    return {
        "input_ids": torch.randint(1000, 2000, (b, t), generator=g),
        "attention_mask": mask,
        "token_type_ids": torch.zeros(b, t, dtype=torch.long),
        "pixel_values": torch.randn(b, 3, h, w, generator=g),
    }


def test_encoder_matches_an_independent_computation() -> None:
    torch.manual_seed(0)
    enc = tiny_encoder()
    randomise_bn(enc.backbone)
    with torch.no_grad():  # non-trivial position embeddings and pooler
        enc.pos_x.weight.normal_()
        enc.pos_y.weight.normal_()
        enc.pooler.weight.normal_()
    enc.eval()
    batch = _batch()
    with torch.no_grad():
        out = enc(batch)
        states, pooled = reference_encoder(enc, batch)
    t = batch["input_ids"].shape[1]
    assert out.visual.shape == (2, 3 * 5, 32)  # 96x160 -> 3x5 cells
    torch.testing.assert_close(out.text[0], states[0, :t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text[1, :5], states[1, :5], atol=1e-5, rtol=1e-5)  # its padding: anything
    torch.testing.assert_close(out.visual, states[:, t:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=1e-5)
    assert out.pooled.abs().max() > 1.0  # no tanh


def test_position_embeddings_follow_the_seeds_x_y_order_on_a_non_square_grid() -> None:
    """The seed's `LinearPositionEmbedding.forward`, transcribed: `width = feats.size(2)` (the rows),
    `x_position_embedding(arange(width)).unsqueeze(-2)` + `y_position_embedding(arange(size(3))).unsqueeze(-3)`,
    viewed (1, -1, C) and added to `feats.permute(0, 2, 3, 1).view(B, -1, C)`; vl's `pos_x` / `pos_y` weights used as
    the seed's x / y tables (so a seed checkpoint's tables load under those names unchanged)."""
    torch.manual_seed(0)
    enc = tiny_encoder()
    with torch.no_grad():
        enc.pos_x.weight.normal_()
        enc.pos_y.weight.normal_()
    feats = torch.randn(2, enc.backbone.out_channels, 3, 5)  # 3 rows x 5 columns
    enc.backbone.forward = lambda x, skip_last_layer: feats  # the grid as given
    with torch.no_grad():
        ours = enc.grid(torch.empty(2, 3, 96, 160)).flatten(2).transpose(1, 2)
    c = feats.shape[1]
    width_ids = torch.arange(feats.size(2)).unsqueeze(0)
    x_embedding = F.embedding(width_ids, enc.pos_x.weight).unsqueeze(-2)  # 1 x 3 x 1 x C
    height_ids = torch.arange(feats.size(3)).unsqueeze(0)
    y_embedding = F.embedding(height_ids, enc.pos_y.weight).unsqueeze(-3)  # 1 x 1 x 5 x C
    seed = feats.permute(0, 2, 3, 1).reshape(2, -1, c) + (x_embedding + y_embedding).view(1, -1, c)
    torch.testing.assert_close(ours, seed, atol=1e-6, rtol=1e-6)  # the seed adds x + y first
    # by hand: cell (row 2, column 4) = feats + x[2] + y[4]
    torch.testing.assert_close(ours[1, 2 * 5 + 4], feats[1, :, 2, 4] + enc.pos_x.weight[2] + enc.pos_y.weight[4])


def test_position_axes_vl_exchanges_the_tables_roles() -> None:
    """`position_axes="vl"` (kept by `model=clip_vil_tiny`): `pos_x` indexes the columns and `pos_y` the rows; an
    unknown value is refused."""
    torch.manual_seed(0)
    enc = tiny_encoder(position_axes="vl")
    with torch.no_grad():
        enc.pos_x.weight.normal_()
        enc.pos_y.weight.normal_()
    feats = torch.randn(2, enc.backbone.out_channels, 3, 5)
    enc.backbone.forward = lambda x, skip_last_layer: feats
    with torch.no_grad():
        ours = enc.grid(torch.empty(2, 3, 96, 160))
    for row, col in [(0, 0), (2, 4), (1, 3)]:
        torch.testing.assert_close(
            ours[:, :, row, col], feats[:, :, row, col] + enc.pos_x.weight[col] + enc.pos_y.weight[row]
        )
    with pytest.raises(ConfigError, match="position_axes"):
        tiny_encoder(position_axes="xy")


def test_padded_image_areas_are_attended() -> None:
    """The visual mask is all ones: zero-padded cells are visual tokens like any other."""
    torch.manual_seed(0)
    enc = tiny_encoder().eval()
    batch = _batch(b=1, h=64, w=128)
    padded = dict(batch, pixel_values=F.pad(batch["pixel_values"], (0, 64)))  # 64 zero columns: 2 x 2 more cells
    with torch.no_grad():
        a, b = enc(batch), enc(padded)
    assert a.visual.shape[1] == 8 and b.visual.shape[1] == 12
    assert not torch.allclose(a.pooled, b.pooled)


def test_sub_sampling_draws_distinct_cells_in_training_and_evaluation_as_the_seed() -> None:
    """The seed samples `sub_feat_num` cells whenever `--sub_sampling` is on (validation included);
    `sub_sampling_in_eval=false` keeps every cell in evaluation."""
    torch.manual_seed(0)
    every_cell = tiny_encoder(sub_sampling=False).eval()
    x = torch.randn(3, 3, 96, 160)  # 15 cells
    with torch.no_grad():
        every = every_cell.visual_tokens(x)
    for mode in ("train", "eval"):
        enc = tiny_encoder(sub_sampling=True, sub_feat_num=5)
        enc.load_state_dict(every_cell.state_dict())
        enc.eval()
        if mode == "train":
            enc.train()
            enc.backbone.eval()  # the same BatchNorm statistics as `every`
        with torch.no_grad():
            some = enc.visual_tokens(x)
        assert every.shape[1] == 15 and some.shape[1] == 5, mode
        for i in range(3):
            match = torch.cdist(some[i], every[i]).argmin(1)
            assert torch.allclose(some[i], every[i][match], atol=1e-5), mode
            assert len(set(match.tolist())) == 5, mode  # distinct
        enc.sub_feat_num = 100  # more than the grid has: every cell
        assert enc.visual_tokens(x).shape[1] == 15
    enc = tiny_encoder(sub_sampling=True, sub_feat_num=5, sub_sampling_in_eval=False)
    enc.load_state_dict(every_cell.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(enc.eval().visual_tokens(x), every)
    with pytest.raises(ConfigError, match="sub_sampling_in_eval"):
        tiny_encoder(sub_sampling=False, sub_sampling_in_eval=False)


def test_pos_num_bounds_the_grid() -> None:
    enc = tiny_encoder(pos_num=4)
    with pytest.raises(ConfigError, match="pos_num=4: the image grid is 3x5"):
        enc.visual_tokens(torch.randn(1, 3, 96, 160))


# ------------------------------------------------------------------------------------------------ weights
def test_backbone_weights_load_from_a_local_clip_state_dict(tmp_path: Path) -> None:
    source = build_clip_resnet(**TINY_BACKBONE, heads=2, output_dim=16, image_size=64, attention_pool=True)
    state = {f"visual.{k}": v for k, v in source.state_dict().items()}
    state["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3, 3)  # the text tower: ignored
    state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "clip_rn.pt"
    torch.save(state, path)
    enc = tiny_encoder(backbone_weights=str(path))
    for k, v in enc.backbone.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k
    report = enc.backbone_report
    assert not report["missing"] and all(k.startswith("attnpool.") for k in report["unused"])
    assert "backbone.conv1.weight" in enc.pretrained_parameter_names()
    from safetensors.torch import save_file

    save_file(
        {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}, tmp_path / "rn.safetensors"
    )
    enc2 = tiny_encoder(backbone_weights=str(tmp_path / "rn.safetensors"))
    assert torch.equal(enc2.backbone.conv1.weight, source.conv1.weight)
    with pytest.raises(ConfigError, match="another ResNet size"):
        tiny_encoder(backbone={"layers": [1, 2, 1, 1], "width": 16}, backbone_weights=str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        tiny_encoder(backbone_weights=str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------------------------------------ optimisation
def tiny_system(objectives=("itm",), data_info=None, **kwargs) -> ClipVilSystem:
    info = {"pixels": True} | dict(data_info or {})
    kwargs.setdefault(
        "optimizer", {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 0.01, "eps": 1e-6}
    )
    kwargs.setdefault(
        "encoder",
        {"_target_": "vl.models.clip_vil.ClipVilEncoder", "text_encoder": TINY_TEXT, "backbone": TINY_BACKBONE},
    )
    return ClipVilSystem(
        objectives=list(objectives),
        data_info=info,
        **kwargs,
    )


def configured(system: ClipVilSystem, total: int = 40, epochs: int = 4):
    system._trainer = SimpleNamespace(estimated_stepping_batches=total, max_epochs=epochs)
    out = system.configure_optimizers()
    return out["optimizer"], out["lr_scheduler"]["scheduler"]


def test_the_two_optimisers_step_their_own_parameters() -> None:
    torch.manual_seed(0)
    system = tiny_system(visual_optimizer={"lr": 0.1, "weight_decay": 4e-4, "schedule": [2]})
    fused, _ = configured(system)
    adamw, sgd = fused.optimizers["adamw"], fused.optimizers["sgd"]
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["eps"] == 1e-6
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.0 and sgd.defaults["weight_decay"] == 4e-4
    names = {id(p): n for n, p in system.named_parameters()}
    no_decay = [names[id(p)] for p in adamw.param_groups[1]["params"]]
    assert all(n.endswith(("bias", "weight")) for n in no_decay) and any("LayerNorm" in n for n in no_decay)
    assert adamw.param_groups[1]["weight_decay"] == 0.0 and adamw.param_groups[0]["weight_decay"] == 0.01
    for p in system.parameters():
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in system.named_parameters()}

    def changed():
        return {n for n, p in system.named_parameters() if not torch.equal(p, before[n])}

    for group in adamw.param_groups:  # the schedule's first update is at lr 0 (the seed's warmup)
        group["lr"] = 1e-3
    adamw.step()
    backbone = {n for n in before if n.startswith("encoder.backbone.")}
    assert changed() == set(before) - backbone  # AdamW never touches the backbone
    for n, p in system.named_parameters():
        p.data.copy_(before[n])
    sgd.step()
    assert changed() == backbone  # SGD touches nothing else
    # SGD: p - lr * (g + wd * p) exactly
    p = system.encoder.backbone.conv1.weight
    torch.testing.assert_close(p, before["encoder.backbone.conv1.weight"] * (1 - 0.1 * 4e-4) - 0.1)


def _seed_name(name: str) -> str:
    """vl's parameter name -> the seed's (`LXRTPretraining` / `VQAModel`), for the parts the decay rule reads."""
    rules = [
        ("encoder.bert.", "bert."),
        ("encoder.visual_fc.", "bert.encoder.visn_fc.visn_fc."),
        ("encoder.visual_norm.", "bert.encoder.visn_fc.visn_layer_norm."),
        ("encoder.pos_x.", "bert.encoder.visual_pos.x_position_embedding."),
        ("encoder.pos_y.", "bert.encoder.visual_pos.y_position_embedding."),
        ("encoder.pooler.", "bert.pooler.dense."),
        ("objectives.mlm.transform.0.", "cls.predictions.transform.dense."),
        ("objectives.mlm.transform.2.", "cls.predictions.transform.LayerNorm."),
        ("objectives.mlm.bias", "cls.predictions.bias"),
        ("objectives.itm.classifier.", "cls.seq_relationship."),
        ("objectives.vqa.classifier.", "logit_fc."),
    ]
    for mine, theirs in rules:
        if name.startswith(mine):
            return theirs + name[len(mine) :]
    raise AssertionError(f"no seed name for {name}")


def test_adamw_decays_what_the_seeds_name_rule_decays() -> None:
    """The seed: `no_decay = ['bias', 'LayerNorm.weight']` matched in its own parameter names, so `visn_layer_norm`
    and the answer head's LayerNorm (`logit_fc.2`) decay; applied here to the seed's names of vl's parameters."""
    system = tiny_system(objectives=("mlm", "itm", "vqa"), data_info={"num_answers": 7})
    fused, _ = configured(system)
    adamw = fused.optimizers["adamw"]
    names = {id(p): n for n, p in system.named_parameters()}
    decay = {names[id(p)] for p in adamw.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in adamw.param_groups[1]["params"]}
    seed_no_decay = {n for n in decay | no_decay if any(nd in _seed_name(n) for nd in ("bias", "LayerNorm.weight"))}
    assert no_decay == seed_no_decay
    assert {"encoder.visual_norm.weight", "objectives.vqa.classifier.2.weight"} <= decay


def test_vl_adamw_rules_keep_the_earlier_warmup_and_groups() -> None:
    system = tiny_system(
        objectives=("mlm", "itm", "vqa"), data_info={"num_answers": 7}, adamw_rules="vl", warmup_ratio=0.25
    )
    fused, scheduler = configured(system, total=40, epochs=4)
    names = {id(p): n for n, p in system.named_parameters()}
    no_decay = {names[id(p)] for p in fused.optimizers["adamw"].param_groups[1]["params"]}
    assert {"encoder.visual_norm.weight", "objectives.vqa.classifier.2.weight"} <= no_decay
    assert fused.param_groups[0]["lr"] == pytest.approx(1e-3 / 10)  # (0 + 1) / int(0.25 x 40)
    with pytest.raises(ConfigError, match="adamw_rules"):
        tiny_system(adamw_rules="hf")


@pytest.mark.parametrize(("total", "ratio"), [(237, 0.025), (237, 0.05), (40, 0.01), (9, 0.3), (100, 0.0)])
def test_adamw_schedule_is_transformers_linear_warmup_with_a_float_warmup(total, ratio) -> None:
    """The seed passes num_warmup_steps = warmup_ratio x t_total unrounded (5.925 for 237 x 0.025)."""
    from transformers import get_linear_schedule_with_warmup

    from vl.schedules import warmup_linear

    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_linear_schedule_with_warmup(ref_opt, num_warmup_steps=ratio * total, num_training_steps=total)
    factor = warmup_linear(total, ratio)
    for step in range(total + 3):
        assert factor(step) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        ref_opt.step()
        ref.step()


def test_schedules_warmup_linear_decay_and_backbone_steps() -> None:
    system = tiny_system(visual_optimizer={"lr": 0.003, "schedule": [2, 3]}, warmup_ratio=0.25, decay_epochs=8)
    fused, scheduler = configured(system, total=40, epochs=4)  # 10 steps per epoch; Adam decays over 80 steps
    adam_lrs, sgd_lrs = [], []
    for _ in range(40):
        adam_lrs.append(fused.param_groups[0]["lr"])
        sgd_lrs.append(fused.param_groups[2]["lr"])
        fused.step()  # no gradients: changes nothing
        scheduler.step()
    # the seed's: transformers' get_linear_schedule_with_warmup(num_warmup_steps=0.25 x 80) over 80 steps
    from transformers import get_linear_schedule_with_warmup

    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = get_linear_schedule_with_warmup(ref_opt, num_warmup_steps=0.25 * 80, num_training_steps=80)
    want = []
    for _ in range(40):
        want.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert adam_lrs == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert adam_lrs[0] == 0.0 and adam_lrs[20] == pytest.approx(1e-3)
    assert (
        sgd_lrs[19] == pytest.approx(0.003)
        and sgd_lrs[20] == pytest.approx(3e-4)
        and sgd_lrs[30] == pytest.approx(3e-5)
    )


def test_fused_state_round_trips_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    system = tiny_system(visual_optimizer={"momentum": 0.9})
    fused, _ = configured(system)
    for _ in range(2):
        for p in system.parameters():
            p.grad = torch.randn_like(p)
        fused.step()
    torch.save({"optimizer": fused.state_dict()}, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)["optimizer"]
    other, _ = configured(tiny_system(visual_optimizer={"momentum": 0.9}))
    other.load_state_dict(loaded)
    a, b = fused.state_dict(), other.state_dict()
    for name in ("adamw", "sgd"):
        assert a[name]["state"].keys() == b[name]["state"].keys()
        for k, st in a[name]["state"].items():
            for key, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[name]["state"][k][key]))
    assert any("momentum_buffer" in st for st in b["sgd"]["state"].values())
    with pytest.raises(ConfigError, match="no state for"):
        other.load_state_dict({"adamw": a["adamw"]})
    assert isinstance(other, FusedOptimizer)


def test_frozen_backbone_gets_no_optimizer_and_keeps_bn_stats() -> None:
    system = tiny_system()
    system.encoder.freeze_backbone = True
    system.encoder.backbone.requires_grad_(False)
    fused, _ = configured(system)
    assert set(fused.optimizers) == {"adamw"}
    system.train()
    assert not system.encoder.backbone.training and system.encoder.bert.training


# ------------------------------------------------------------------------------------------------ QA -> VQA
def test_copy_answer_rows_copies_exactly_the_shared_answers() -> None:
    """The seed's `load_lxmert_qa`: hidden layers whole; a VQA answer whose converted form is a pretraining answer
    gets that row, every other row is 0 (not left at random init)."""
    torch.manual_seed(0)
    source, target = answer_mlp(8, 5), answer_mlp(8, 4)
    n = copy_answer_rows(source, ["a", "b", "c", "d", "e"], target, ["D", "x", "a", "y"], convert=str.lower)
    assert n == 2
    want_w = torch.zeros(4, source[-1].weight.shape[1])
    want_b = torch.zeros(4)
    want_w[0], want_b[0] = source[-1].weight[3], source[-1].bias[3]  # "D" -> "d"
    want_w[2], want_b[2] = source[-1].weight[0], source[-1].bias[0]  # "a"
    assert torch.equal(target[-1].weight, want_w) and torch.equal(target[-1].bias, want_b)
    assert torch.equal(target[0].weight, source[0].weight) and torch.equal(target[2].weight, source[2].weight)
    assert copy_answer_rows(source, ["a"], answer_mlp(8, 1), ["A"]) == 0  # no conversion asked: no match


# ------------------------------------------------------------------------------------------------ seed init / options
@pytest.mark.parametrize("initializer_range", [0.02, 0.1])
def test_new_weights_follow_the_seeds_init_bert_weights(initializer_range) -> None:
    """The seed's `init_bert_weights` (std = config.initializer_range, 0.02 in BERT's config) covers the x/y position
    embeddings, visn_fc and the pooler: N(0, std) weights, zero Linear biases (not nn.Embedding's N(0, 1) nor
    nn.Linear's uniform)."""
    torch.manual_seed(0)
    enc = tiny_encoder(text_encoder=TINY_TEXT | {"initializer_range": initializer_range})
    for name in ("pos_x", "pos_y", "visual_fc", "pooler"):
        w = getattr(enc, name).weight.detach().double().flatten()
        n = w.numel()  # >= 32 x 32; the sample std's relative standard error is ~ 1 / sqrt(2n) < 2.3 %
        assert abs(w.std().item() / initializer_range - 1) < 5 * (2 * n) ** -0.5, name
        assert abs(w.mean().item()) < 5 * initializer_range / n**0.5, name
    for name in ("visual_fc", "pooler"):
        assert torch.count_nonzero(getattr(enc, name).bias) == 0, name


def test_a_pretrained_bert_gives_the_pooler_mlm_and_itm_heads_as_the_seeds_from_pretrained(tmp_path) -> None:
    """The seed's `LXRTPretraining.from_pretrained("bert-base-uncased")` loads BERT's pooler, `cls.predictions` and
    `cls.seq_relationship` (its ITM head) besides the body; checked against the HF `BertForPreTraining` saved."""
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    hf = BertForPreTraining(config)
    with torch.no_grad():
        for p in hf.parameters():  # not the init values a random start would also give
            p.add_(torch.randn_like(p))
    hf.save_pretrained(tmp_path / "bert")
    system = ClipVilSystem(
        encoder={
            "_target_": "vl.models.clip_vil.ClipVilEncoder",
            "text_encoder": {"pretrained": str(tmp_path / "bert")},
            "backbone": TINY_BACKBONE,
        },
        objectives=["mlm", "itm"],
        data_info={"pixels": True},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
    )
    own = system.state_dict()
    ref = hf.state_dict()
    pairs = {
        "encoder.pooler.weight": "bert.pooler.dense.weight",
        "encoder.pooler.bias": "bert.pooler.dense.bias",
        "objectives.itm.classifier.weight": "cls.seq_relationship.weight",
        "objectives.itm.classifier.bias": "cls.seq_relationship.bias",
        "objectives.mlm.transform.0.weight": "cls.predictions.transform.dense.weight",
        "objectives.mlm.transform.2.weight": "cls.predictions.transform.LayerNorm.weight",
        "objectives.mlm.bias": "cls.predictions.bias",
    }
    for mine, theirs in pairs.items():
        assert torch.equal(own[mine], ref[theirs]), mine
    assert torch.equal(
        own["encoder.bert.encoder.layer.0.output.dense.weight"], ref["bert.encoder.layer.0.output.dense.weight"]
    )
    random = tiny_system(objectives=("mlm", "itm"))  # no pretrained BERT: the seed's init, nothing loaded
    assert random.bert_parts_loaded == []


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ({"head_lr": 1e-3}, "model.head_lr"),
        ({"pretrained_lr_mult": 0.1}, "model.pretrained_lr_mult"),
        ({"scheduler": {"_target_": "vl.models.schedules.linear_warmup", "_partial_": True}}, "model.scheduler"),
        ({"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}}, "model.optimizer._target_"),
        ({"optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3, "amsgrad": True}}, "model.optimizer.amsgrad"),
        ({"optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3, "fused": True}}, "model.optimizer.fused"),
        ({"visual_optimizer": {"nesterov": True}}, "model.visual_optimizer.nesterov"),
    ],
)
def test_optimizer_options_clip_vil_does_not_read_fail_naming_the_option(option, needle) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        tiny_system(**option)


def test_default_optimizer_options_are_accepted() -> None:
    system = tiny_system(head_lr=None, pretrained_lr_mult=1.0, scheduler=None)
    optimizer, _ = configured(system)
    assert isinstance(optimizer, FusedOptimizer)


def test_without_a_target_the_adamw_is_the_seeds_transformers_adamw() -> None:
    """`model.optimizer` without `_target_` (a Python caller, a config that drops it) gets the seed's AdamW, as the
    shipped config names it, not torch's."""
    from vl.optimizers import TransformersAdamW

    system = tiny_system(optimizer={"lr": 1e-3, "weight_decay": 0.01, "eps": 1e-6})
    optimizer, _ = configured(system)
    assert type(optimizer.optimizers["adamw"]) is TransformersAdamW


def test_a_frozen_backbone_nothing_loaded_is_named_in_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    backbone = {"_target_": "vl.models.clip_vil.ClipVilEncoder", "text_encoder": TINY_TEXT, "backbone": TINY_BACKBONE}
    with caplog.at_level("WARNING", logger="vl.models.clip_vil"):
        tiny_system(encoder={**backbone, "freeze_backbone": True})
    assert [r.message for r in caplog.records if "freeze_backbone" in r.message] == [
        "model.encoder.freeze_backbone=true without model.encoder.backbone_weights or model.init_from: the frozen CLIP "
        "ResNet stays at its random initialisation (the seed starts from CLIP's weights)"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vl.models.clip_vil"):
        tiny_system()  # trained from random init: nothing to say
    assert not [r for r in caplog.records if "freeze_backbone" in r.message]


@pytest.mark.parametrize("padding_rows", [True, False])
def test_position_and_type_row_zero_train_as_the_seeds_padding_idx(padding_rows: bool) -> None:
    """The seed's LXRT `BertEmbeddings` builds its position and token-type tables with `padding_idx=0`: row 0 of each
    (the [CLS] position; the one token type every CLIP-ViL token has) gets no gradient. An independent twin: the same
    tables as `nn.Embedding(..., padding_idx=0)` looked up at the same ids give the same gradients."""
    torch.manual_seed(0)
    enc = tiny_encoder(padding_rows=padding_rows)
    emb = enc.bert.embeddings
    ids = torch.randint(5, 100, (3, 7))
    types = torch.zeros_like(ids)
    out = emb(input_ids=ids, token_type_ids=types)
    out.pow(2).sum().backward()
    pos_grad, type_grad = emb.position_embeddings.weight.grad, emb.token_type_embeddings.weight.grad
    if padding_rows:
        assert torch.equal(pos_grad[0], torch.zeros_like(pos_grad[0]))
        assert torch.equal(type_grad[0], torch.zeros_like(type_grad[0]))
        assert pos_grad[1:7].abs().sum() > 0
        # the twin: a plain padding_idx=0 table looked up at the same ids, fed the same output gradient
        captured = {}

        def keep(module, inputs, output):
            output.retain_grad()
            captured["ids"], captured["out"] = inputs[0], output

        handle = emb.position_embeddings.register_forward_hook(keep)
        emb.zero_grad()
        emb(input_ids=ids, token_type_ids=types).pow(2).sum().backward()
        handle.remove()
        twin = torch.nn.Embedding(*emb.position_embeddings.weight.shape, padding_idx=0)
        twin.weight.data.copy_(emb.position_embeddings.weight.data)
        twin(captured["ids"]).backward(captured["out"].grad)
        torch.testing.assert_close(emb.position_embeddings.weight.grad, twin.weight.grad)
    else:
        assert pos_grad[0].abs().sum() > 0 and type_grad[0].abs().sum() > 0
