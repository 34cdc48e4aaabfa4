"""Multi30k (MM-BERT): the readers on the real samples (skipped when absent) and on fixtures written in the same
format; bad input named by file and line; region selection; whole-word masking; the embedded corpus's German."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import real_sample
from vl.data.features import FrcnnJsonRegionReader, write_region_json
from vl.data.formats.multi30k import (
    MLT_KEYS,
    frcnn_location,
    read_annotations,
    read_mlt_vocab,
    read_parallel,
    read_raw_gz,
    select_regions,
)
from vl.data.multi30k import Multi30kDataModule
from vl.data.multi30k_collate import whole_word_mask
from vl.data.scenes import SceneSettings, SceneShape
from vl.data.scenes.writers.multi30k import NOUNS, caption_pair, german_np
from vl.errors import ConfigError, DataError

SPLIT_COUNTS = {"train": 29000, "val": 1014, "test_2016_flickr": 1000, "test_2018_flickr": 1071}


# ------------------------------------------------------------------------------------------------ real samples
def test_real_parallel_files_are_line_aligned() -> None:
    root = real_sample("multi30k", "flickr30k")
    val = read_parallel(root, "val")
    assert len(val) == SPLIT_COUNTS["val"]
    assert val[0]["image"].endswith(".jpg") and val[0]["caption_de"]
    train = read_parallel(root, "train")
    assert len(train) == 200  # the sample holds the first 200 of 29000 lines
    assert train[0] == {
        "caption_en": "Two young, White males are outside near many bushes.",
        "caption_de": "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
        "image": "1000092795.jpg",
    }


def test_real_annotation_jsonl_matches_the_text_files() -> None:
    root = real_sample("multi30k", "flickr30k")
    records = read_annotations(root / "val_frcnn.json")
    parallel = read_parallel(root, "val")
    assert len(records) == len(parallel)
    for rec, par in zip(records, parallel):
        assert rec["caption_en"] == par["caption_en"] and rec["caption_de"] == par["caption_de"]
        directory, image_id = frcnn_location(rec["frcnn"])
        assert directory == "val_frcnn" and len(image_id) >= 8  # the image id, zero-padded to 8 digits
        assert int(image_id) == int(par["image"][: -len(".jpg")])
        assert rec["image"] == f"val_image.zip@/{par['image']}"


def test_real_mlt_records_and_vocabulary() -> None:
    root = real_sample("multi30k", "flickr30k")
    vocab = read_mlt_vocab(root / "utils" / "MLT_vocab.txt")
    assert len(vocab) == 1536  # = MLT_words in the seed's config (wc -l says 1535: no final newline)
    records = read_annotations(root / "val_MLT_frcnn.json", MLT_KEYS)
    assert len(records) == 1062
    assert all(r["word_de"] in set(vocab) for r in records)
    assert records[0]["word_en"] == "truck" and records[0]["word_de"] == "lastwagen"


# ------------------------------------------------------------------------------------------------ fixtures
def write_fixture(root: Path, split: str = "val", n: int = 3, regions: int = 12) -> Path:
    """A Multi30k split in the real layout: {split}.en/.de, utils/{split}.txt, {split}_frcnn.json (zip@ paths) and
    per-image FRCNN JSON (base64 float32 boxes / features / classes)."""
    rng = np.random.default_rng(0)
    (root / "utils").mkdir(parents=True, exist_ok=True)
    ids = [str(1000092795 + i) for i in range(n)]
    en = [f"A dog number {i} runs." for i in range(n)]
    de = [f"Ein Hund Nummer {i} rennt." for i in range(n)]
    (root / f"{split}.en").write_text("".join(f"{t}\n" for t in en), encoding="utf-8")
    (root / f"{split}.de").write_text("".join(f"{t}\n" for t in de), encoding="utf-8")
    (root / "utils" / f"{split}.txt").write_text("".join(f"{i}.jpg\n" for i in ids))
    with open(root / f"{split}_frcnn.json", "w", encoding="utf-8") as f:
        for i, e, d in zip(ids, en, de):
            rec = {"image": f"{split}_image.zip@/{i}.jpg", "caption_en": e, "caption_de": d}
            f.write(json.dumps({**rec, "frcnn": f"{split}_frcnn.zip@/{i}.json"}) + "\n")
    records = []
    for i in ids:
        xy = rng.uniform(0, 200, (regions, 2))
        records.append(
            {
                "image_id": i,
                "image_w": 500,
                "image_h": 375,
                "boxes": np.concatenate([xy, xy + 50], 1).astype(np.float32),
                "features": rng.standard_normal((regions, 16)).astype(np.float32),
                "cls_prob": rng.dirichlet(np.ones(9), regions).astype(np.float32),
            }
        )
    write_region_json(root / f"{split}_frcnn", records, classes_key="classes")
    return root


def test_fixture_round_trip_and_region_reader(tmp_path) -> None:
    root = write_fixture(tmp_path)
    records = read_annotations(root / "val_frcnn.json")
    directory, image_id = frcnn_location(records[1]["frcnn"])
    reader = FrcnnJsonRegionReader(root / directory)
    item = reader[image_id]
    assert item["features"].shape == (12, 16) and item["cls_prob"].shape == (12, 9)
    picked = select_regions(item, max_regions=5)
    conf = item["cls_prob"].max(1)
    np.testing.assert_array_equal(picked["cls_prob"].max(1), np.sort(conf)[::-1][:5])  # by max confidence, desc
    order = np.argsort(-conf, kind="stable")[:5]
    np.testing.assert_array_equal(picked["features"], item["features"][order])
    np.testing.assert_array_equal(picked["boxes"], item["boxes"][order])
    assert picked["num_boxes"] == 5


def test_misaligned_line_counts_name_the_files(tmp_path) -> None:
    root = write_fixture(tmp_path)
    (root / "val.de").write_text("nur eine Zeile\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"val files are not line-aligned \(val.en: 3, val.de: 1, utils/val.txt: 3"):
        read_parallel(root, "val")


def test_json_line_without_a_key_names_file_and_line(tmp_path) -> None:
    root = write_fixture(tmp_path)
    lines = (root / "val_frcnn.json").read_text().splitlines()
    bad = json.loads(lines[1])
    del bad["caption_de"]
    lines[1] = json.dumps(bad)
    (root / "val_frcnn.json").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"val_frcnn.json:2: missing field 'caption_de'"):
        read_annotations(root / "val_frcnn.json")


def test_missing_image_features_name_file_and_line(tmp_path) -> None:
    root = write_fixture(tmp_path)
    for split in ("train", "test_2016_flickr"):
        write_fixture(root, split)
    (root / "val_frcnn" / "1000092797.json").unlink()
    dm = Multi30kDataModule(root=str(root), tokenizer="corpus", task="pretrain", pretrain_tasks=["A"])
    with pytest.raises(DataError, match=r"val_frcnn.json:3: image 'val_image.zip@/1000092797.jpg' has no Faster R-CNN"):
        dm.records("val")


def test_raw_gz_files(tmp_path) -> None:
    path = tmp_path / "task1" / "raw" / "val.de.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("Ein Hund läuft.\nZwei Männer.\n")
    assert read_raw_gz(path) == ["Ein Hund läuft.", "Zwei Männer."]
    (tmp_path / "broken.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="broken.gz: not a readable gzip"):
        read_raw_gz(tmp_path / "broken.gz")


# ------------------------------------------------------------------------------------------------ masking
def test_whole_word_masking_never_splits_a_word() -> None:
    rng = np.random.default_rng(0)
    n_words, total = 400, 0
    keys = [None] + [(0, w) for w in range(n_words) for _ in range(1 + w % 3)] + [None]
    ids = list(range(10, 10 + len(keys)))
    chosen_words = 0
    for _ in range(20):
        masked, labels = whole_word_mask(ids, keys, rng=rng, mask_token_id=3, vocab_size=100)
        by_word: dict = {}
        for pos, key in enumerate(keys):
            if key is None:
                assert labels[pos] == -100 and masked[pos] == ids[pos]
                continue
            by_word.setdefault(key, []).append(labels[pos] != -100)
        for flags in by_word.values():
            assert all(flags) or not any(flags)  # all sub-tokens of a word, or none
            chosen_words += all(flags)
        total += n_words
    assert 0.12 < chosen_words / total < 0.18  # 15 % of words


# ------------------------------------------------------------------------------------------------ German
def _shape(shape: str, colour: str, size: str, position: str = "left") -> SceneShape:
    return SceneShape(shape, colour, size, (0, 0, 10, 10), position)


def test_german_articles_and_adjective_endings() -> None:
    assert german_np(_shape("circle", "red", "large"), "indef_nom") == "ein großer roter Kreis"
    assert german_np(_shape("square", "blue", "small"), "indef_nom") == "ein kleines blaues Quadrat"
    assert german_np(_shape("triangle", "white", "large"), "indef_dat") == "einem großen weißen Dreieck"
    assert german_np(_shape("star", "green", "small"), "def_nom") == "der kleine grüne Stern"
    assert german_np(_shape("square", "purple", "large"), "def_nom") == "das große lila Quadrat"
    en, de = caption_pair([_shape("star", "orange", "small"), _shape("circle", "black", "large", "right")], "picture")
    assert en == "A picture with a small orange star and a large black circle."
    assert de == "Ein Bild mit einem kleinen orangefarbenen Stern und einem großen schwarzen Kreis."


def test_image_dependent_sentences_need_the_image_for_their_article() -> None:
    """ "The red one ..." names no shape: the German article (der Kreis / der Stern, das Quadrat / das Dreieck) comes
    from the shape of the image's only red object, so two scenes with the same English get different German."""
    scenes = {
        "circle": [_shape("circle", "red", "large"), _shape("square", "blue", "small", "right")],
        "triangle": [_shape("triangle", "red", "small"), _shape("star", "blue", "large", "right")],
    }
    pairs = {name: caption_pair(shapes, "one") for name, shapes in scenes.items()}
    assert pairs["circle"] == ("The red one is on the left.", "Der rote ist links.")
    assert pairs["triangle"] == ("The red one is on the left.", "Das rote ist links.")
    for shape, (_, gender) in NOUNS.items():  # every shape's article follows its noun's gender
        de = caption_pair([_shape(shape, "green", "small", "middle")], "one")[1]
        assert de == ("Der" if gender == "m" else "Das") + " grüne ist in der Mitte."
    with pytest.raises(ValueError, match="no other shape"):
        caption_pair([_shape("circle", "red", "large"), _shape("star", "red", "small")], "one")


def test_embedded_corpus_in_the_real_format(data_dir) -> None:
    dm = Multi30kDataModule(cache_dir=str(data_dir), corpus={"num_images": 150}, objectives=["mlm", "mvrc"])
    dm.prepare_data()
    root = dm.root
    for split in ("train", "val", "test_2016_flickr"):
        rows = read_parallel(root, split)
        records = read_annotations(root / f"{split}_frcnn.json")
        assert [r["caption_de"] for r in records] == [r["caption_de"] for r in rows]
        read_annotations(root / f"{split}_MLT_frcnn.json", MLT_KEYS)
    assert "[STOP]" in dm.tokenizer.get_vocab()
    assert dm.tokenizer.tokenize("Ein großes Quadrat [STOP]")[-1] == "[STOP]"
    info = dm.info
    assert info["visual_dim"] == SceneSettings().region_dim and info["num_region_classes"] == 33
    dm.setup("fit")
    batch = dm.collator("train")([dm.datasets["train"][(0, i)] for i in range(8)])
    assert (batch["token_type_ids"] == 0).all()  # EN and DE share token type 0
    tokens = dm.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2  # [CLS] EN [SEP] DE [SEP] (Task A)
    # image-dependent "one" sentences are marked; test2018 lists every accepted MLT word
    marked = [r for r in read_annotations(root / "test_2016_flickr_frcnn.json") if r.get("image_dependent")]
    assert marked and all(" one is " in r["caption_en"] for r in marked)
    mlt2018 = read_annotations(root / "test_2018_flickr_MLT_frcnn.json", MLT_KEYS)
    assert len(mlt2018) == len(read_parallel(root, "test_2018_flickr")) == len(read_parallel(root, "test_2016_flickr"))
    assert any(r["word_de"] == "Quadrat Viereck" for r in mlt2018)


def test_mlt_test2018_counts_any_listed_word(tmp_path, data_dir) -> None:
    """test2018 (``data.splits.test=test_2018_flickr``): a ``word_de`` listing several words is correct when the
    prediction is any of them (the seed's evaluate2018), the most-frequent-word baseline likewise; a record none of
    whose words is in MLT_vocab.txt is refused naming file and line."""
    from vl.batch import EncoderOutput
    from vl.heads.mm_bert import MultimodalLexicalTranslation

    dm = Multi30kDataModule(
        cache_dir=str(data_dir), corpus={"num_images": 150}, task="mlt", objectives=["mlt"],
        splits={"test": "test_2018_flickr"},
    )  # fmt: skip
    dm.setup("test")
    words = dm.mlt_words
    rows = dm.datasets["test"].rows
    records = dm.records("test")[1]
    for r, rec in zip(rows, records):
        listed = rec["word_de"].split(" ")
        assert words[r["mlt_label"]] == listed[0]
        assert [words[i] for i in r["mlt_options"] if i >= 0] == [w for w in listed if w in words]
    multi = [i for i, rec in enumerate(records) if " " in rec["word_de"]]
    assert multi
    batch = dm.collator("test")([dm.datasets["test"][(0, i)] for i in multi[:4]])
    head = MultimodalLexicalTranslation(hidden_size=4, num_words=len(words))
    with torch.no_grad():
        head.classifier.weight.zero_()
        head.classifier.bias.zero_()
        head.classifier.bias[words.index("Viereck")] = 1.0  # predicts "Viereck" (never a label) for every row
    n = len(batch["index"])
    out = head(EncoderOutput(text=torch.zeros(n, 1, 4), visual=None, pooled=torch.zeros(n, 4)), batch)
    hits = (out.logits.argmax(-1) == out.target).tolist()
    assert hits == ["Viereck" in records[i]["word_de"].split(" ") for i in multi[:4]]
    assert any(hits) and "Viereck" not in {words[label] for label in batch["mlt_labels"].tolist()}
    train = [r["word_de"] for r in dm.records("train")[1]]
    from collections import Counter

    top = Counter(train).most_common(1)[0][0]
    want = sum(top in rec["word_de"].split(" ") for rec in records) / len(records)
    assert dm.baselines("test")["test/mlt_acc_most_frequent"] == pytest.approx(want)
    bad = tmp_path / "bad_MLT.json"
    bad.write_text("\n".join(json.dumps({**rec, "word_de": "Gurke Tomate"}) for rec in records[:2]) + "\n")
    dm.mlt_annotations = str(bad)
    with pytest.raises(DataError, match=r"bad_MLT.json:1: word_de 'Gurke Tomate' is not in"):
        dm.build_dataset("test")


def test_mlt_head_size_is_the_seeds_mlt_words(tmp_path, data_dir) -> None:
    """The MLT head has ``mlt_outputs`` outputs (the seed's ``MLT_words`` 1536) whatever the vocabulary's size; None =
    the vocabulary's words (counted here from the file); fewer outputs than words is refused naming the option."""
    from vl.errors import ConfigError

    def module(**kwargs):
        return Multi30kDataModule(
            cache_dir=str(data_dir), corpus={"num_images": 150}, task="mlt", objectives=["mlt"], **kwargs
        )

    dm = module()
    assert dm.info["num_mlt_words"] == 1536
    lines = dm.path(dm.mlt_vocab_file).read_text(encoding="utf-8").splitlines()
    n_words = len([line for line in lines if line.strip()])
    assert module(mlt_outputs=None).info["num_mlt_words"] == n_words
    assert module(mlt_outputs=n_words + 3).info["num_mlt_words"] == n_words + 3
    with pytest.raises(ConfigError, match="data.mlt_outputs"):
        module(mlt_outputs=n_words - 1).info  # noqa: B018
    with pytest.raises(ConfigError, match="data.mlt_outputs"):
        module(mlt_outputs=0)


# ------------------------------------------------------------------------------------------------ tokenisation
def seed_tokenize(text: str, vocab: set[str], lowercase: bool) -> list[str]:
    """The seed's pytorch_pretrained_bert BertTokenizer.tokenize, transcribed for plain text: whitespace split, lower
    case and accents (NFD, Mn dropped) when ``do_lower_case``, punctuation split, greedy longest-match WordPiece."""
    import unicodedata

    words = []
    for token in text.split():
        if lowercase and token not in ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"):
            token = "".join(c for c in unicodedata.normalize("NFD", token.lower()) if unicodedata.category(c) != "Mn")
        piece = ""
        for c in token:
            if unicodedata.category(c).startswith("P"):
                words += [piece, c] if piece else [c]
                piece = ""
            else:
                piece += c
        words += [piece] if piece else []
    return [piece for word in words for piece in seed_wordpiece_pieces(word, vocab)]


def seed_wordpiece_pieces(word: str, vocab: set[str] | dict[str, int]) -> list[str]:
    """The seed's WordpieceTokenizer on one word: greedy longest match, ``##`` continuations, [UNK] for a word it
    cannot split."""
    start, pieces = 0, []
    while start < len(word):
        end = len(word)
        while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in vocab:
            end -= 1
        if end == start:
            return ["[UNK]"]
        pieces.append(word[start:end] if start == 0 else "##" + word[start:end])
        start = end
    return pieces


@pytest.mark.parametrize("lowercase", [True, False])
def test_tokenizer_lowercases_and_strips_accents_as_the_seed(tmp_path, lowercase) -> None:
    """`data.lowercase` (default True): the seed's BertTokenizer.from_pretrained(<M-BERT dir>) lower-cases and strips
    accents (pytorch_pretrained_bert's do_lower_case=True default), even over a cased vocabulary whose tokenizer config
    says do_lower_case false (M-BERT cased's); checked against a transcription of the seed's tokenizer and by hand."""
    from vl.data.multi30k_text import load_multi30k_tokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Zwei", "zwei", "M", "m", "##ä", "##a", "##nner", "Mann"]
    vocab += ["grün", "grun", "##e", "weiße", "weisse", "Hund", "hund", ".", "gr", "##un", "##ün", "##ü", "##n"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}), encoding="utf-8")
    tok = load_multi30k_tokenizer(str(tmp_path), lowercase=lowercase)
    text = "Zwei grüne Männer. weiße Hund"
    got = tok.tokenize(text)
    assert got == seed_tokenize(text, set(vocab), lowercase)
    if lowercase:
        assert got == ["zwei", "grun", "##e", "m", "##a", "##nner", ".", "weiße", "hund"]  # ß is no accent: kept
    else:
        assert got == ["Zwei", "grün", "##e", "M", "##ä", "##nner", ".", "weiße", "Hund"]
    # the special tokens, [STOP] included, are never lower-cased or split
    assert tok.tokenize("[MASK] [STOP]") == ["[MASK]", "[STOP]"]


def test_data_lowercase_reaches_every_task_s_tokenisation(data_dir) -> None:
    """The data module's tokenizer (the embedded corpus's cased vocabulary) follows `data.lowercase`: the MT targets
    and the collated rows are the lower-cased text's ids."""
    kwargs = {"cache_dir": str(data_dir), "corpus": {"num_images": 150}, "task": "mt", "objectives": ["mlm"]}
    lower, cased = Multi30kDataModule(**kwargs), Multi30kDataModule(**kwargs, lowercase=False)
    assert lower.lowercase is True  # the seed's default
    import unicodedata

    def seed_normalise(text: str) -> str:  # the seed's BasicTokenizer: lower(), then NFD without the Mn characters
        return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")

    lower.setup("fit")
    records = lower.records("train")[1]
    english = Counter(r["caption_en"] for r in records)  # a caption of its own (image-dependent ones repeat)
    record = next(r for r in records if any(c in r["caption_de"] for c in "äöüÄÖÜ") and english[r["caption_en"]] == 1)
    tok = lower.tokenizer
    german = record["caption_de"]
    assert german != seed_normalise(german)  # capitals and umlauts
    want = cased.tokenizer(seed_normalise(german), add_special_tokens=False)["input_ids"]
    first = [r for r in lower.datasets["train"].rows if r["text"] == record["caption_en"]]
    assert [r["mt_label"] for r in first[: len(want)]] == want
    batch = lower.collator("train")([{"text": record["caption_en"], "text_b_ids": [tok.mask_token_id], "index": 0}])
    source = cased.tokenizer(seed_normalise(record["caption_en"]), add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, 1 : 1 + len(source)].tolist() == source


# ------------------------------------------------------------------------------------------------ MT
def test_seed_bleu_equals_sacrebleu_with_the_seeds_normalisation() -> None:
    import sacrebleu
    from unidecode import unidecode

    from vl.data.multi30k_text import seed_bleu

    hyps = ["Ein großer roter Kreis ist links.", "Zwei Männer gehen über die Straße.", "Ein Hund."]
    refs = ["Ein großer roter Kreis ist links.", "Zwei Männer laufen über die Straße.", "Eine Katze schläft."]
    want = sacrebleu.corpus_bleu(
        ["Ein grosser roter Kreis ist links.", "Zwei Männer gehen über die Strasse.", "Ein Hund."],
        [["Ein grosser roter Kreis ist links.", "Zwei Manner laufen uber die Strasse.", "Eine Katze schlaft."]],
    ).score
    assert unidecode("ß") == "ss"
    assert seed_bleu(hyps, refs) == pytest.approx(want)
    assert seed_bleu(refs, refs) < 100.0  # umlauts in the hypotheses no longer match the unidecoded references
    assert sacrebleu.corpus_bleu(refs, [refs]).score == pytest.approx(100.0)


def test_mt_rows_expand_every_german_prefix(data_dir) -> None:
    dm = Multi30kDataModule(cache_dir=str(data_dir), corpus={"num_images": 150}, task="mt", objectives=["mlm"])
    dm.setup("fit")
    rows = dm.datasets["train"].rows
    records = dm.records("train")[1]
    tok = dm.tokenizer
    target = tok(records[0]["caption_de"], add_special_tokens=False)["input_ids"]
    first = [r for r in rows if r["text"] == records[0]["caption_en"]][: len(target) + 1]
    stop = tok.convert_tokens_to_ids("[STOP]")
    assert [r["mt_label"] for r in first] == [*target, stop]  # every prefix, plus the [STOP] entry
    for pos, r in enumerate(first):
        assert r["text_b_ids"] == [*target[:pos], tok.mask_token_id]
    batch = dm.collator("train")([dm.datasets["train"][(0, i)] for i in range(3)])
    labelled = (batch["mlm_labels"] != -100).sum(1)
    assert labelled.tolist() == [1, 1, 1]  # only the [MASK]
    pos = batch["attention_mask"].sum(1) - 2
    assert (batch["input_ids"][torch.arange(3), pos] == tok.mask_token_id).all()


def test_translation_truncates_once_and_keeps_its_mask(data_dir) -> None:
    """The seed's generation truncates a row once (SEQ_LEN 150) and then appends the generated tokens: every step
    reads the [MASK] it appended, keeps the first step's boxes and source tokens, whatever the training seq_len (64),
    which cut the [MASK] itself once the text passed half of it. A stand-in model records each step's batch and
    always predicts one German word (never [STOP]), so the text grows to 40 generated tokens."""
    from types import SimpleNamespace

    from vl.models.translation import greedy_translate

    dm = Multi30kDataModule(
        cache_dir=str(data_dir), corpus={"num_images": 150}, task="mt", objectives=["mlm"], seq_len=64, max_regions=40
    )
    dm.setup("test")
    tok, collator = dm.tokenizer, dm.collator("test")
    examples = [dm.datasets["test"][i] for i in range(3)]
    examples = [ex | {"text": " ".join([ex["text"]] * 3)} for ex in examples]  # long sources (~30 tokens)
    word = tok.convert_tokens_to_ids(tok.tokenize("hund")[0])
    seen: list[dict] = []

    class Recorder(torch.nn.Module):
        device = torch.device("cpu")

        def __init__(self) -> None:
            super().__init__()
            vocab = len(tok)
            self.objectives = {
                "mlm": SimpleNamespace(logits=lambda s: torch.nn.functional.one_hot(s[:, 0].long(), vocab).float())
            }

        def forward(self, batch):
            seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
            return SimpleNamespace(text=torch.full((*batch["input_ids"].shape, 1), float(word)))

    out = greedy_translate(Recorder(), collator, examples, tok, max_steps=40, seq_len=150)
    assert len(out) == 3 and collator.seq_len == 64  # the training limit is restored
    first = seen[0]
    n_source = [int((first["input_ids"][j] == tok.sep_token_id).nonzero()[0]) for j in range(3)]
    for step, batch in enumerate(seen):
        length = batch["attention_mask"].sum(1)
        assert (batch["input_ids"][torch.arange(3), length - 2] == tok.mask_token_id).all(), step
        assert (length == first["attention_mask"].sum(1) + step).all(), step  # nothing cut
        for j in range(3):
            assert torch.equal(batch["input_ids"][j, : n_source[j] + 1], first["input_ids"][j, : n_source[j] + 1])
        assert torch.equal(batch["visual_mask"].sum(1), first["visual_mask"].sum(1)), step
    assert int(seen[-1]["attention_mask"].sum(1).max()) > 64  # past the training limit


def test_translation_runs_as_many_steps_as_the_seeds_loop(data_dir) -> None:
    """The seed's generation: ``curr_len = 0; max_len = 48; while not all(stop) and curr_len <= max_len: ...;
    curr_len += 1``, one token a step; a stand-in model that never predicts [STOP] gets that many tokens, with the
    data module's default `mt_max_steps` and with the system's call."""
    from types import SimpleNamespace

    from vl.models.translation import greedy_translate

    seed_steps, curr_len, max_len = 0, 0, 48
    while curr_len <= max_len:  # transcription of the seed's loop (no sentence stops)
        seed_steps += 1
        curr_len += 1
    dm = Multi30kDataModule(cache_dir=str(data_dir), corpus={"num_images": 150}, task="mt", objectives=["mlm"])
    dm.setup("test")
    assert dm.mt_max_steps == seed_steps == 49
    tok = dm.tokenizer
    word = tok.convert_tokens_to_ids(tok.tokenize("hund")[0])
    calls = []

    class Never(torch.nn.Module):
        device = torch.device("cpu")
        objectives = {
            "mlm": SimpleNamespace(logits=lambda s: torch.nn.functional.one_hot(s[:, 0].long(), len(tok)).float())
        }

        def forward(self, batch):
            calls.append(1)
            return SimpleNamespace(text=torch.full((*batch["input_ids"].shape, 1), float(word)))

    example = dm.datasets["test"][0]
    out = greedy_translate(Never(), dm.collator("test"), [example], tok)  # the function's default
    assert len(calls) == seed_steps and len(tok(out[0], add_special_tokens=False)["input_ids"]) == seed_steps


def test_the_embedded_vocabulary_is_the_same_in_every_process(tmp_path) -> None:
    """`train_tokenizer` gives one vocabulary whatever the process's hash seed (HF's WordPiece trainer broke merge
    ties by hash-map order: every fresh corpus got other token ids); every training word is then spelled by its
    pieces without [UNK]; the vocabulary stops at `vocab_size`."""
    import os
    import subprocess
    import sys

    from transformers import BertTokenizerFast

    from vl.data.scenes.writers.multi30k import train_tokenizer

    shapes = [
        SceneShape("circle", "red", "small", (2, 3, 9, 9), "left"),
        SceneShape("star", "blue", "large", (9, 1, 20, 9), "right"),
    ]
    texts = [text for template in ("list", "picture", "left_of") for text in caption_pair(shapes, template)]
    texts += ["Ein grüner Stern über dem blauen Dreieck.", "Zwei große Quadrate, ein Kreis: rechts!"] * 3
    script = (
        "import sys; from pathlib import Path; from vl.data.scenes.writers.multi30k import train_tokenizer; "
        "print(train_tokenizer(Path(sys.argv[1]), sys.argv[2:]).read_text(), end='')"
    )
    vocabularies = set()
    for seed in ("1", "2", "3"):
        run = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / seed), *texts],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        vocabularies.add(run.stdout)
    assert len(vocabularies) == 1
    path = train_tokenizer(tmp_path / "here", texts)
    assert path.read_text() == vocabularies.pop()
    tok = BertTokenizerFast.from_pretrained(str(path.parent), do_lower_case=False, strip_accents=False)
    for text in texts:
        for word in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text):
            pieces = tok.tokenize(word[0])
            assert "[UNK]" not in pieces and "".join(p.removeprefix("##") for p in pieces) == word[0]
    small = train_tokenizer(tmp_path / "small", texts, vocab_size=80).read_text().split()
    assert len(small) == 80 and small[:6] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[STOP]"]


def _seed_parallel_text(tok, en: str, de: str, seq_len: int) -> list[int]:
    """The seed's `pretrain/data/datasets/parallel_text.py` (Task C) without MLM, transcribed: `[CLS] EN [SEP] DE
    [SEP]` word pieces as ids, and over `seq_len` its first `seq_len - 1` ids + its last."""
    tokens = ["[CLS]", *tok.tokenize(en), "[SEP]", *tok.tokenize(de), "[SEP]"]
    text = tok.convert_tokens_to_ids(tokens)
    if len(text) > seq_len:
        keep = max(seq_len, 2)
        text = text[: keep - 1] + [text[-1]]
    return text


@pytest.mark.parametrize("mlm", [False, True])
def test_text_only_pairs_are_cut_as_the_seeds_parallel_text(mlm: bool) -> None:
    """Task C rows (`[CLS] EN [SEP] DE [SEP]`, no image) over `seq_len` keep their first seq_len - 1 tokens and the
    last [SEP], as the seed (the tokenizer's longest-first cut EN and DE each and kept the middle [SEP]); with MLM the
    labels are cut with the row: each label is the original id at its position, and the last [SEP] has none."""
    from vl.data.collate import load_tokenizer
    from vl.data.multi30k_collate import IGNORE_INDEX, Multi30kCollator

    tok = load_tokenizer("minilm")
    rng = np.random.default_rng(4)
    words = "a man in a red shirt is riding a bicycle down the busy street near the old market square".split()
    rows = [(" ".join(rng.choice(words, size=int(rng.integers(3, 40)))), " ".join(rng.choice(words, size=int(rng.integers(3, 40))))) for _ in range(24)]  # fmt: skip
    collator = Multi30kCollator(tok, max_text_len=32, seq_len=32, mlm=mlm)
    batch = collator([{"text": en, "text_b": de, "index": i} for i, (en, de) in enumerate(rows)])
    cut = 0
    for i, (en, de) in enumerate(rows):
        want = _seed_parallel_text(tok, en, de, 32)
        n = int(batch["attention_mask"][i].sum())
        got = batch["input_ids"][i, :n].tolist()
        assert n == len(want)
        if not mlm:
            assert got == want
        else:
            labels = batch["mlm_labels"][i, :n].tolist()
            for pos, (g, w, lab) in enumerate(zip(got, want, labels, strict=True)):
                assert lab in (IGNORE_INDEX, w) and (lab != IGNORE_INDEX or g == w), pos
            assert labels[-1] == IGNORE_INDEX and got[-1] == tok.sep_token_id
        cut += len(tok.tokenize(en)) + len(tok.tokenize(de)) + 3 > 32
    assert cut >= 5


IGNORE = -100  # vl's ignore index (the seed's -1)


def _seed_mt_row(tok, en: str, prefix: list[int], label: int, seq_len: int, n_boxes: int | None):
    """The seed's MT datasets (`MT/data/datasets/multi30k.py`, `multi30k_no_vision.py`), transcribed for one training
    row: `caption_tokens_de` the German prefix with its last token replaced by [MASK] (labelled with that token),
    `text = [CLS] EN [SEP] DE [SEP]`, `mlm_labels` -1 elsewhere; then with an image (`n_boxes` boxes, the whole-image
    box included) `while text + boxes > seq_len: drop a box if boxes > text else a token`, at least 2 tokens / 1 box;
    without one `while text > seq_len: drop a token`; text and labels kept as `x[:keep - 1] + [x[-1]]`. Returns
    (text ids, labels, boxes kept)."""
    caption_tokens_en = tok.tokenize(en)
    caption_tokens_de = [*tok.convert_ids_to_tokens(prefix), tok.convert_ids_to_tokens(label)]
    mlm_labels_de = [-1] * (len(caption_tokens_de) - 1) + [label]
    caption_tokens_de[-1] = "[MASK]"
    text_tokens = ["[CLS]", *caption_tokens_en, "[SEP]", *caption_tokens_de, "[SEP]"]
    mlm_labels = [-1] + [-1] * len(caption_tokens_en) + [-1] + mlm_labels_de + [-1]
    text = tok.convert_tokens_to_ids(text_tokens)
    boxes = n_boxes
    if n_boxes is not None and len(text) + n_boxes > seq_len:
        text_len_keep, box_len_keep = len(text), n_boxes
        while (text_len_keep + box_len_keep) > seq_len and text_len_keep > 0 and box_len_keep > 0:
            if box_len_keep > text_len_keep:
                box_len_keep -= 1
            else:
                text_len_keep -= 1
        text_len_keep, boxes = max(text_len_keep, 2), max(box_len_keep, 1)
        text = text[: text_len_keep - 1] + [text[-1]]
        mlm_labels = mlm_labels[: text_len_keep - 1] + [mlm_labels[-1]]
    elif n_boxes is None and len(text) > seq_len:
        text_len_keep = len(text)
        while text_len_keep > seq_len and text_len_keep > 0:
            text_len_keep -= 1
        text_len_keep = max(text_len_keep, 2)
        text = text[: text_len_keep - 1] + [text[-1]]
        mlm_labels = mlm_labels[: text_len_keep - 1] + [mlm_labels[-1]]
    return text, [IGNORE if v == -1 else v for v in mlm_labels], boxes


@pytest.mark.parametrize("vision", [False, True])
def test_long_mt_rows_are_cut_as_the_seeds_mt_datasets(vision: bool) -> None:
    """MT prefix rows of 20 - 90 tokens, with images of 0 - 60 regions or none (the no-vision variant): input ids,
    labels and kept regions equal the seed's MT datasets' cut, transcribed (`_seed_mt_row`): over seq_len the row's
    first tokens and its last [SEP] stay, so the [MASK] and its label go; `mt_truncation="source"` (vl's earlier)
    instead keeps every row's [MASK] and label, shortening the EN source."""
    from vl.data.collate import load_tokenizer
    from vl.data.multi30k_collate import Multi30kCollator

    tok = load_tokenizer("minilm")
    rng = np.random.default_rng(7)
    words = "a man in a red shirt is riding a bicycle down the busy street near the old market square".split()
    de_ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    examples, seed_rows = [], []
    for i in range(40):
        en = " ".join(rng.choice(words, size=int(rng.integers(3, 60))))
        pos = int(rng.integers(0, 30))
        prefix = [int(rng.choice(de_ids)) for _ in range(pos)]
        label = int(rng.choice(de_ids))
        ex = {"text": en, "text_b_ids": [*prefix, tok.mask_token_id], "mt_label": label, "index": i}
        n_boxes = None
        if vision:
            r = int(rng.integers(0, 61))
            ex["visual"] = {"features": rng.standard_normal((r, 3)).astype(np.float32),
                            "boxes_norm": np.zeros((r, 4), np.float32), "image_w": 500, "image_h": 375}  # fmt: skip
            n_boxes = r + 1
        examples.append(ex)
        seed_rows.append(_seed_mt_row(tok, en, prefix, label, 64, n_boxes))
    batch = Multi30kCollator(tok, max_text_len=64, max_regions=60, seq_len=64)(examples)  # default: seed
    lost = 0
    for i, (text, labels, boxes) in enumerate(seed_rows):
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == text, i
        assert batch["mlm_labels"][i, :n].tolist() == labels, i
        if vision:
            assert int(batch["visual_mask"][i].sum()) == boxes - 1, i
        lost += all(v == IGNORE for v in labels)
    assert lost >= 3  # rows whose [MASK] the cut took
    source = Multi30kCollator(tok, max_text_len=64, max_regions=60, seq_len=None, mt_truncation="source")(examples)
    for i, ex in enumerate(examples):
        n = int(source["attention_mask"][i].sum())
        assert n <= 64 and source["input_ids"][i, n - 2] == tok.mask_token_id
        assert source["mlm_labels"][i, n - 2] == ex["mt_label"]
    with pytest.raises(ConfigError, match="data.mt_truncation"):
        Multi30kCollator(tok, mt_truncation="end")


def test_decoding_keeps_the_mask_of_a_long_source_whatever_mt_truncation(data_dir) -> None:
    """Greedy decoding shortens a source over max_text_len (the [MASK] stays at length - 2 every step) even with the
    seed's training cut (`mt_truncation="seed"`, restored afterwards)."""
    from types import SimpleNamespace

    from vl.models.translation import greedy_translate

    dm = Multi30kDataModule(cache_dir=str(data_dir), corpus={"num_images": 150}, task="mt", objectives=["mlm"])
    dm.setup("test")
    tok, collator = dm.tokenizer, dm.collator("test")
    assert collator.mt_truncation == "seed"
    examples = [dm.datasets["test"][i] for i in range(2)]
    examples = [ex | {"text": " ".join([ex["text"]] * 12)} for ex in examples]  # sources over 64 tokens
    word = tok.convert_tokens_to_ids(tok.tokenize("hund")[0])
    seen: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):
        device = torch.device("cpu")
        objectives = {
            "mlm": SimpleNamespace(logits=lambda s: torch.nn.functional.one_hot(s[:, 0].long(), len(tok)).float())
        }

        def forward(self, batch):
            length = batch["attention_mask"].sum(1)
            seen.append(batch["input_ids"][torch.arange(len(length)), length - 2])
            return SimpleNamespace(text=torch.full((*batch["input_ids"].shape, 1), float(word)))

    greedy_translate(Recorder(), collator, examples, tok, max_steps=3, seq_len=150)
    assert len(seen) == 3 and all((s == tok.mask_token_id).all() for s in seen)
    assert collator.mt_truncation == "seed"
