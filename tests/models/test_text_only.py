"""Text-only LXMERT / VisualBERT wrappers: tiny random configs, dummy-visual invariance, DeepSpeed-style loading."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LxmertForPreTraining, VisualBertForPreTraining

from vl.errors import ConfigError
from vl.models.text_only import (
    LxmertLanguageOnlyXLayer,
    lxmert_text_only,
    tiny_lxmert_config,
    tiny_visual_bert_config,
    visual_bert_text_only,
)


def _ids(bsz: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (bsz, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_lxmert_x_layers_replaced_with_weights_carried_over():
    torch.manual_seed(0)
    base = LxmertForPreTraining(tiny_lxmert_config()).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = lxmert_text_only(config=tiny_lxmert_config())  # random-init path
    assert all(isinstance(layer, LxmertLanguageOnlyXLayer) for layer in model.model.lxmert.encoder.x_layers)
    from vl.models.text_only import make_lxmert_language_only

    patched = make_lxmert_language_only(base)
    after = patched.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lxmert_dummy_visual_input_changes_no_logit():
    torch.manual_seed(0)
    model = lxmert_text_only(config=tiny_lxmert_config())
    batch = _ids()
    bsz = batch["input_ids"].shape[0]
    with torch.no_grad():
        a = model(**batch)  # dummy U(0,10)/U(0,1) drawn inside
        b = model(**batch, visual_feats=torch.rand(bsz, 1, 2048) * 10, visual_pos=torch.rand(bsz, 1, 4))
        c = model(**batch, visual_feats=torch.randn(bsz, 3, 2048) * 100, visual_pos=torch.rand(bsz, 3, 4))
    assert a.shape == (bsz, 7, 30522)
    assert torch.equal(a, b) and torch.equal(a, c)
    # the unpatched model does read the visual input: the patch is what makes the logits invariant
    raw = LxmertForPreTraining(tiny_lxmert_config()).eval()
    with torch.no_grad():
        x = raw(**batch, visual_feats=torch.rand(bsz, 1, 2048) * 10, visual_pos=torch.rand(bsz, 1, 4)).prediction_logits
        y = raw(**batch, visual_feats=torch.rand(bsz, 1, 2048) * 10, visual_pos=torch.rand(bsz, 1, 4)).prediction_logits
    assert not torch.allclose(x, y)


def test_lxmert_language_only_layer_matches_the_formula():
    torch.manual_seed(0)
    cfg = tiny_lxmert_config()
    layer = LxmertLanguageOnlyXLayer(cfg).eval()
    lang, vis = torch.randn(2, 5, 32), torch.randn(2, 1, 32)
    with torch.no_grad():
        out, _ = layer(lang, None, vis, None)
        x = layer.visual_attention.output.LayerNorm(layer.visual_attention.output.dense(torch.zeros_like(lang)) + lang)
        x = layer.lang_self_att(x, None)[0]
        expected = layer.lang_output(layer.lang_inter(x), x)
    assert torch.allclose(out, expected, atol=1e-6)


def test_deepspeed_state_dict_loaded_non_strictly(tmp_path, caplog):
    torch.manual_seed(0)
    cfg = tiny_lxmert_config()
    src = LxmertForPreTraining(cfg).eval()
    cfg.save_pretrained(tmp_path)
    state = dict(src.state_dict())
    state.pop("cls.predictions.bias")
    ckpt_dir = tmp_path / "global_step1"
    ckpt_dir.mkdir()
    torch.save({"module": state}, ckpt_dir / "mp_rank_00_model_states.pt")
    with caplog.at_level(logging.INFO):
        model = lxmert_text_only(tmp_path)
    assert "1 missing keys, 0 unexpected keys" in caplog.text
    assert "missing keys: cls.predictions.bias" in caplog.text
    w = "lxmert.embeddings.word_embeddings.weight"
    assert torch.equal(model.model.state_dict()[w], src.state_dict()[w])
    # a key that maps to nothing is an error, not a log line
    torch.save({"module": {**state, "extra.weight": torch.zeros(1)}}, ckpt_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match=r"extra\.weight"):
        lxmert_text_only(tmp_path)


def test_lxmert_hf_dir_loads_with_no_missing_keys(tmp_path, caplog):
    """A `LxmertForPreTraining.save_pretrained` dir (the unc-nlp/lxmert-base-uncased layout): every tensor of the
    loaded text-only scorer equals the source's, nothing missing; an extra key in the file is an error."""
    torch.manual_seed(0)
    src = LxmertForPreTraining(tiny_lxmert_config()).eval()
    src.save_pretrained(tmp_path / "hf")
    with caplog.at_level(logging.INFO):
        model = lxmert_text_only(tmp_path / "hf")
    assert "0 missing keys, 0 unexpected keys" in caplog.text
    ref = src.state_dict()
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, ref[key]), key
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    save_file({**state, "lxmert.adapter.weight": torch.zeros(2)}, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"lxmert\.adapter\.weight"):
        lxmert_text_only(tmp_path / "hf")


def test_visual_bert_text_only_from_dir_and_deepspeed(tmp_path, caplog):
    torch.manual_seed(0)
    cfg = tiny_visual_bert_config()
    src = VisualBertForPreTraining(cfg).eval()
    src.save_pretrained(tmp_path / "hf")
    model = visual_bert_text_only(tmp_path / "hf")
    batch = _ids()
    with torch.no_grad():
        logits = model(**batch)
        ref = src(**batch).prediction_logits
    assert logits.shape == (2, 7, 30522)
    assert torch.allclose(logits, ref, atol=1e-5)
    ds = tmp_path / "ds"
    ds.mkdir()
    cfg.save_pretrained(ds)
    torch.save({"module": src.state_dict()}, ds / "mp_rank_00_model_states.pt")
    with caplog.at_level(logging.INFO):
        again = visual_bert_text_only(ds)
    assert "0 missing keys, 0 unexpected keys" in caplog.text
    with torch.no_grad():
        assert torch.allclose(again(**batch), ref, atol=1e-5)
