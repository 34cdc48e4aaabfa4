"""The embedded scene corpus as a Multi30k corpus (the layout of ``vl.data.formats.multi30k``), with German captions.

Each scene gets one English caption and its German translation, both generated from the scene (so both are true of
the image) by a small EN -> DE lexicon and grammar: genders (der Kreis, der Stern, das Quadrat, das Dreieck), the
indefinite nominative (ein großer roter Kreis / ein großes rotes Quadrat), the indefinite dative after "mit" / "von"
(einem großen roten Kreis), the definite nominative (der große rote Kreis / das große rote Quadrat); "lila" does not
inflect. Written under ``<corpus root>/multi30k/`` (``ensure_multi30k``; its own ``manifest.json`` written last)::

    flickr30k/{train,val,test_2016_flickr}.{en,de}, utils/{split}.txt      captions, image names <id>.jpg
    flickr30k/{split}_frcnn.json                                           annotation JSONL (zip@ paths)
    flickr30k/{split}_MLT_frcnn.json, utils/MLT_vocab.txt                  MLT word pairs (a colour / shape word)
    flickr30k/{split}_frcnn/<id 8 digits>.json                             per-image FRCNN JSON (base64, "classes")
    wmt/{split}.jsonl (file splits)                                       text-only EN-DE pairs {"caption_en","caption_de"}
    aux/train.txt                                                          aux text corpus: the scenes' English captions
    tokenizer/vocab.txt                                                    WordPiece trained on the train EN+DE text
                                                                           (HF tokenizers; cased, accents kept, [STOP])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vl.data.features import write_region_json
from vl.data.formats.jsonl import write_dir_once, write_jsonl
from vl.data.scenes.generator import SceneSettings, SceneShape, generate_scenes, region_features

log = logging.getLogger(__name__)

__all__ = ["MULTI30K_VERSION", "SPLIT_FILES", "caption_pair", "ensure_multi30k", "write_multi30k_corpus"]

MULTI30K_VERSION = "multi30k-v3"
SPLIT_FILES = {"train": "train", "val": "val", "test": "test_2016_flickr"}
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


def caption_pair(shapes: Sequence[SceneShape], template: str) -> tuple[str, str]:
    """(English, German) caption of a scene by ``template``: "list", "picture", "left_of" (>= 2 shapes), "where"."""
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
        where_en = "in the middle" if p.position == "middle" else f"on the {p.position}"
        en = f"{english_np(p, definite=True)} is {where_en}"
        de = f"{german_np(p, 'def_nom')} ist {WHERE_DE[p.position]}"
    else:
        raise ValueError(f"unknown template {template!r}")
    en, de = en[0].upper() + en[1:] + ".", de[0].upper() + de[1:] + "."
    return en, de


def _templates(n_shapes: int) -> list[str]:
    return ["list", "list", "picture"] + (["left_of"] if n_shapes >= 2 else ["where"])


def _mlt_pair(shapes: Sequence[SceneShape], de_caption: str, rng: np.random.Generator) -> tuple[str, str]:
    """An (English word, its German form in ``de_caption``) pair: a colour or shape word of the first shape."""
    p = shapes[0]
    if rng.random() < 0.5:
        noun = NOUNS[p.shape][0]
        return p.shape, noun
    stem = ADJECTIVES[p.colour]
    form = next(w.strip(".,") for w in de_caption.split() if w.strip(".,").startswith(stem))
    return p.colour, form


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
        subset = [sc for sc in scenes if sc.split == split]
        en_lines, de_lines, images, records, mlt, wmt, regions = [], [], [], [], [], [], []
        for sc in subset:
            rng = np.random.default_rng([settings.seed, 11, sc.image_id])
            options = _templates(len(sc.shapes))
            en, de = caption_pair(sc.shapes, options[int(rng.integers(len(options)))])
            en_lines.append(en)
            de_lines.append(de)
            images.append(f"{sc.image_id}.jpg")
            record = {
                "image": f"{file_split}_image.zip@/{sc.image_id}.jpg",
                "caption_en": en,
                "caption_de": de,
                "frcnn": f"{file_split}_frcnn.zip@/{sc.image_id:08d}.json",  # zero-padded to 8, as the seed's
            }
            records.append(record)
            word_en, word_de = _mlt_pair(sc.shapes, de, rng)
            mlt_words.setdefault(word_de)
            mlt.append({**record, "word_en": word_en, "word_de": word_de})
            other = [t for t in ("picture", "list") if t != options[0]]  # a second, text-only pair of the scene
            wen, wde = caption_pair(sc.shapes, other[0])
            wmt.append({"caption_en": wen, "caption_de": wde})
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
        write_region_json(root / f"{file_split}_frcnn", regions, classes_key="classes")
    aux = [c for sc in scenes if sc.split == "train" for c in sc.captions]  # the aux text corpus: English lines
    (out / "aux").mkdir(parents=True, exist_ok=True)
    (out / "aux" / "train.txt").write_text("".join(f"{c}\n" for c in aux), encoding="utf-8")
    (root / "utils" / "MLT_vocab.txt").write_text("".join(f"{w}\n" for w in mlt_words), encoding="utf-8")
    train_tokenizer(out / "tokenizer", train_text + aux)
    return out


def train_tokenizer(out_dir: Path, texts: Sequence[str], vocab_size: int = 400) -> Path:
    """A cased WordPiece vocabulary (accents kept, as M-BERT's) trained on ``texts`` with HF ``tokenizers``, [STOP]
    included: ``out_dir/vocab.txt``."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    tok.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(out_dir))
    return out_dir / "vocab.txt"


def ensure_multi30k(corpus_root: str | Path, settings: SceneSettings) -> Path:
    """``corpus_root/multi30k`` for the scene corpus at ``corpus_root`` (written once, into a temporary sibling then
    renamed; concurrent callers serialise on a lock file; reused while its manifest names this version)."""
    final = Path(corpus_root) / "multi30k"
    expected = {"version": MULTI30K_VERSION, "settings": settings.to_dict()}

    def write(tmp: Path) -> None:
        write_multi30k_corpus(tmp, settings)
        log.info("wrote the embedded Multi30k corpus %s", final)

    return write_dir_once(final, expected, write, stamp_file="manifest.json")
