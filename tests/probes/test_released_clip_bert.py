"""Released CLIP-BERT / BERT-baseline state dicts (`clip_bert:FILE[@DIR]`, `bert:FILE[@DIR]`): the scorer's logits
at [MASK] equal those of a transcription of the seed's `BertImageForMaskedLM` (lovhag/measure-visual-commonsense-
knowledge, `models/src/clip_bert/modeling_bert.py`) holding the same weights, with and without an image feature."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertEmbeddings, BertOnlyMLMHead

from vl.errors import ConfigError
from vl.eval.probes.scorers import ReleasedClipBertScorer, build_scorer, encode_masked

CLIP_EMBED_DIM = 512  # the seed's constant


# --------------------------------------------------------------------------- the seed's model, transcribed
class SeedBertImageEmbeddings(BertEmbeddings):
    """The seed's `BertImageEmbeddings.forward`: no position and no token-type embedding where token_type_ids == -1.
    (Only the signature follows transformers 5: `cache_length` for the seed's `past_key_values_length`.)"""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, cache_length=0):
        if input_ids is not None:
            input_shape = input_ids.size()
        else:
            input_shape = inputs_embeds.size()[:-1]
        seq_length = input_shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, cache_length : seq_length + cache_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros(input_shape, dtype=torch.long, device=self.position_ids.device)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        token_type_embeddings = self.token_type_embeddings(
            torch.maximum(token_type_ids, torch.tensor(0, dtype=torch.long))
        )
        token_type_embeddings[token_type_ids == -1] = 0
        embeddings = inputs_embeds + token_type_embeddings
        # position_embedding_type == "absolute" (bert-base-uncased's)
        position_embeddings = self.position_embeddings(position_ids)
        position_embeddings = position_embeddings.repeat(token_type_ids.shape[0], 1, 1)
        position_embeddings[token_type_ids == -1] = 0
        embeddings += position_embeddings
        embeddings = self.LayerNorm(embeddings)
        embeddings = self.dropout(embeddings)
        return embeddings


class SeedBertImageModel(BertModel):
    """The seed's `BertImageModel`: the projected image features appended after the (padded) text, token type -1,
    one more attention-mask column of 1s; then `BertModel.forward` on `inputs_embeds`."""

    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config, add_pooling_layer)
        self.embeddings = SeedBertImageEmbeddings(config)
        self.img_projection = torch.nn.Linear(config.img_feature_dim, self.config.hidden_size, bias=True)

    def forward(self, input_ids, img_feats=None, attention_mask=None, token_type_ids=None):
        device = input_ids.device
        inputs_embeds = self.embeddings.word_embeddings(input_ids)
        if img_feats is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(inputs_embeds.size()[:-1], dtype=torch.long, device=device)
            minus_ones = -torch.ones(
                (token_type_ids.shape[0], img_feats.shape[1]), dtype=token_type_ids.dtype, device=device
            )
            token_type_ids = torch.cat((token_type_ids, minus_ones), dim=1)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, device=device)
            attention_mask = torch.cat(
                (attention_mask, torch.ones(attention_mask.shape[0], 1, dtype=torch.long, device=device)), dim=1
            )
            proj_img_feats = self.img_projection(img_feats)
            inputs_embeds = torch.cat((inputs_embeds, proj_img_feats), dim=1)
        return super().forward(
            input_ids=None, attention_mask=attention_mask, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds
        )


class SeedBertImageForMaskedLM(nn.Module):
    """The seed's `BertImageForMaskedLM`: `BertImageModel` (no pooler) + `BertOnlyMLMHead`, logits sliced to the
    text. As transformers 4.x's `init_weights` did, the decoder weight is the word embeddings and the decoder bias is
    `cls.predictions.bias` (one tensor saved under both names)."""

    def __init__(self, config):
        super().__init__()
        config.img_feature_dim = CLIP_EMBED_DIM
        self.config = config
        self.bert = SeedBertImageModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def forward(self, input_ids=None, img_feats=None, attention_mask=None, token_type_ids=None):
        outputs = self.bert(
            input_ids, img_feats=img_feats, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        prediction_scores = self.cls(outputs[0])
        return prediction_scores[:, : input_ids.shape[1], :].contiguous()


# --------------------------------------------------------------------------- fixtures
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
TEXTS = ["the sky is [MASK].", "Q: What is the color of the inside of a kiwi? A: It is [MASK].", "[MASK] grass."]


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, Path, SeedBertImageForMaskedLM]:
    """A tiny random seed model saved as DeepSpeed does (`{"module": state_dict, ...}`) and its BERT config dir."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, **TINY)
    model = SeedBertImageForMaskedLM(config).eval()
    with torch.no_grad():  # random values everywhere (LayerNorms and biases too), so nothing passes by accident
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    run = root / "clip-bert"
    run.mkdir()
    state = {"module": model.state_dict(), "global_steps": 1000, "skipped_steps": 0, "dp_world_size": 4}
    torch.save(state, run / "mp_rank_00_model_states.pt")
    config_dir = root / "bert-config"
    config.save_pretrained(config_dir)
    return run / "mp_rank_00_model_states.pt", config_dir, model


def _seed_mask_logits(model, tokenizer, texts, img_feats=None) -> torch.Tensor:
    """The seed notebooks' call: `tokenizer(questions, padding=True)`, `model(**inputs)` (with `img_feats` (N,1,512)
    for the explicit variant), logits at each row's [MASK]."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(
            input_ids=enc["input_ids"],
            img_feats=img_feats,
            attention_mask=enc["attention_mask"],
            token_type_ids=enc["token_type_ids"],
        )
    pos = (enc["input_ids"] == tokenizer.mask_token_id).long().argmax(1)
    return logits[torch.arange(len(texts)), pos]


# --------------------------------------------------------------------------- tests
def test_released_clip_bert_logits_equal_the_seeds_model(released, caplog) -> None:
    path, config_dir, seed_model = released
    assert "bert.img_projection.weight" in seed_model.state_dict()
    assert "cls.predictions.decoder.bias" in seed_model.state_dict()  # the tied duplicate the loader drops
    with caplog.at_level(logging.INFO):
        sc = build_scorer(f"clip_bert:{path}@{config_dir}")
    assert isinstance(sc, ReleasedClipBertScorer) and sc.accepts_image and sc.name == "clip-bert"
    assert "tied duplicate" in caplog.text
    enc, _ = encode_masked(sc.tokenizer, TEXTS)
    assert (enc["attention_mask"] == 0).any()  # padded rows: the image token goes after the pads
    ref = _seed_mask_logits(seed_model, sc.tokenizer, TEXTS)
    torch.testing.assert_close(sc.mask_logits(TEXTS), ref, atol=1e-4, rtol=1e-4)
    image = torch.randn(len(TEXTS), CLIP_EMBED_DIM, generator=torch.Generator().manual_seed(3))
    ref_img = _seed_mask_logits(seed_model, sc.tokenizer, TEXTS, img_feats=image[:, None])
    got_img = sc.mask_logits(TEXTS, image)
    torch.testing.assert_close(got_img, ref_img, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got_img, ref, atol=1e-3)  # the image matters


def test_bert_baseline_file_loads_the_same_and_takes_no_image(released) -> None:
    path, config_dir, seed_model = released
    sc = build_scorer(f"bert:{path}@{config_dir}", name="bert-clip-bert-train")
    assert isinstance(sc, ReleasedClipBertScorer) and not sc.accepts_image and sc.name == "bert-clip-bert-train"
    torch.testing.assert_close(
        sc.mask_logits(TEXTS), _seed_mask_logits(seed_model, sc.tokenizer, TEXTS), atol=1e-4, rtol=1e-4
    )
    with pytest.raises(ConfigError, match="no image"):
        sc.mask_logits(TEXTS[:1], torch.zeros(1, CLIP_EMBED_DIM))


def test_default_sizes_are_bert_base_and_bad_specs_are_one_line_errors(released, tmp_path) -> None:
    path, config_dir, _ = released
    # without a config dir the model is bert-base-uncased's size: the tiny file does not fit, named as such
    with pytest.raises(ConfigError, match="shape mismatch"):
        build_scorer(f"clip_bert:{path}")
    with pytest.raises(ConfigError, match="not a state-dict file"):
        build_scorer(f"clip_bert:{tmp_path / 'missing.pt'}")
    with pytest.raises(ConfigError, match="no config.json"):
        build_scorer(f"clip_bert:{path}@{tmp_path}")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(
        json.dumps({**json.loads((config_dir / "config.json").read_text()), "hidden_act": "relu"})
    )
    with pytest.raises(ConfigError, match=r"config\.json: hidden_act='relu'"):
        build_scorer(f"clip_bert:{path}@{odd}")
