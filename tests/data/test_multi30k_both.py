"""MM-BERT retrieval with `languages: both` (`data.both_layout`): the joint rows `[CLS] EN [SEP] DE [SEP]` (the seed's
`LANGUAGES_USED: both`) against an independent transcription of the seed's `retrieval/data/datasets/multi30k.py`
text construction and `seq_len` truncation, on the embedded corpus; negatives take both captions of one other line;
`per_language` keeps vl's earlier rows; a bad value is refused."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from vl.data.formats.multi30k import frcnn_location
from vl.data.multi30k import Multi30kDataModule
from vl.data.samplers import global_seed
from vl.errors import ConfigError
from vl.models.ranking import gallery_scorer

N_IMAGES = 150


def seed_text_ids(tok: Any, en: str, de: str, n_boxes: int, seq_len: int) -> list[int]:
    """The seed's `__getitem__` for `languages_used` other than first / second, transcribed: EN and DE tokenised
    separately, `['[CLS]'] + en + ['[SEP]'] + de + ['[SEP]']`, then its seq_len loop over text and boxes (the
    whole-image box counted in `n_boxes`), keeping the first `kept - 1` tokens and the last."""
    text = tok.convert_tokens_to_ids(["[CLS]", *tok.tokenize(en), "[SEP]", *tok.tokenize(de), "[SEP]"])
    if len(text) + n_boxes > seq_len:
        text_keep, box_keep = len(text), n_boxes
        while text_keep + box_keep > seq_len and text_keep > 0 and box_keep > 0:
            if box_keep > text_keep:
                box_keep -= 1
            else:
                text_keep -= 1
        text_keep = max(text_keep, 2)
        text = text[: text_keep - 1] + [text[-1]]
    return text


def n_boxes(dm: Multi30kDataModule, record: dict[str, Any]) -> int:
    """The seed's box count for a record's image: its detections (at most `max_regions`) + the whole-image box, read
    from the per-image FRCNN JSON itself."""
    directory, image_id = frcnn_location(str(record["frcnn"]))
    with open(dm.root / directory / f"{image_id}.json", encoding="utf-8") as f:
        return min(int(json.load(f)["num_boxes"]), dm.max_regions) + 1


def row_ids(batch: dict[str, Any], i: int) -> list[int]:
    return batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()


@pytest.fixture(scope="module", params=[64, 24, 9])
def joint(request, data_dir) -> Multi30kDataModule:
    """The default layout at the seed's seq_len 64 (the corpus's rows fit: <= 50 tokens + <= 7 boxes) and at 24 / 9,
    where the seed's loop cuts text, then text and boxes."""
    dm = Multi30kDataModule(
        cache_dir=str(data_dir),
        corpus={"num_images": N_IMAGES},
        task="retrieval",
        objectives=["itm_bce"],
        seq_len=request.param,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_default_is_the_joint_layout_and_a_bad_value_is_refused(data_dir) -> None:
    kwargs = {"cache_dir": str(data_dir), "corpus": {"num_images": N_IMAGES}, "task": "retrieval"}
    assert Multi30kDataModule(**kwargs).joint and Multi30kDataModule(**kwargs).both_layout == "joint"
    assert not Multi30kDataModule(**kwargs, languages="en").joint
    with pytest.raises(ConfigError, match=r"data\.both_layout: 'mixed'"):
        Multi30kDataModule(**kwargs, both_layout="mixed")


def test_joint_train_rows_are_the_seeds_token_ids(joint) -> None:
    """Every training example (epoch 0 and 1) collated: its text ids equal the seed's construction for its captions
    and its own image's boxes; positives carry their own line's EN and DE, negatives both captions of ONE other
    line."""
    _, records, _ = joint.records("train")
    pairs = {(r["caption_en"], r["caption_de"]): j for j, r in enumerate(records)}
    data, collate, tok = joint.datasets["train"], joint.collator("train"), joint.tokenizer
    assert len(data) == len(records)  # one row per annotation line, not one per language
    negatives = 0
    for epoch in (0, 1):
        for start in range(0, len(data), 32):
            examples = [data[(epoch, i)] for i in range(start, min(len(data), start + 32))]
            batch = collate(examples)
            assert (batch["token_type_ids"] == 0).all()  # EN and DE share token type 0 (the seed's text_token_type_ids)
            for b, ex in enumerate(examples):
                i = ex["index"]
                pair = (ex["text"], ex["text_b"])
                assert pair in pairs  # EN and DE of one line, never mixed across lines
                if ex["itm_label"] == 1:
                    assert pairs[pair] == i or pair == (records[i]["caption_en"], records[i]["caption_de"])
                else:
                    negatives += 1
                    assert pair != (records[i]["caption_en"], records[i]["caption_de"])
                want = seed_text_ids(tok, *pair, n_boxes(joint, records[i]), joint.seq_len)
                assert row_ids(batch, b) == want, (epoch, i)
    assert 0.35 < negatives / (2 * len(data)) < 0.65


def test_joint_eval_queries_are_the_seeds_token_ids(joint) -> None:
    """Val queries: one per line, the joint row; every (query, image) pair the gallery scorer forms carries the
    seed's ids for that caption pair with that image's boxes (the seed's test: every caption line x every image)."""
    _, records, _ = joint.records("val")
    g = joint.gallery("val")
    assert g["gold"] == list(range(len(records)))
    queries = joint.datasets["val"]
    assert len(queries) == len(records)
    q0 = queries[0]
    assert (q0["text"], q0["text_b"]) == (records[0]["caption_en"], records[0]["caption_de"])
    joint.collator("val")([queries[i] for i in range(4)])  # the val loader's batches collate

    seen: list[dict[str, Any]] = []

    class Recorder:
        device = torch.device("cpu")

        def pair_scorer(self) -> Any:
            return lambda pooled: pooled[:, 0]

        def __call__(self, batch: dict[str, Any]) -> Any:
            seen.append(batch)
            return SimpleNamespace(pooled=torch.zeros(len(batch["input_ids"]), 1))

    texts, images = list(range(len(records))), [0, 1, 7, len(records) - 1]
    score = gallery_scorer(Recorder(), joint.scoring_collator(), g["texts"], g["visuals"], batch_size=64)
    score(texts, images)
    batch = {k: torch.cat([b[k] for b in seen]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert (batch["token_type_ids"] == 0).all()
    for p in range(len(texts) * len(images)):
        t, i = texts[p // len(images)], images[p % len(images)]
        want = seed_text_ids(
            joint.tokenizer,
            records[t]["caption_en"],
            records[t]["caption_de"],
            n_boxes(joint, records[i]),
            joint.seq_len,
        )
        assert row_ids(batch, p) == want, (t, i)
    assert joint.gallery("test") is joint.gallery("test", language="both")
    # evaluate.py's shortlist encodes the joint queries alone too: [CLS] EN [SEP] DE [SEP] (2 [SEP]) per row
    from vl.eval.retrieval import pooled_similarity

    seen.clear()
    pooled_similarity(Recorder(), joint.scoring_collator(), g["texts"], g["visuals"], 64)([0, 1, 2])
    sep = joint.tokenizer.sep_token_id
    if joint.seq_len == 64:  # no row is cut at 64 (at 24 / 9 the first [SEP] may go)
        assert (seen[-1]["input_ids"] == sep).sum(1).tolist() == [2, 2, 2]


def test_per_language_keeps_the_earlier_rows(data_dir) -> None:
    """`both_layout: per_language`: an EN row then a DE row per line (vl's earlier layout), negatives a random other
    caption of the same language drawn as before, val/test queries the `eval_language` captions."""
    dm = Multi30kDataModule(
        cache_dir=str(data_dir),
        corpus={"num_images": N_IMAGES},
        task="retrieval",
        objectives=["itm_bce"],
        both_layout="per_language",
        eval_language="de",
    )
    dm.setup("fit")
    assert not dm.joint
    _, records, _ = dm.records("train")
    want = [(r[f"caption_{lang}"], lang) for lang in ("en", "de") for r in records]
    rows = dm.datasets["train"].rows
    assert [(r["text"], r["language"]) for r in rows] == want and not any("text_b" in r for r in rows)
    pool = {lang: [j for j, (_, lg) in enumerate(want) if lg == lang] for lang in ("en", "de")}
    for i in range(len(rows)):
        ex = dm.datasets["train"][(1, i)]
        text, lang = want[i]
        rng = np.random.default_rng([global_seed(), 1, i])  # the earlier draw, transcribed
        label = 1
        if rng.random() < 0.5:
            for _ in range(16):
                other = want[pool[lang][int(rng.integers(len(pool[lang])))]][0]
                if other != text:
                    text, label = other, 0
                    break
        assert (ex["text"], ex["itm_label"], "text_b" in ex) == (text, label, False)
    _, val, _ = dm.records("val")
    assert dm.gallery("val")["texts"] == [r["caption_de"] for r in val]
    assert dm.datasets["val"][3]["text"] == val[3]["caption_de"] and "text_b" not in dm.datasets["val"][3]
