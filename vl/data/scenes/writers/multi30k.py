"""The embedded scene corpus as a Multi30k corpus (the layout of ``vl.data.formats.multi30k``), with German captions.

Each scene gets one English caption and its German translation, both generated from the scene (so both are true of
the image) by a small EN -> DE lexicon and grammar: genders (der Kreis, der Stern, das Quadrat, das Dreieck), the
indefinite nominative (ein großer roter Kreis / ein großes rotes Quadrat), the indefinite dative after "mit" / "von"
(einem großen roten Kreis), the definite nominative (der große rote Kreis / das große rote Quadrat); "lila" does not
inflect.

Image-dependent sentences (the "one" template, for scenes with a shape of a colour no other shape has): "The red one
is on the left." -> "Der rote ist links." / "Das rote ist links.": the English does not say which shape is red, the
German article does (der Kreis / der Stern, das Quadrat / das Dreieck), so only the image tells the translator which
article to write, as in real Multi30k ("a player" -> "ein Spieler" / "eine Spielerin"). Their annotation records carry
``"image_dependent": true`` (an extra key; real Multi30k has none), which the MT evaluation reports as a subset BLEU.

``test_2018_flickr``: the test scenes again with another caption draw and MLT ``word_de`` listing every accepted
German word separated by spaces, as the seed's test2018 (square -> "Quadrat Viereck": both count); its records
point at the test scenes' image and region files (``test_2016_flickr_frcnn/``), written once.

Written under ``<corpus root>/multi30k/`` (``ensure_multi30k``; its own ``manifest.json`` written last)::

    flickr30k/{train,val,test_2016_flickr,test_2018_flickr}.{en,de}        captions, line-aligned with
    flickr30k/utils/{split}.txt                                            image names <id>.jpg
    flickr30k/{split}_frcnn.json                                           annotation JSONL (zip@ paths)
    flickr30k/{split}_MLT_frcnn.json, utils/MLT_vocab.txt                  MLT word pairs (a colour / shape word)
    flickr30k/{split}_frcnn/<id 8 digits>.json                             per-image FRCNN JSON (base64, "classes")
    flickr30k/train_frcnn_5captions_both.json                              the seed's `multi30k_5x` training file
    task2/tok/train.lc.norm.tok.{1..5}.{en,de}                             its sources: five caption pairs an image
    wmt/{split}.jsonl (file splits)                                       text-only EN-DE pairs {"caption_en","caption_de"}
    aux/{train,val,test_2016_flickr}.txt                                   aux text corpus: the scenes' English captions
    tokenizer/vocab.txt                                                    WordPiece trained on the train EN+DE text
                                                                           (HF tokenizers; cased, accents kept, [STOP])

Five captions an image (``write_five_captions``), as the seed's `multi30k_5x` reads them: the upstream Multi30k task 2
files ``task2/tok/train.lc.norm.tok.{i}.{en,de}`` (i = 1..5; lower-cased, tokenised, one caption a line in
``utils/train.txt`` order; in real task 2 the English and German captions of an image are independent descriptions,
not translations: here caption i's English and German sentences are drawn from separate templates), and the JSONL the
seed's ``data/flickr30k/utils/5captions_gen_both_train_image_json.py`` writes from them,
``train_frcnn_5captions_both.json``: caption set 1 for every image, then set 2, ... (the image list repeated five
times), with the image's ``zip@`` image and FRCNN paths (the id zero-padded to 8).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.data.features import write_region_json
from vl.data.formats.jsonl import write_dir_once, write_jsonl
from vl.data.scenes.generator import SceneSettings, SceneShape, generate_scenes, region_features, where_phrase

log = logging.getLogger(__name__)

__all__ = [
    "FIVE_CAPTIONS_FILE",
    "MULTI30K_VERSION",
    "SPLIT_FILES",
    "caption_pair",
    "ensure_multi30k",
    "write_five_captions",
    "write_multi30k_corpus",
]

MULTI30K_VERSION = "multi30k-v6"  # v6: + the five-caption training files (multi30k_5x); v5: a deterministic vocabulary
FIVE_CAPTIONS_FILE = "train_frcnn_5captions_both.json"  # the seed's name (retrieval/data/datasets/multi30k_5x.py)
SPLIT_FILES = {"train": "train", "val": "val", "test": "test_2016_flickr", "test2018": "test_2018_flickr"}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[STOP]"]

#: German noun and gender of each shape
NOUNS = {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"), "star": ("Stern", "m")}
#: German adjective stem of each colour / size (None ending: does not inflect)
ADJECTIVES = {
    "red": "rot",
    "green": "grün",
    "blue": "blau",
    "yellow": "gelb",
    "white": "weiß",
    "black": "schwarz",
    "purple": "lila",
    "orange": "orangefarben",
    "small": "klein",
    "large": "groß",
}
UNINFLECTED = {"lila"}
WHERE_DE = {"left": "links", "middle": "in der Mitte", "right": "rechts"}
#: further accepted German words of a shape noun (test2018's multi-option MLT words)
SYNONYMS = {"square": ["Viereck"]}


def _adj(word: str, ending: str) -> str:
    stem = ADJECTIVES[word]
    return stem if stem in UNINFLECTED else stem + ending


def german_np(p: SceneShape, case: str, *, size: bool = True) -> str:
    """The German noun phrase of a shape: ``case`` "indef_nom" (ein großer roter Kreis / ein großes rotes Quadrat),
    "indef_dat" (einem großen roten Kreis), "def_nom" (der große rote Kreis / das große rote Quadrat)."""
    noun, gender = NOUNS[p.shape]
    if case == "indef_nom":
        article, ending = "ein", "er" if gender == "m" else "es"
    elif case == "indef_dat":
        article, ending = "einem", "en"
    elif case == "def_nom":
        article, ending = ("der" if gender == "m" else "das"), "e"
    else:
        raise ValueError(f"unknown case {case!r}")
    words = [article] + ([_adj(p.size, ending)] if size else []) + [_adj(p.colour, ending), noun]
    return " ".join(words)


def english_np(p: SceneShape, *, definite: bool = False, size: bool = True) -> str:
    words = ([p.size] if size else []) + [p.colour, p.shape]
    article = "the" if definite else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([article, *words])


def _join(phrases: Sequence[str], conj: str) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + f" {conj} " + phrases[-1]


def unique_colour_shape(shapes: Sequence[SceneShape]) -> SceneShape | None:
    """The first shape whose colour no other shape of the scene has (the referent of "the <colour> one")."""
    colours = [p.colour for p in shapes]
    return next((p for p in shapes if colours.count(p.colour) == 1), None)


def caption_pair(shapes: Sequence[SceneShape], template: str) -> tuple[str, str]:
    """(English, German) caption of a scene by ``template``: "list", "picture", "left_of" (>= 2 shapes), "where",
    "one" (a shape of a unique colour: "The red one is on the left." -> "Der rote ist links.", the German article
    given by the shape only the image shows)."""
    if template == "list":
        en = _join([english_np(p) for p in shapes], "and")
        de = _join([german_np(p, "indef_nom") for p in shapes], "und")
    elif template == "picture":
        en = "a picture with " + _join([english_np(p) for p in shapes], "and")
        de = "ein Bild mit " + _join([german_np(p, "indef_dat") for p in shapes], "und")
    elif template == "left_of":
        a, b = shapes[0], shapes[-1]
        en = f"{english_np(a, size=False)} is to the left of {english_np(b, size=False)}"
        de = f"{german_np(a, 'indef_nom', size=False)} ist links von {german_np(b, 'indef_dat', size=False)}"
    elif template == "where":
        p = shapes[0]
        en = f"{english_np(p, definite=True)} is {where_phrase(p.position)}"
        de = f"{german_np(p, 'def_nom')} ist {WHERE_DE[p.position]}"
    elif template == "one":
        p = unique_colour_shape(shapes)
        if p is None:
            raise ValueError("template 'one' needs a shape of a colour no other shape has")
        article = "der" if NOUNS[p.shape][1] == "m" else "das"
        en = f"the {p.colour} one is {where_phrase(p.position)}"
        de = f"{article} {_adj(p.colour, 'e')} ist {WHERE_DE[p.position]}"
    else:
        raise ValueError(f"unknown template {template!r}")
    en, de = en[0].upper() + en[1:] + ".", de[0].upper() + de[1:] + "."
    return en, de


def _templates(shapes: Sequence[SceneShape]) -> list[str]:
    """The caption templates a scene draws from (uniformly): about a quarter of the scenes with a uniquely coloured
    shape get an image-dependent "one" sentence."""
    options = ["list", "list", "picture"] + (["left_of"] if len(shapes) >= 2 else ["where"])
    return options + (["one"] if unique_colour_shape(shapes) is not None else [])


def _mlt_pair(
    shapes: Sequence[SceneShape], de_caption: str, template: str, rng: np.random.Generator
) -> tuple[str, list[str]]:
    """An (English word, its accepted German words, the first being its form in ``de_caption``) pair: a colour or
    shape word of the first shape (of the uniquely coloured one for "one" sentences, which name no shape)."""
    p = unique_colour_shape(shapes) if template == "one" else shapes[0]
    if template != "one" and rng.random() < 0.5:
        return p.shape, [NOUNS[p.shape][0], *SYNONYMS.get(p.shape, [])]
    stem = ADJECTIVES[p.colour]
    form = next(w.strip(".,") for w in de_caption.split() if w.strip(".,").lower().startswith(stem))
    return p.colour, [form]


def write_multi30k_corpus(out: str | Path, settings: SceneSettings) -> Path:
    """Write the Multi30k files of the scenes of ``settings`` into ``out`` (see the module docstring)."""
    out = Path(out)
    root = out / "flickr30k"
    (root / "utils").mkdir(parents=True, exist_ok=True)
    (out / "wmt").mkdir(parents=True, exist_ok=True)
    scenes = generate_scenes(settings)
    mlt_words: dict[str, None] = {}
    train_text: list[str] = []
    for split, file_split in SPLIT_FILES.items():
        scene_split = "test" if split == "test2018" else split  # test2018: the test scenes, another caption draw,
        image_split = SPLIT_FILES[scene_split]  # their images and region files (written once, with test2016)
        subset = [sc for sc in scenes if sc.split == scene_split]
        en_lines, de_lines, images, records, mlt, wmt, regions = [], [], [], [], [], [], []
        for sc in subset:
            rng = np.random.default_rng([settings.seed, 11 if split != "test2018" else 12, sc.image_id])
            options = _templates(sc.shapes)
            template = options[int(rng.integers(len(options)))]
            en, de = caption_pair(sc.shapes, template)
            en_lines.append(en)
            de_lines.append(de)
            images.append(f"{sc.image_id}.jpg")
            record = {
                "image": f"{image_split}_image.zip@/{sc.image_id}.jpg",
                "caption_en": en,
                "caption_de": de,
                "frcnn": f"{image_split}_frcnn.zip@/{sc.image_id:08d}.json",  # zero-padded to 8, as the seed's
            }
            if template == "one":
                record["image_dependent"] = True
            records.append(record)
            word_en, words_de = _mlt_pair(sc.shapes, de, template, rng)
            if split != "test2018":  # one word (the caption's), as test2016; test2018 lists every accepted word
                words_de = words_de[:1]
            if split == "train":  # the vocabulary: train words and their accepted alternatives
                mlt_words.update(dict.fromkeys([*words_de, *SYNONYMS.get(word_en, [])]))
            mlt.append({**record, "word_en": word_en, "word_de": " ".join(words_de)})
            other = [t for t in ("picture", "list") if t != options[0]]  # a second, text-only pair of the scene
            wen, wde = caption_pair(sc.shapes, other[0])
            wmt.append({"caption_en": wen, "caption_de": wde})
            if image_split == file_split:
                rec = region_features(sc, settings)
                rec.pop("labels")
                regions.append({**rec, "image_id": f"{sc.image_id:08d}"})
            if split == "train":
                train_text += [en, de, wen, wde]
        (root / f"{file_split}.en").write_text("".join(f"{t}\n" for t in en_lines), encoding="utf-8")
        (root / f"{file_split}.de").write_text("".join(f"{t}\n" for t in de_lines), encoding="utf-8")
        (root / "utils" / f"{file_split}.txt").write_text("".join(f"{t}\n" for t in images), encoding="utf-8")
        write_jsonl(root / f"{file_split}_frcnn.json", records)
        write_jsonl(root / f"{file_split}_MLT_frcnn.json", mlt)
        write_jsonl(out / "wmt" / f"{file_split}.jsonl", wmt)
        if image_split == file_split:
            write_region_json(root / f"{file_split}_frcnn", regions, classes_key="classes")
    (out / "aux").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):  # the aux text corpus: English lines (train: joint with the image data)
        lines = [c for sc in scenes if sc.split == split for c in sc.captions]
        (out / "aux" / f"{SPLIT_FILES[split]}.txt").write_text("".join(f"{c}\n" for c in lines), encoding="utf-8")
    aux = [c for sc in scenes if sc.split == "train" for c in sc.captions]
    write_five_captions(out, [sc for sc in scenes if sc.split == "train"], settings.seed)
    (root / "utils" / "MLT_vocab.txt").write_text("".join(f"{w}\n" for w in mlt_words), encoding="utf-8")
    train_tokenizer(out / "tokenizer", train_text + aux)
    return out


def lc_norm_tok(text: str) -> str:
    """A caption as the upstream task 2 ``*.lc.norm.tok`` files hold it: lower-cased, words and punctuation split by
    single spaces ("A red circle." -> "a red circle .")."""
    from tokenizers.pre_tokenizers import BertPreTokenizer

    return " ".join(w for w, _ in BertPreTokenizer().pre_tokenize_str(text.lower()))


def write_five_captions(out: Path, scenes: Sequence[Any], seed: int) -> Path:
    """The task 2 caption files of the training ``scenes`` (in their ``utils/train.txt`` order) and the seed's
    five-caption JSONL built from them (see the module docstring); returns the JSONL's path. Caption set i of a scene:
    an English and a German sentence, each of a template drawn from (seed, 13 | 14, image id, i), so the training
    file's own captions (stream 11) are not reused."""
    tok = out / "task2" / "tok"
    tok.mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[list[str]]] = {"en": [], "de": []}
    for i in range(1, 6):
        en_lines, de_lines = [], []
        for sc in scenes:
            options = _templates(sc.shapes)
            draw_en = np.random.default_rng([seed, 13, sc.image_id, i])
            draw_de = np.random.default_rng([seed, 14, sc.image_id, i])
            en_lines.append(lc_norm_tok(caption_pair(sc.shapes, options[int(draw_en.integers(len(options)))])[0]))
            de_lines.append(lc_norm_tok(caption_pair(sc.shapes, options[int(draw_de.integers(len(options)))])[1]))
        for lang, lines in (("en", en_lines), ("de", de_lines)):
            sets[lang].append(lines)
            (tok / f"train.lc.norm.tok.{i}.{lang}").write_text("".join(f"{t}\n" for t in lines), encoding="utf-8")
    records = [
        {
            "image": f"train_image.zip@/{sc.image_id}.jpg",
            "caption_en": sets["en"][i][k],
            "caption_de": sets["de"][i][k],
            "frcnn": f"train_frcnn.zip@/{sc.image_id:08d}.json",
        }
        for i in range(5)
        for k, sc in enumerate(scenes)
    ]
    path = out / "flickr30k" / FIVE_CAPTIONS_FILE
    write_jsonl(path, records)
    return path


def train_tokenizer(out_dir: Path, texts: Sequence[str], vocab_size: int = 400, min_frequency: int = 1) -> Path:
    """A cased WordPiece vocabulary (accents kept, as M-BERT's) trained on ``texts``, [STOP] included:
    ``out_dir/vocab.txt``. Words as BERT's normaliser and pre-tokeniser split them (HF ``tokenizers``); then
    WordPiece-style BPE (word-initial characters, ``##`` continuations, the most frequent adjacent pair merged until
    ``vocab_size`` or no pair occurs ``min_frequency`` times), as HF's ``WordPieceTrainer`` does, but with ties broken
    by the pair itself: HF's trainer breaks them by hash-map order, so every fresh corpus got another vocabulary (and
    other token ids, losses and learning-test numbers; seen as 269 tokens, ~12 of them different, between two
    writes)."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    pre = BertPreTokenizer()
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    words = {w: [w[0], *(f"##{c}" for c in w[1:])] for w in sorted(counts)}
    alphabet = {c for w in words for c in w} | {s for symbols in words.values() for s in symbols}  # every character
    vocab = list(dict.fromkeys([*SPECIAL_TOKENS, *sorted(alphabet)]))  # also alone, as HF's trainer keeps them
    known = set(vocab)
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        (a, b), n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < min_frequency:
            break
        merged = a + b[2:]
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        for w, symbols in words.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[w] = out
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "vocab.txt"
    path.write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")
    return path


def ensure_multi30k(corpus_root: str | Path, settings: SceneSettings) -> Path:
    """``corpus_root/multi30k`` for the scene corpus at ``corpus_root`` (written once, into a temporary sibling then
    renamed; concurrent callers serialise on a lock file; reused while its manifest names this version)."""
    final = Path(corpus_root) / "multi30k"
    expected = {"version": MULTI30K_VERSION, "settings": settings.to_dict()}

    def write(tmp: Path) -> None:
        write_multi30k_corpus(tmp, settings)
        log.info("wrote the embedded Multi30k corpus %s", final)

    return write_dir_once(final, expected, write, stamp_file="manifest.json")
