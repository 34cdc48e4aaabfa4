"""ViLBERT (`model=vilbert` / `model=vilbert_tiny`): shapes, global image token, co-attention placement, padding,
pretrained text stream, config validation, and that it learns."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import vl.pipeline  # noqa: F401  (schemas)
from vl.errors import ConfigError
from vl.models.system import VLSystem
from vl.models.vilbert import GLOBAL_LOC, ImageEmbedding, VilbertEncoder, VilbertSystem

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


def test_global_token_takes_the_batchs_visual_global(tiny: VLSystem) -> None:
    """`visual_global` (the corpus's own global feature, RefCOCO+'s mean of all detections) replaces the masked mean:
    given the masked mean itself the outputs are unchanged; given another feature the embedding's row 0 is its."""
    batch = make_batch(batch_size=2, regions=4)
    mask = batch["visual_mask"].unsqueeze(-1).float()
    mean = (batch["visual_feats"] * mask).sum(1) / mask.sum(1)
    other = torch.randn_like(mean)
    embed = tiny.encoder.image_embedding
    with torch.no_grad():
        torch.testing.assert_close(tiny({**batch, "visual_global": mean}).pooled, tiny(batch).pooled)
        out, _ = embed(batch["visual_feats"], batch["visual_boxes"], batch["visual_mask"], other)
        expected = embed.norm(embed.feat_proj(other) + embed.loc_proj(torch.tensor(GLOBAL_LOC)))
        torch.testing.assert_close(out[:, 0], expected)
        assert not torch.allclose(tiny({**batch, "visual_global": other}).pooled, tiny(batch).pooled)


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
    """6-layer/6-connection placement at toy width, as vilbert-multi-task's `BertEncoder.forward` runs it: for each k,
    text layers [t_prev, t_k), vision layers [v_prev, v_k), co-layer k; then the remaining vision, then text layers."""
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
    # written out by hand from the reference loop (T0..T5, CO0, T6, V0, CO1, ..., T10, V4, CO5, V5, T11)
    expected = "t0 t1 t2 t3 t4 t5 c0 t6 v0 c1 t7 v1 c2 t8 v2 c3 t9 v3 c4 t10 v4 c5 v5 t11".split()
    assert _call_order(encoder, batch) == expected


def test_vision_reaches_text_only_after_the_first_co_layer(tiny: VilbertSystem) -> None:
    """Tiny config: co-layers before text layers 2 and 3, so text layers 0-1 never see the image, layer 2 does; the
    first co-layer reads the raw image embedding (no vision layer before it)."""
    assert _call_order(tiny.encoder, make_batch()) == ["t0", "t1", "c0", "t2", "v0", "c1", "v1", "t3"]
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
    assert same == [True, True, False, False]


def test_first_co_layer_reads_the_raw_image_embedding(tiny: VilbertSystem) -> None:
    """An independent recomputation of the stream up to the first co-layer: its vision input is the image embedding."""
    batch = make_batch()
    seen: list[torch.Tensor] = []
    hook = tiny.encoder.co_layers[0].register_forward_hook(lambda _m, args, _o: seen.append(args[1]))
    with torch.no_grad():
        tiny(batch)
        embedded, _ = tiny.encoder.image_embedding(batch["visual_feats"], batch["visual_boxes"], batch["visual_mask"])
    hook.remove()
    torch.testing.assert_close(seen[0], embedded)


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
    model = build(
        "model.encoder.text_encoder.pretrained=minilm",
        "model.scheduler=null",
        "model.optimizer.lr=1e-4",
        "model.pretrained_lr_mult=0.1",  # the pretraining recipe's value (the model default is 1.0)
    )
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
    assert model.pretrained_lr_mult == 1.0 and model.pretrained_parameter_names() == set()


# ----------------------------------------------------------------------------------------------- released checkpoints
def reference_vilbert_state(
    *,
    vocab: int = 30522,
    ht: int = 64,
    t_layers: int = 4,
    t_inter: int = 128,
    hv: int = 64,
    v_layers: int = 2,
    v_inter: int = 128,
    bi: int = 64,
    co_layers: int = 2,
    feat: int = 2048,
    v_target: int = 1601,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random tensors under the key names of vilbert-multi-task's `BertForMultiModalPreTraining` (written out from
    its module tree: BertModel.embeddings / v_embeddings / encoder.layer / v_layer / c_layer / t_pooler / v_pooler,
    BertPreTrainingHeads), with the shapes its `nn.Linear(in, out)` give (weight (out, in))."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def linear(name: str, n_in: int, n_out: int) -> None:
        state[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g)
        state[f"{name}.bias"] = torch.randn(n_out, generator=g)

    def norm(name: str, n: int) -> None:
        state[f"{name}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
        state[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)

    def bert_layer(name: str, h: int, inter: int) -> None:
        for part in ("query", "key", "value"):
            linear(f"{name}.attention.self.{part}", h, h)
        linear(f"{name}.attention.output.dense", h, h)
        norm(f"{name}.attention.output.LayerNorm", h)
        linear(f"{name}.intermediate.dense", h, inter)
        linear(f"{name}.output.dense", inter, h)
        norm(f"{name}.output.LayerNorm", h)

    state["bert.embeddings.word_embeddings.weight"] = torch.randn(vocab, ht, generator=g)
    state["bert.embeddings.position_embeddings.weight"] = torch.randn(512, ht, generator=g)
    state["bert.embeddings.token_type_embeddings.weight"] = torch.randn(2, ht, generator=g)
    norm("bert.embeddings.LayerNorm", ht)
    linear("bert.v_embeddings.image_embeddings", feat, hv)
    linear("bert.v_embeddings.image_location_embeddings", 5, hv)
    norm("bert.v_embeddings.LayerNorm", hv)
    for i in range(t_layers):
        bert_layer(f"bert.encoder.layer.{i}", ht, t_inter)
    for i in range(v_layers):
        bert_layer(f"bert.encoder.v_layer.{i}", hv, v_inter)
    for k in range(co_layers):
        c = f"bert.encoder.c_layer.{k}"
        for part in ("query1", "key1", "value1"):  # read the vision stream
            linear(f"{c}.biattention.{part}", hv, bi)
        for part in ("query2", "key2", "value2"):  # read the text stream
            linear(f"{c}.biattention.{part}", ht, bi)
        linear(f"{c}.biOutput.dense1", bi, hv)
        norm(f"{c}.biOutput.LayerNorm1", hv)
        linear(f"{c}.biOutput.q_dense1", bi, hv)
        linear(f"{c}.biOutput.dense2", bi, ht)
        norm(f"{c}.biOutput.LayerNorm2", ht)
        linear(f"{c}.biOutput.q_dense2", bi, ht)
        linear(f"{c}.v_intermediate.dense", hv, v_inter)
        linear(f"{c}.v_output.dense", v_inter, hv)
        norm(f"{c}.v_output.LayerNorm", hv)
        linear(f"{c}.t_intermediate.dense", ht, t_inter)
        linear(f"{c}.t_output.dense", t_inter, ht)
        norm(f"{c}.t_output.LayerNorm", ht)
    linear("bert.t_pooler.dense", ht, bi)
    linear("bert.v_pooler.dense", hv, bi)
    linear("cls.predictions.transform.dense", ht, ht)
    norm("cls.predictions.transform.LayerNorm", ht)
    state["cls.predictions.bias"] = torch.randn(vocab, generator=g)
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]  # tied upstream
    linear("cls.bi_seq_relationship", bi, 2)
    linear("cls.imagePredictions.transform.dense", hv, hv)
    norm("cls.imagePredictions.transform.LayerNorm", hv)
    linear("cls.imagePredictions.decoder", hv, v_target)
    return state


def test_released_vilbert_checkpoint_lands_where_the_reference_keys_say(tmp_path: Path, caplog) -> None:
    state = reference_vilbert_state()
    torch.save(state, tmp_path / "pretrained_model.bin")
    caplog.set_level(logging.INFO)
    try:
        model = instantiate(
            model_cfg(f"model.state_dict_path={tmp_path / 'pretrained_model.bin'}"),
            objectives=["mlm", "itm", "mrc"],
            data_info={**DATA_INFO, "num_region_classes": 1601},
        )
    except Exception as err:  # show vl's own error, not Hydra's wrapper
        raise (err.__cause__ or err) from None
    enc = model.encoder
    co = enc.co_layers[1]
    pairs = {
        # co-attention: text queries (query2) over vision keys/values (key1/value1), and the reverse
        co.text_attends_vision.query.weight: "bert.encoder.c_layer.1.biattention.query2.weight",
        co.text_attends_vision.key.weight: "bert.encoder.c_layer.1.biattention.key1.weight",
        co.text_attends_vision.value.bias: "bert.encoder.c_layer.1.biattention.value1.bias",
        co.vision_attends_text.query.weight: "bert.encoder.c_layer.1.biattention.query1.weight",
        co.vision_attends_text.key.weight: "bert.encoder.c_layer.1.biattention.key2.weight",
        co.vision_out.dense.weight: "bert.encoder.c_layer.1.biOutput.dense1.weight",
        co.text_out.norm.weight: "bert.encoder.c_layer.1.biOutput.LayerNorm2.weight",
        co.vision_ffn.intermediate.weight: "bert.encoder.c_layer.1.v_intermediate.dense.weight",
        co.text_ffn.output.norm.bias: "bert.encoder.c_layer.1.t_output.LayerNorm.bias",
        enc.vision_layers[1].attention.self.value.weight: "bert.encoder.v_layer.1.attention.self.value.weight",
        enc.text_layers[3].output.dense.weight: "bert.encoder.layer.3.output.dense.weight",
        enc.word_embeddings.weight: "bert.embeddings.word_embeddings.weight",
        enc.image_embedding.loc_proj.weight: "bert.v_embeddings.image_location_embeddings.weight",
        enc.image_embedding.norm.bias: "bert.v_embeddings.LayerNorm.bias",
        enc.text_pooler[0].weight: "bert.t_pooler.dense.weight",
        enc.image_pooler[0].bias: "bert.v_pooler.dense.bias",
        model.objectives["mlm"].transform[0].weight: "cls.predictions.transform.dense.weight",
        model.objectives["mlm"].bias: "cls.predictions.bias",
        model.objectives["mrc"].head[3].weight: "cls.imagePredictions.decoder.weight",
    }
    for param, key in pairs.items():
        torch.testing.assert_close(param.detach(), state[key], msg=key)
    # the seed's alignment head has index 0 = aligned; vl's ITM head index 1 = aligned: rows swap
    itm = model.objectives["itm"].classifier
    torch.testing.assert_close(itm.weight[1].detach(), state["cls.bi_seq_relationship.weight"][0])
    torch.testing.assert_close(itm.weight[0].detach(), state["cls.bi_seq_relationship.weight"][1])
    torch.testing.assert_close(itm.bias.detach(), state["cls.bi_seq_relationship.bias"].flip(0))
    # nothing missing; only the expected-unused keys (tied decoder, the never-used q_dense1/2 of 2 co-layers) are reported
    assert "0 missing keys, 9 unexpected keys" in caplog.text, caplog.text
    assert "expected-unused" in caplog.text
    # the aligned probability equals the seed's softmax(bi_seq_relationship)[:, 0] on the same pooled vector
    model.eval()
    with torch.no_grad():
        pooled = model(make_batch()).pooled
        seed_logits = pooled @ state["cls.bi_seq_relationship.weight"].T + state["cls.bi_seq_relationship.bias"]
        torch.testing.assert_close(itm(pooled).softmax(-1)[:, 1], seed_logits.softmax(-1)[:, 0])


def test_released_vilbert_task_heads_and_unknown_keys(tmp_path: Path) -> None:
    """VILBertForVLTasks heads: vil_prediction (vilbert-multi-task's Linear-GeLU-LN-Linear = classifier mlp),
    vil_logit, vision_logit; the pretraining heads are expected-unused when fine-tuning; an unknown key fails."""
    state = reference_vilbert_state()
    g = torch.Generator().manual_seed(1)
    heads = {
        "vil_prediction.logit_fc.0.weight": torch.randn(128, 64, generator=g),
        "vil_prediction.logit_fc.0.bias": torch.randn(128, generator=g),
        "vil_prediction.logit_fc.2.weight": torch.randn(128, generator=g),
        "vil_prediction.logit_fc.2.bias": torch.randn(128, generator=g),
        "vil_prediction.logit_fc.3.weight": torch.randn(17, 128, generator=g),
        "vil_prediction.logit_fc.3.bias": torch.randn(17, generator=g),
        "vil_logit.weight": torch.randn(1, 64, generator=g),
        "vil_logit.bias": torch.randn(1, generator=g),
        "vision_logit.weight": torch.randn(1, 64, generator=g),
        "vision_logit.bias": torch.randn(1, generator=g),
        "vil_prediction_gqa.logit_fc.0.weight": torch.randn(3, 3, generator=g),
    }
    torch.save({**state, **heads}, tmp_path / "multi_task_model.bin")
    path = tmp_path / "multi_task_model.bin"
    model = instantiate(
        model_cfg(f"model.state_dict_path={path}", "model.heads.vqa.classifier=mlp"),
        objectives=["vqa", "retrieval", "refer"],
        data_info=DATA_INFO,
    )
    torch.testing.assert_close(
        model.objectives["vqa"].classifier[3].weight.detach(), heads["vil_prediction.logit_fc.3.weight"]
    )
    torch.testing.assert_close(model.objectives["retrieval"].vil_logit.weight.detach(), heads["vil_logit.weight"])
    torch.testing.assert_close(model.objectives["refer"].vision_logit.bias.detach(), heads["vision_logit.bias"])

    torch.save({**state, "bert.encoder.c_layer.0.biattention.logit1.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(Exception) as err:
        instantiate(model_cfg(f"model.state_dict_path={path}"), objectives=["mlm", "itm"], data_info=DATA_INFO)
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, ConfigError) and "c_layer.0.biattention.logit1.weight" in str(cause)


def test_mlm_head_starts_from_the_bert_checkpoint(tmp_path: Path) -> None:
    """As upstream (`BertForMultiModalPreTraining.from_pretrained(bert-base-uncased)` fills `cls.predictions`): the MLM
    head of a ViLBERT built on a BERT dir computes the same logits as that BERT's own MLM head."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(4)
    bert = BertForMaskedLM(config).eval()
    with torch.no_grad():
        bert.cls.predictions.bias.normal_()
        bert.cls.predictions.transform.dense.weight.normal_()
    bert.save_pretrained(tmp_path / "bert")
    model = build(
        f"model.encoder.text_encoder.pretrained={tmp_path / 'bert'}", "model.encoder.t_biattention_id=[0,1]"
    ).eval()
    states = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.objectives["mlm"].logits(states), bert.cls(states))
    assert not any(n.startswith("objectives.") for n in model.pretrained_parameter_names())  # base lr (seed)
    assert model.objectives["mlm"].word_embeddings is model.encoder.word_embeddings  # tied decoder


def test_mlm_head_bias_saved_twice_must_agree(tmp_path: Path) -> None:
    """`cls.predictions.bias` and `cls.predictions.decoder.bias` are one tied tensor in BERT checkpoints: equal copies
    load (the logits are BERT's own head's), differing ones are an error naming both keys, not a silent last-wins."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(5)
    bert = BertForMaskedLM(config).eval()
    with torch.no_grad():
        bert.cls.predictions.bias.normal_()
    bert.save_pretrained(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    state = load_file(str(weights))
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
    save_file(state, str(weights))
    model = build(f"model.encoder.text_encoder.pretrained={tmp_path / 'bert'}", "model.encoder.t_biattention_id=[0,1]")
    states = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().objectives["mlm"].logits(states), bert.cls(states))
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"] + 1.0
    save_file(state, str(weights))
    with pytest.raises(Exception) as err:
        build(f"model.encoder.text_encoder.pretrained={tmp_path / 'bert'}", "model.encoder.t_biattention_id=[0,1]")
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, ConfigError) and "cls.predictions.decoder.bias" in str(cause), cause


def test_mlm_on_mismatched_pairs_is_kept_by_default_as_upstream() -> None:
    """ViLBERT keeps the MLM loss on mismatched pairs; `on_mismatched_pairs=false` drops those rows (computed by hand)."""
    batch = make_batch(batch_size=4)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 1:4] = batch["input_ids"][:, 1:4]
    batch["mlm_labels"], batch["itm_labels"] = labels, torch.tensor([1, 0, 1, 0])
    torch.manual_seed(0)
    keep = build().eval()
    torch.manual_seed(0)
    drop = build("model.heads.mlm.on_mismatched_pairs=false").eval()
    assert keep.objectives["mlm"].on_mismatched_pairs and not drop.objectives["mlm"].on_mismatched_pairs
    with torch.no_grad():
        out = keep(batch)
        logits = keep.objectives["mlm"].logits(out.text)  # (B, T, V)
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)  # (B, T)
        every_pair = per_token[:, 1:4].mean()
        aligned_only = per_token[[0, 2], 1:4].mean()
        torch.testing.assert_close(keep.objectives["mlm"](out, batch).loss, every_pair)
        torch.testing.assert_close(drop.objectives["mlm"](drop(batch), batch).loss, aligned_only)


def test_vilbert_beta_weight_normed_vqa_head_loads(tmp_path: Path) -> None:
    """vilbert_beta's SimpleClassifier (`main`: weight_norm(Linear) - ReLU - Dropout - weight_norm(Linear), the old
    `torch.nn.utils.weight_norm` with `weight_g` / `weight_v`) -> vl's `classifier: simple`; same outputs."""
    import warnings

    from torch import nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old weight_norm is deprecated, but it is what the seed used
        main = nn.Sequential(
            nn.utils.weight_norm(nn.Linear(64, 128), dim=None),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.utils.weight_norm(nn.Linear(128, 17), dim=None),
        ).eval()
    state = {f"vil_prediction.main.{k}": v.detach().clone() for k, v in main.state_dict().items()}
    assert "vil_prediction.main.0.weight_g" in state
    torch.save({**reference_vilbert_state(), **state}, tmp_path / "beta.bin")
    model = instantiate(
        model_cfg(f"model.state_dict_path={tmp_path / 'beta.bin'}"), objectives=["vqa"], data_info=DATA_INFO
    )
    pooled = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.objectives["vqa"].classifier.eval()(pooled), main(pooled))


# ----------------------------------------------------------------------------------------------- faithfulness fixes
def test_vl_named_state_dict_reloads_unchanged_and_seed_head_is_flipped(tmp_path: Path) -> None:
    """`model.state_dict_path` with a saved `VilbertSystem.state_dict()` (vl naming, ITM index 1 = aligned) loads
    every tensor unchanged, the ITM head included; the seed's `cls.bi_seq_relationship` (0 = aligned) is row-swapped."""
    torch.manual_seed(0)
    source = build()
    torch.save(source.state_dict(), tmp_path / "vl.bin")
    torch.manual_seed(1)
    loaded = build(f"model.state_dict_path={tmp_path / 'vl.bin'}")
    expected, got = source.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # the same under DDP's `module.` prefix
    torch.save({f"module.{k}": v for k, v in expected.items()}, tmp_path / "ddp.bin")
    loaded = build(f"model.state_dict_path={tmp_path / 'ddp.bin'}")
    assert torch.equal(loaded.objectives["itm"].classifier.weight, source.objectives["itm"].classifier.weight)

    # a hand-built seed head: rows [aligned, not aligned] -> vl rows [not aligned, aligned]
    seed_w, seed_b = torch.randn(2, 64), torch.tensor([0.3, -0.7])
    state = {k: v for k, v in expected.items() if not k.startswith("objectives.itm.")}
    state |= {"cls.bi_seq_relationship.weight": seed_w, "cls.bi_seq_relationship.bias": seed_b}
    torch.save(state, tmp_path / "seed_head.bin")
    itm = build(f"model.state_dict_path={tmp_path / 'seed_head.bin'}").objectives["itm"].classifier
    assert torch.equal(itm.weight[0], seed_w[1]) and torch.equal(itm.weight[1], seed_w[0])
    assert itm.bias.tolist() == pytest.approx([-0.7, 0.3])
    del state["cls.bi_seq_relationship.bias"]
    torch.save(state, tmp_path / "half.bin")
    with pytest.raises(ConfigError, match="bi_seq_relationship"):
        build(f"model.state_dict_path={tmp_path / 'half.bin'}")


#: the seed's `bert_weight_name` (config/bert-base-uncased_weight_name.json): BERT's embeddings and layers, no `cls.*`
SEED_BERT_WEIGHT = r"encoder\.bert\.(embeddings|encoder\.layer\.\d+)\..+"


def test_pretraining_lr_mult_scales_bert_body_only_not_the_mlm_head(tmp_path: Path) -> None:
    """train_concap.py: a parameter whose name (less `bert.`) is in `bert_weight_name` trains at lr x 0.1, every other
    one (co-layers, vision stream, poolers, and the `cls.*` heads even when BERT filled them) at the base lr."""
    import re

    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    model = build(
        f"model.encoder.text_encoder.pretrained={tmp_path / 'bert'}",
        "model.encoder.t_biattention_id=[0,1]",
        "model.scheduler=null",
        "model.optimizer.lr=1e-4",
        "model.pretrained_lr_mult=0.1",
    )
    assert model._pretrained_head  # the MLM head did start from the BERT checkpoint
    lr_of = {id(p): group["lr"] for group in model.configure_optimizers().param_groups for p in group["params"]}
    names = [n for n, _ in model.named_parameters()]
    expected = {n: 1e-5 if re.fullmatch(SEED_BERT_WEIGHT, n) else 1e-4 for n in names}
    got = {n: lr_of[id(p)] for n, p in model.named_parameters()}
    assert got == pytest.approx(expected)
    assert sum(v == 1e-5 for v in expected.values()) == len(list(model.encoder.bert.parameters()))
    assert expected["objectives.mlm.transform.0.weight"] == expected["objectives.mlm.bias"] == 1e-4


@pytest.mark.parametrize(
    ("experiment", "mult"),
    [
        ("vilbert_pretrain", 0.1),
        ("vilbert_vqa", 1.0),
        ("vilbert_vcr", 1.0),
        ("vilbert_retrieval", 1.0),
        ("vilbert_refcoco", 1.0),
    ],
)
def test_bert_lr_mult_only_in_the_pretraining_recipe(experiment: str, mult: float) -> None:
    """train_concap.py scales the BERT weights' lr by 0.1; train_tasks.py (fine-tuning) gives them the task lr."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    assert cfg.model.pretrained_lr_mult == mult


def test_grounding_head_drops_out_region_states_in_training_only() -> None:
    """The seed: `vision_logit(dropout(sequence_output_v))`, p = 0.1. With a 1-d state x, weight w, bias b, each
    train-mode logit is b (dropped) or w x / (1 - p) + b (kept); in eval mode it is w x + b."""
    from vl.batch import EncoderOutput
    from vl.heads import RegionGrounding

    torch.manual_seed(0)
    head = RegionGrounding(hidden_size=1, dropout=0.5, whole_image_candidate=False)
    assert RegionGrounding(hidden_size=4).dropout.p == 0.1  # the seed's VILBertForVLTasks dropout_prob
    w, b = float(head.vision_logit.weight.detach()), float(head.vision_logit.bias.detach())
    x = torch.rand(8, 201, 1) + 0.5  # never 0: a dropped and a kept state differ
    out = EncoderOutput(text=torch.zeros(8, 3, 4), visual=x, pooled=torch.zeros(8, 4), visual_prefix=1)
    batch = {"visual_mask": torch.ones(8, 200), "refer_targets": torch.zeros(8, 200)}
    regions = x[:, 1:, 0]
    head.eval()
    torch.testing.assert_close(head(out, batch).logits, w * regions + b)
    head.train()
    logits = head(out, batch).logits
    kept = torch.isclose(logits, w * regions / 0.5 + b)
    dropped = torch.isclose(logits, torch.full_like(logits, b))
    assert bool((kept | dropped).all())
    assert 0.4 < float(dropped.float().mean()) < 0.6
