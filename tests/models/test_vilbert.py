"""ViLBERT (`model=vilbert` / `model=vilbert_tiny`): shapes, global image token, co-attention placement, padding,
pretrained text stream, config validation, and that it learns."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import vl.build  # noqa: F401  (schemas)
from vl.errors import ConfigError
from vl.models.system import VLSystem
from vl.models.vilbert import GLOBAL_LOC, ImageEmbedding, VilbertEncoder

CONF = Path(__file__).resolve().parents[2] / "conf"
DATA_INFO = {"visual_dim": 2048, "num_answers": 17}


def model_cfg(*overrides: str, model: str = "vilbert_tiny") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"model={model}", "~experiment", *overrides])
    return cfg.model


def build(*overrides: str, objectives: tuple[str, ...] = ("mlm", "itm"), model: str = "vilbert_tiny") -> VLSystem:
    """Instantiate like `vl.pipeline` does, re-raising vl's own errors unwrapped from Hydra's."""
    try:
        return instantiate(model_cfg(*overrides, model=model), objectives=list(objectives), data_info=DATA_INFO)
    except Exception as err:
        cause = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        raise cause or err from None


def make_batch(batch_size: int = 3, text_len: int = 7, regions: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x1y1 = torch.rand(batch_size, regions, 2, generator=g) * 0.5
    boxes = torch.cat([x1y1, x1y1 + 0.1 + torch.rand(batch_size, regions, 2, generator=g) * 0.4], dim=-1)
    attention_mask = torch.ones(batch_size, text_len, dtype=torch.long)
    attention_mask[0, -2:] = 0
    return {
        "input_ids": torch.randint(1000, 2000, (batch_size, text_len), generator=g),
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros(batch_size, text_len, dtype=torch.long),
        "visual_feats": torch.rand(batch_size, regions, 2048, generator=g),
        "visual_boxes": boxes,
        "visual_mask": torch.ones(batch_size, regions, dtype=torch.long),
    }


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is ~100x faster than two fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> VLSystem:
    torch.manual_seed(0)
    return build().eval()


def test_output_shapes(tiny: VLSystem) -> None:
    out = tiny(make_batch(batch_size=3, text_len=7, regions=5))
    assert out.text.shape == (3, 7, 64)
    assert out.visual.shape == (3, 5 + 1, 64)  # + the global image token at index 0
    assert out.pooled.shape == (3, 64)
    assert (out.pooled >= 0).all()  # product of two ReLU poolers


def test_global_token_is_masked_mean_with_whole_image_loc() -> None:
    feats, boxes = torch.rand(2, 4, 8), torch.rand(2, 4, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    all_feats, locs, all_mask = ImageEmbedding.with_global_token(feats, boxes, mask)
    assert torch.allclose(all_feats[0, 0], feats[0].mean(0))
    assert torch.allclose(all_feats[1, 0], feats[1, :2].mean(0))
    assert torch.equal(locs[:, 0], torch.tensor([GLOBAL_LOC, GLOBAL_LOC]))
    assert GLOBAL_LOC == (0.0, 0.0, 1.0, 1.0, 1.0)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    assert torch.allclose(locs[:, 1:], torch.cat([boxes, area.unsqueeze(-1)], -1))
    assert torch.equal(all_mask, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    embed = ImageEmbedding(feat_dim=8, hidden=16, dropout=0.1).eval()
    out, _ = embed(feats, boxes, mask)
    expected = embed.norm(embed.feat_proj(feats[1, :2].mean(0)) + embed.loc_proj(torch.tensor(GLOBAL_LOC)))
    assert out.shape == (2, 5, 16) and torch.allclose(out[1, 0], expected, atol=1e-6)


def _call_order(encoder: VilbertEncoder, batch: dict[str, torch.Tensor]) -> list[str]:
    order: list[str] = []
    hooks = [
        module.register_forward_hook(lambda *_, name=f"{prefix}{i}": order.append(name))
        for prefix, layers in (("t", encoder.text_layers), ("v", encoder.vision_layers), ("c", encoder.co_layers))
        for i, module in enumerate(layers)
    ]
    with torch.no_grad():
        encoder(batch)
    for hook in hooks:
        hook.remove()
    return order


def test_layer_order_of_the_base_config() -> None:
    """6-layer/6-connection placement at toy width: text layers 0-5 alone, then co-layer k after text 6+k, vision k."""
    encoder = VilbertEncoder(
        text_encoder={"hidden_size": 16, "num_layers": 12, "num_heads": 2, "intermediate_size": 16},
        data_info={"visual_dim": 8},
        v_hidden=16,
        v_num_layers=6,
        v_heads=2,
        v_intermediate=16,
        bi_hidden=16,
        bi_heads=2,
        v_biattention_id=[0, 1, 2, 3, 4, 5],
        t_biattention_id=[6, 7, 8, 9, 10, 11],
    ).eval()
    batch = make_batch(batch_size=1, text_len=3, regions=2)
    batch["visual_feats"] = batch["visual_feats"][..., :8]
    expected = [f"t{i}" for i in range(6)] + [n for k in range(6) for n in (f"t{6 + k}", f"v{k}", f"c{k}")]
    assert _call_order(encoder, batch) == expected


def test_vision_reaches_text_only_after_the_first_co_layer(tiny: VLSystem) -> None:
    """Tiny config: co-layers after text layers 2 and 3, so text layers 0-2 never see the image, layer 3 does."""
    assert _call_order(tiny.encoder, make_batch()) == ["t0", "t1", "t2", "v0", "c0", "t3", "v1", "c1"]
    outputs: list[list[torch.Tensor]] = [[], []]
    for run, seed in enumerate((0, 1)):
        batch = make_batch(seed=0)
        batch["visual_feats"] = make_batch(seed=seed)["visual_feats"]  # only the image differs
        hooks = [
            layer.register_forward_hook(lambda _m, _i, out, run=run: outputs[run].append(out))
            for layer in tiny.encoder.text_layers
        ]
        with torch.no_grad():
            tiny(batch)
        for hook in hooks:
            hook.remove()
    same = [torch.equal(a, b) for a, b in zip(*outputs)]
    assert same == [True, True, True, False]


def test_padding_regions_do_not_change_outputs(tiny: VLSystem) -> None:
    batch = make_batch(regions=3)
    noise = make_batch(regions=5, seed=1)
    padded = {**batch, **{key: noise[key] for key in ("visual_feats", "visual_boxes", "visual_mask")}}
    for key in ("visual_feats", "visual_boxes", "visual_mask"):
        padded[key][:, :3] = batch[key]  # the same 3 regions + two extra regions of noise, masked out
    padded["visual_mask"][:, 3:] = 0
    with torch.no_grad():
        out, out_padded = tiny(batch), tiny(padded)
    assert torch.allclose(out.text, out_padded.text, atol=1e-5)
    assert torch.allclose(out.pooled, out_padded.pooled, atol=1e-5)
    assert torch.allclose(out.visual, out_padded.visual[:, :4], atol=1e-5)  # global token + 3 real regions


def test_minilm_text_stream_loads_with_key_report_and_gets_lower_lr(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import BertModel

    from vl.pretrained import resolve_model_dir

    caplog.set_level(logging.INFO, logger="vl.pretrained")
    model = build("model.encoder.text_encoder.pretrained=minilm", "model.scheduler=null", "model.optimizer.lr=1e-4")
    messages = [r.getMessage() for r in caplog.records if r.name == "vl.pretrained"]
    assert any("BERT weights from" in m and "0 missing keys" in m for m in messages), messages
    assert any("unexpected keys: pooler.dense" in m for m in messages), messages  # ViLBERT has its own poolers
    reference = BertModel.from_pretrained(str(resolve_model_dir("minilm")), add_pooling_layer=False)
    assert model.encoder.text_hidden == reference.config.hidden_size == 384
    assert torch.equal(
        model.encoder.bert.encoder.layer[5].output.dense.weight, reference.encoder.layer[5].output.dense.weight
    )
    # MLM head on the 384-d text states, ITM head on the 64-d pooled vector
    out = model(make_batch())
    assert out.text.shape[-1] == 384 and out.pooled.shape[-1] == 64
    assert model.objectives["mlm"].transform[0].in_features == 384
    assert model.objectives["itm"].classifier.in_features == 64

    optimizer = model.configure_optimizers()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    text_params = list(model.encoder.bert.parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("encoder.bert.")]
    assert sorted({lr_of[id(p)] for p in text_params}) == pytest.approx([1e-5])
    assert sorted({lr_of[id(p)] for p in others}) == pytest.approx([1e-4])
    assert len(lr_of) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.encoder.t_biattention_id=[2,4]", "model.encoder.t_biattention_id"),  # the text stream has 4 layers
        ("model.encoder.v_biattention_id=[1,0]", "model.encoder.v_biattention_id"),  # not increasing
        ("model.encoder.v_biattention_id=[0]", "model.encoder.v_biattention_id"),  # lengths differ
        ("model.encoder.t_biattention_id=[-1,3]", "model.encoder.t_biattention_id"),
    ],
)
def test_invalid_biattention_ids_raise_config_error(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(override)


def test_itm_mlm_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = build(
        "model.scheduler=null",
        "model.optimizer.lr=3e-3",
        "model.encoder.dropout=0.0",
        "model.encoder.text_encoder.dropout=0.0",
    )
    batch = make_batch(batch_size=4)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 1:3] = batch["input_ids"][:, 1:3]
    batch["input_ids"][:, 1:3] = 103  # [MASK]
    batch["mlm_labels"], batch["itm_labels"] = labels, torch.tensor([1, 0, 1, 0])
    optimizer = model.configure_optimizers()
    model.train()
    losses = []
    for _ in range(30):
        out = model(batch)
        parts = {name: head(out, batch).loss for name, head in model.objectives.items()}
        loss = parts["mlm"] + parts["itm"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append((loss.item(), parts["itm"].item()))
    (first, first_itm), (last, last_itm) = losses[0], losses[-1]
    assert last < 0.5 * first and last_itm < 0.5 * first_itm, losses


def test_base_config_composes_and_has_vilbert_size() -> None:
    """The 6-layer/6-connection config, built on the meta device (no memory, no init compute)."""
    with torch.device("meta"):
        model = build(model="vilbert", objectives=("itm",))
    encoder = model.encoder
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (encoder.text_hidden, encoder.visual_hidden, encoder.pooled_hidden) == (768, 1024, 1024)
    assert len(encoder.text_layers) == 12 and len(encoder.vision_layers) == 6 and len(encoder.co_layers) == 6
    assert 105e6 < count(encoder.bert) < 112e6  # BERT-base without its pooler
    assert 225e6 < count(encoder) < 245e6
    assert model.pretrained_lr_mult == 0.1 and model.pretrained_parameter_names() == set()
