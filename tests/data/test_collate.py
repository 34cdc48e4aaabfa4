"""The shared collator knows no task: a corpus declares its label keys, an undeclared key is an error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vl.data.collate import Collator, collate_labels, load_tokenizer


def _visual(n: int) -> dict[str, np.ndarray]:
    return {"features": np.ones((n, 4), np.float32), "boxes_norm": np.zeros((n, 4), np.float32)}


def test_declared_labels_are_collated_by_kind() -> None:
    labels = {
        "answer": ("answer_scores", "vector"),
        "qid": ("question_id", "long"),
        "per_region": ("region_targets", "regions"),
        "name": ("names", "str"),
    }
    collate = Collator(load_tokenizer("minilm"), labels=labels)
    examples = [
        {"text": "a red circle", "visual": _visual(2), "answer": np.array([0.0, 1.0]), "qid": 7, "per_region": [0.5]},
        {"text": "a square", "visual": _visual(3), "answer": np.array([1.0, 0.3]), "qid": 8, "per_region": [1, 0, 1]},
    ]
    for ex, name in zip(examples, ("x", "y")):
        ex["name"] = name
    batch = collate(examples)
    torch.testing.assert_close(batch["answer_scores"], torch.tensor([[0.0, 1.0], [1.0, 0.3]]))
    assert batch["question_id"].tolist() == [7, 8] and batch["names"] == ["x", "y"]
    # padded to the batch's regions (3), zeros beyond an example's own
    torch.testing.assert_close(batch["region_targets"], torch.tensor([[0.5, 0.0, 0.0], [1.0, 0.0, 1.0]]))


def test_undeclared_example_key_fails_naming_it() -> None:
    collate = Collator(load_tokenizer("minilm"))
    with pytest.raises(ValueError, match=r"\['vqa_target'\].*label_keys"):
        collate([{"text": "a", "vqa_target": np.zeros(3)}])


def test_unknown_label_kind_fails() -> None:
    with pytest.raises(ValueError, match="unknown kind 'matrix'"):
        collate_labels([{"x": 1}], {"x": ("x", "matrix")}, {})


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("with_pairs", [False, True])
def test_memoised_tokenisation_equals_the_tokenizers_padded_batch(fixed: bool, with_pairs: bool) -> None:
    """`Collator.encode` tokenises each distinct text once per process and pads itself; the batch must equal the
    tokenizer's own call with padding + truncation (repeated texts, texts past max_text_len, pairs truncated
    longest-first, fixed shapes), on the first call and on memo hits."""
    tok = load_tokenizer("minilm")
    rng = np.random.default_rng(0)
    words = "a red circle left of the small blue square what color is it how many shapes are there".split()
    pool = [" ".join(rng.choice(words, size=rng.integers(1, 30))) for _ in range(12)]
    collator = Collator(tok, max_text_len=16, fixed_shapes=fixed, mlm=True)
    for _ in range(3):  # the first batch fills the memo, later ones hit it (and mix hits with new texts)
        texts = [str(rng.choice(pool)) for _ in range(8)] + [" ".join(rng.choice(words, size=40))]
        pairs = [str(rng.choice(pool)) for _ in texts] if with_pairs else None
        got = collator.encode(texts, pairs)
        want = tok(
            texts,
            pairs,
            padding="max_length" if fixed else True,
            truncation=True,
            max_length=16,
            return_tensors="pt",
            return_special_tokens_mask=True,
            return_token_type_ids=True,
        )
        for key in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask"):
            assert torch.equal(got[key], want[key]), key
    assert len(collator._memo) < 3 * 9 and len(collator.__getstate__().get("_memo", {})) == 0


@pytest.mark.parametrize("fixed", [False, True])
def test_rows_with_their_own_text_length_equal_the_tokenizer_on_each_row_alone(fixed: bool) -> None:
    """Rows carrying `max_text_len` (VCR's Q->A rows at 60 next to QA->R rows at 80): each row's ids are the tokenizer's
    own call on that row alone at its length (truncated longest-first), right-padded to the batch's longest (the
    collator's length with fixed shapes), attention 0 on the padding; repeated rows hit the memo per length."""
    tok = load_tokenizer("minilm")
    rng = np.random.default_rng(1)
    words = "a red circle left of the small blue square what color is it how many shapes are there".split()
    collator = Collator(tok, max_text_len=20, fixed_shapes=fixed)
    for _ in range(3):
        examples = []
        for _ in range(10):
            example = {"text": " ".join(rng.choice(words, size=rng.integers(1, 25))), "text_b": "red square left"}
            if rng.random() < 0.6:
                example["max_text_len"] = int(rng.choice([6, 9, 20]))
            examples.append(example)
        batch = collator(examples)
        width = batch["input_ids"].shape[1]
        for i, ex in enumerate(examples):
            alone = tok(ex["text"], ex["text_b"], truncation=True, max_length=ex.get("max_text_len", 20))["input_ids"]
            n = len(alone)
            assert batch["input_ids"][i, :n].tolist() == alone
            assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
            assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert width == (
            20
            if fixed
            else max(
                len(tok(e["text"], e["text_b"], truncation=True, max_length=e.get("max_text_len", 20))["input_ids"])
                for e in examples
            )
        )


_VOCABS: dict[int, dict[str, int]] = {}


def _seed_reader_ids(tok, text: str, max_length: int) -> list[int]:
    """vilbert_beta's readers (VQA `tokenize`, RefCOCO+ and retrieval alike), transcribed: word pieces between
    [CLS] and [SEP], looked up in the vocab ([UNK] when absent), then cut to max_length; no padding here."""
    if id(tok) not in _VOCABS:  # a fast tokenizer's `vocab` builds the dict at every call
        _VOCABS[id(tok)] = tok.get_vocab()
    vocab = _VOCABS[id(tok)]
    tokens = ["[CLS]"] + tok.tokenize(text) + ["[SEP]"]
    ids = [vocab.get(w, vocab["[UNK]"]) for w in tokens]
    return ids[:max_length]


def _check_against_seed(tok, collator: Collator, texts: list[str], length: int) -> int:
    batch = collator([{"text": t} for t in texts])
    width = batch["input_ids"].shape[1]
    cut = 0
    for i, text in enumerate(texts):
        want = _seed_reader_ids(tok, text, length)
        n = len(want)
        assert batch["input_ids"][i, :n].tolist() == want, text
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert (batch["token_type_ids"][i] == 0).all() and (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        cut += len(tok.tokenize(text)) + 2 > length
    return cut


@pytest.mark.parametrize("fixed", [False, True])
def test_vilbert_truncation_is_the_seed_readers_cut(fixed: bool) -> None:
    """`truncation="seed"` (the default of the ViLBERT task corpora) equals vilbert_beta's readers on every length
    around the limit: a text of max_text_len - 1 word pieces or more loses its [SEP] (the tokenizer's truncation
    would cut a word piece and keep [SEP]); shorter texts are untouched. First call and memo hits alike."""
    tok = load_tokenizer("minilm")
    rng = np.random.default_rng(2)
    words = "a red circle left of the small blue square what colour is it unbelievably zigzagging".split()
    collator = Collator(tok, max_text_len=12, fixed_shapes=fixed, truncation="seed")
    cut = 0
    for _ in range(3):
        texts = [" ".join(rng.choice(words, size=rng.integers(6, 14))) for _ in range(16)]
        cut += _check_against_seed(tok, collator, texts, 12)
    assert cut >= 10  # the cut rows are the point
    # the tokenizer's truncation is the other option (and differs on those rows)
    plain = Collator(tok, max_text_len=12, truncation="tokenizer")([{"text": " ".join(["red"] * 20)}])
    assert plain["input_ids"][0, -1].item() == tok.sep_token_id


def test_vilbert_truncation_on_real_coco_captions() -> None:
    """The real COCO captions (the retrieval corpus's text) through the retrieval data module's collator equal the
    seed reader's ids at the retrieval length (30) and at 12, where many are cut."""
    import json

    from tests.conftest import real_sample
    from vl.data.retrieval import RetrievalDataModule

    path = real_sample("coco", "captions_val2014_first200images.json")
    captions = [a["caption"] for a in json.loads(path.read_text())["annotations"]]
    tok = load_tokenizer("minilm")
    for length, at_least in ((30, 1), (12, 200)):
        dm = RetrievalDataModule(max_text_len=length)
        collator = dm.collator("train")
        assert collator.truncation == "seed"
        cut = sum(
            _check_against_seed(tok, collator, captions[i : i + 128], length) for i in range(0, len(captions), 128)
        )
        assert cut >= at_least


def test_the_vilbert_task_corpora_cut_as_their_seed_readers_by_default() -> None:
    from vl.data.refcoco import RefCOCODataModule
    from vl.data.retrieval import RetrievalDataModule
    from vl.data.vqa import VQADataModule
    from vl.errors import ConfigError

    for cls in (VQADataModule, RefCOCODataModule, RetrievalDataModule):
        assert cls().text_truncation == "seed"
        assert cls(text_truncation="tokenizer").text_truncation == "tokenizer"
        with pytest.raises(ConfigError, match="data.text_truncation: 'cut'"):
            cls(text_truncation="cut")
    with pytest.raises(ConfigError, match="data.text_truncation"):
        Collator(load_tokenizer("minilm"), truncation="keep")
    tok = load_tokenizer("minilm")
    tok.padding_side = "left"
    with pytest.raises(ConfigError, match="right-padding tokenizer"):
        Collator(tok, truncation="seed").encode(["a red square"], None)


def test_a_batch_with_class_distributions_on_some_images_only_is_refused() -> None:
    """MRC / MVRC need every row's `cls_prob`; a batch mixing images with and without one would have the head skip
    it silently (the system skips a head whose inputs are missing)."""
    from vl.data.region_batch import pad_regions
    from vl.errors import DataError

    rng = np.random.default_rng(0)
    with_cls = {
        "features": rng.normal(size=(3, 4)),
        "boxes_norm": rng.uniform(size=(3, 4)),
        "cls_prob": np.ones((3, 2)),
    }
    without = {"features": rng.normal(size=(2, 4)), "boxes_norm": rng.uniform(size=(2, 4))}
    assert "region_cls_prob" in pad_regions([with_cls, with_cls], 4)
    assert "region_cls_prob" not in pad_regions([without, without], 4)
    with pytest.raises(DataError, match=r"1 of 3 images of a batch have no class distribution \(cls_prob\)"):
        pad_regions([with_cls, without, with_cls], 4)


def test_an_image_without_regions_is_an_all_padding_row() -> None:
    """Per-record readers give an image with no boxes (0, 0) features: it pads to a masked-out row (it crashed the
    collator with a broadcast error naming no file); its missing `cls_prob` does not count against the others'."""
    from vl.data.region_batch import pad_regions

    full = {"features": np.ones((3, 4), np.float32), "boxes_norm": np.ones((3, 4), np.float32)}
    full["cls_prob"] = np.full((3, 2), 0.5, np.float32)
    empty = {"features": np.zeros((0, 0), np.float32), "boxes_norm": np.zeros((0, 4), np.float32), "cls_prob": None}
    out = pad_regions([empty, full], 5)
    assert tuple(out["visual_feats"].shape) == (2, 3, 4) and out["visual_mask"].tolist() == [[0, 0, 0], [1, 1, 1]]
    assert out["visual_feats"][0].abs().sum() == 0 and torch.equal(out["visual_feats"][1], torch.ones(3, 4))
    assert out["region_cls_prob"][1].eq(0.5).all() and out["region_cls_prob"][0].eq(0).all()


def test_vilberts_global_token_of_an_image_without_regions_is_named() -> None:
    """The global image token is the mean of the image's regions: with none, the seed's reader divides by zero (NaN)."""
    from vl.data.region_rules import GlobalFeatureRegions
    from vl.errors import DataError

    items = {"7": {"features": np.zeros((0, 0), np.float32)}, "8": {"features": np.ones((2, 3), np.float32)}}

    class Reader(dict):
        path = "feats.lmdb"

    view = GlobalFeatureRegions(Reader(items))
    assert view["8"]["global_feature"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(DataError, match=r"feats\.lmdb: image id 7 has no regions \(num_boxes 0\)"):
        view["7"]


@pytest.mark.parametrize(
    "overrides",
    [
        ("experiment=vilbert_pretrain_tiny", "data.objectives=[mlm,itm,mrc]"),  # MLM + masked regions (ViLBERT's)
        ("experiment=none", "data=multi30k", "model=mm_bert_tiny"),  # whole-word MLM + MVRC (MM-BERT's collator)
    ],
)
def test_an_examples_masks_do_not_depend_on_its_batch(overrides, make_cfg) -> None:
    """Each row's MLM / region masks come from (run seed, epoch, index) and its own positions: the same example
    collated among other examples (another rank's share, another per-device batch, another padded width) gets the
    same masked ids, MLM labels and region choices; another epoch or run seed other ones."""
    from vl.build import build_datamodule

    dm = build_datamodule(make_cfg(*overrides, "data.num_workers=0"))
    dm.setup("fit")
    data, collate = dm.datasets["train"], dm.collator("train")
    examples = [data[(0, i)] for i in range(16)]

    def rows(batch: dict, position: int) -> dict[str, torch.Tensor]:
        n = int(batch["attention_mask"][position].sum())
        out = {"input_ids": batch["input_ids"][position, :n], "mlm_labels": batch["mlm_labels"][position, :n]}
        if "region_mask_labels" in batch:
            r = int(batch["visual_mask"][position].sum())
            out["regions"] = batch["region_mask_labels"][position, :r]
        return out

    one = collate(examples[:8])  # examples 0..7 (one process)
    other = collate(examples[::2])  # 0, 2, ..., 14 (rank 0 of two)
    assert int(one["mlm_labels"].ne(-100).sum()) > 0 and "regions" in rows(one, 0)
    for i in (0, 2, 4, 6):
        a, b = rows(one, i), rows(other, i // 2)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i
    later = collate([data[(1, i)] for i in range(8)])
    assert any(not torch.equal(rows(one, i)["mlm_labels"], rows(later, i)["mlm_labels"]) for i in range(8))
