"""`model=visual_bert` is the published VisualBERT: a `transformers.VisualBertModel` saved with `save_pretrained` loads
with no missing keys and computes the same outputs; `model=single_stream` / `visual_bert_tiny` is the other encoder."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from transformers import VisualBertConfig, VisualBertForPreTraining, VisualBertModel

import vl.pipeline  # noqa: F401  (schemas)
from vl.errors import ConfigError
from vl.models.visual_bert import VisualBertSystem

CONF = Path(__file__).resolve().parents[2] / "conf"
FEAT = 24
OPT = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


def tiny_config() -> VisualBertConfig:
    return VisualBertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        visual_embedding_dim=FEAT,
        max_position_embeddings=64,
    )


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorms and biases too), so a parameter left at its init cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def random_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(3, 6, dtype=torch.long)
    attention_mask[1, -2:] = 0
    visual_mask = torch.ones(3, 4, dtype=torch.long)
    visual_mask[2, -1] = 0
    return {
        "input_ids": torch.randint(1000, 2000, (3, 6), generator=g),
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros(3, 6, dtype=torch.long),
        "visual_feats": torch.randn(3, 4, FEAT, generator=g),
        "visual_boxes": torch.rand(3, 4, 4, generator=g),
        "visual_mask": visual_mask,
    }


def encoder(text_encoder: dict) -> dict:
    """The `model.encoder` node of the published VisualBERT."""
    return {"_target_": "vl.models.visual_bert.VisualBertEncoder", "text_encoder": text_encoder}


def system(pretrained: Path | None, objectives=("mlm", "itm"), **text) -> VisualBertSystem:
    return VisualBertSystem(
        encoder=encoder({"pretrained": str(pretrained) if pretrained else None, **text}),
        objectives=list(objectives),
        data_info={"visual_dim": FEAT},
        optimizer=OPT,
    ).eval()


def test_hf_visual_bert_dir_loads_with_no_missing_keys_and_equal_outputs(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    hf = VisualBertModel(tiny_config()).eval()
    randomise(hf, seed=1)
    hf.save_pretrained(tmp_path / "vb")
    caplog.set_level(logging.INFO)
    model = system(tmp_path / "vb", objectives=("itm",))
    # every encoder parameter comes from the dir; only the ITM head (not in a VisualBertModel file) stays new
    assert "2 missing keys, 0 unexpected keys" in caplog.text, caplog.text
    assert "missing keys: objectives.itm.classifier.bias, objectives.itm.classifier.weight\n" in caplog.text
    batch = random_batch()
    with torch.no_grad():
        ref = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            visual_embeds=batch["visual_feats"],
            visual_attention_mask=batch["visual_mask"],
        )
        out = model(batch)
    torch.testing.assert_close(out.text, ref.last_hidden_state[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.visual, ref.last_hidden_state[:, 6:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert out.text.abs().sum() > 0 and not torch.equal(out.pooled, torch.zeros_like(out.pooled))


def test_visual_bert_for_pretraining_heads_load(tmp_path: Path) -> None:
    """`VisualBertForPreTraining` dirs (uclanlp/visualbert-*-pre layout): the MLM head and the sentence-image head
    (HF: index 0 = matching pair) become vl's MLM head and ITM head (index 1 = aligned)."""
    torch.manual_seed(0)
    hf = VisualBertForPreTraining(tiny_config()).eval()
    randomise(hf, seed=2)
    hf.save_pretrained(tmp_path / "vbp")
    model = system(tmp_path / "vbp")
    batch = random_batch(1)
    with torch.no_grad():
        ref = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            visual_embeds=batch["visual_feats"],
            visual_attention_mask=batch["visual_mask"],
        )
        out = model(batch)
        mlm = model.objectives["mlm"].logits(out.text)
        itm = model.objectives["itm"].classifier(out.pooled)
    torch.testing.assert_close(mlm, ref.prediction_logits[:, :6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(itm[:, 1], ref.seq_relationship_logits[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(itm[:, 0], ref.seq_relationship_logits[:, 1], atol=1e-5, rtol=1e-5)


def test_bert_dir_initialises_visual_bert_as_published(tmp_path: Path) -> None:
    """A BERT dir fills the BERT parts; the visual type/position tables start as the text ones."""
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    model = system(tmp_path / "bert", objectives=("itm",))
    emb = model.encoder.visual_bert.embeddings
    torch.testing.assert_close(emb.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(emb.visual_token_type_embeddings.weight, bert.embeddings.token_type_embeddings.weight)
    torch.testing.assert_close(emb.visual_position_embeddings.weight, bert.embeddings.position_embeddings.weight)
    layer = model.encoder.visual_bert.encoder.layer[1].output.dense.weight
    torch.testing.assert_close(layer, bert.encoder.layer[1].output.dense.weight)


def test_wrong_visual_dim_and_unknown_keys_fail(tmp_path: Path) -> None:
    hf = VisualBertModel(tiny_config())
    hf.save_pretrained(tmp_path / "vb")
    with pytest.raises(ConfigError, match="visual_embedding_dim=24"):
        VisualBertSystem(
            encoder=encoder({"pretrained": str(tmp_path / "vb")}),
            objectives=["itm"],
            data_info={"visual_dim": 2048},
            optimizer=OPT,
        )
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "vb" / "model.safetensors"))
    state["adapter.dense.weight"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "vb" / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"adapter\.dense\.weight"):
        system(tmp_path / "vb", objectives=("itm",))


def test_model_names_compose_to_the_right_classes() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        targets = {
            name: compose("train", overrides=[f"model={name}", "~experiment"]).model.encoder._target_
            for name in ("visual_bert", "single_stream", "visual_bert_tiny")
        }
        default = compose("train").model.encoder._target_
    assert targets["visual_bert"] == "vl.models.visual_bert.VisualBertEncoder"
    assert targets["single_stream"] == targets["visual_bert_tiny"] == default
    assert default == "vl.models.single_stream.SingleStreamEncoder"
    with torch.device("meta"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = compose("train", overrides=["model=visual_bert", "~experiment"]).model
        model = instantiate(cfg, objectives=["itm"], data_info={"visual_dim": 2048})
    assert model.encoder.visual_bert.config.hidden_size == 768  # BERT-base: the published size


def test_init_from_reports_head_changes_as_info_and_other_keys_as_warnings(tmp_path: Path, caplog) -> None:
    """Pretraining (mlm + itm) -> fine-tuning (vqa): the new head's keys and the unused heads' keys are what a stage
    change means by design: one INFO line each, by head name; the encoder's keys all load. A missing encoder key
    (an incompatible checkpoint) is still a WARNING naming the key."""
    torch.manual_seed(0)
    config = tiny_config()
    hf = VisualBertModel(config)
    hf.save_pretrained(tmp_path / "vb")
    pre = system(tmp_path / "vb", objectives=("mlm", "itm"))
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": pre.state_dict()}, path)
    vqa_info = {"visual_dim": FEAT, "num_answers": 5}
    fine = VisualBertSystem(encoder=encoder({"pretrained": str(tmp_path / "vb")}), objectives=["vqa"],
                            data_info=vqa_info, optimizer=OPT)  # fmt: skip
    caplog.clear()
    caplog.set_level(logging.INFO)
    fine.load_init_checkpoint(str(path))
    records = [(r.levelno, r.getMessage()) for r in caplog.records if "init from" in r.getMessage()]
    new = [m for level, m in records if level == logging.INFO and "heads new here, initialised fresh: vqa (" in m]
    unused = [m for level, m in records if level == logging.INFO and "heads not used here: itm, mlm (" in m]
    assert new and unused, records
    assert not [m for level, m in records if level >= logging.WARNING], records
    n_vqa = sum(k.startswith("objectives.vqa.") for k in fine.state_dict())
    assert f"initialised fresh: vqa ({n_vqa} tensors)" in new[0]
    for key, value in fine.state_dict().items():
        if key.startswith("encoder."):
            torch.testing.assert_close(value, pre.state_dict()[key], msg=key)

    # an encoder key the checkpoint lacks: a warning naming it
    state = {k: v for k, v in pre.state_dict().items() if k != "encoder.bert.pooler.dense.bias"}
    if len(state) == len(pre.state_dict()):  # the pooler's name in this encoder
        state.pop(next(k for k in pre.state_dict() if k.startswith("encoder.")))
    torch.save({"state_dict": state}, path)
    missing_key = sorted(set(pre.state_dict()) - set(state))[0]
    caplog.clear()
    fine.load_init_checkpoint(str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("missing keys: " + missing_key in m for m in warnings), warnings
