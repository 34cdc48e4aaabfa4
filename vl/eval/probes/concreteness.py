"""The concreteness probe of VG-BERT (spec: vg_bert.md; the seed's `evaluation/script/pca_analysis.ipynb`):
`python evaluate.py ckpt_path=<VG-BERT run>/checkpoints/best.ckpt task=concreteness [task.words=... ]`.

- Word embeddings: the object encoder on `[CLS] word [SEP]` (`VGBertEncoder.encode_objects`: BERT with segment ids 1,
  hidden x token mask, the divide-by-10 mean over the 10 positions), one word per phrase. (How the paper extracted
  them is not in the seed; this is the likely method, spec.)
- PCA over all the words' embeddings (centred, SVD); PC1's sign is arbitrary (the notebook negates the BERT
  projection by hand, `-X_PCA_bert`, so its three published r are positive), so it is oriented to correlate
  positively with concreteness on the word level: the reported r is |r|.
- Word level: Pearson r of PC1 with the ratings, over the selected (common) words. Category level: per category,
  the mean PC1 and the mean rating of its selected words; Pearson r over the categories.
- Inputs: SemCat + Brysbaert, as the seed's `.npy` files (`words` = semcat_word_list.npy, words grouped by category;
  `categories` = semcat_category_list.npy, rows [name, count]; `concreteness` = semcat_concreteness.npy;
  `common` = semcat_commonword_idx.npy, > 0 = used), or one CSV (`csv`: columns word, category, concreteness[,
  common]). Loaded with `allow_pickle=False`.
- Default (no inputs): the embedded corpus's own words with a **synthetic** "concreteness" defined here (shape and
  colour words 5 / 4.5, size words 3.5, position words 3, function words 1.5): a mechanics check of the probe only,
  not a measurement of anything a human rated.
- Output (the evaluate run dir): `concreteness.csv` (word, category, rating, PC1), `concreteness.md` (the two r), and
  `concreteness.png` (the category-level scatter with its fit, as the notebook's figure; matplotlib, Agg).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_WORDS",
    "embedded_words",
    "load_npy_inputs",
    "load_csv_inputs",
    "pc1",
    "concreteness_correlations",
    "word_embeddings",
    "write_report",
    "run_concreteness",
]

#: the embedded default: (category, synthetic rating, words) - a mechanics check only (module docstring)
EMBEDDED_WORDS: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    ("shape", 5.0, ("circle", "square", "triangle", "star")),
    ("colour", 4.5, ("red", "green", "blue", "yellow", "white", "black", "purple", "orange")),
    ("size", 3.5, ("small", "large")),
    ("position", 3.0, ("left", "middle", "right")),
    ("function", 1.5, ("the", "is", "a", "an", "there", "of", "to", "with", "and", "in", "on")),
)


def embedded_words() -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    words, cats, ratings = [], [], []
    for cat, rating, ws in EMBEDDED_WORDS:
        words += list(ws)
        cats += [cat] * len(ws)
        ratings += [rating] * len(ws)
    return words, cats, np.asarray(ratings, dtype=np.float64), np.ones(len(words), dtype=bool)


def _npy(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{path}: not a plain .npy array ({e})") from None


def load_npy_inputs(
    words: str | Path, categories: str | Path, concreteness: str | Path, common: str | Path | None = None
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """The seed's SemCat `.npy` files -> (words, category per word, ratings, selected mask)."""
    word_list = [str(w) for w in _npy(words).tolist()]
    cat_rows = _npy(categories)
    cats: list[str] = []
    for row in cat_rows:
        if len(row) < 2:
            raise DataError(f"{categories}: each row must be [name, count]")
        cats += [str(row[0])] * int(row[1])
    if len(cats) != len(word_list):
        raise DataError(f"{categories}: the counts sum to {len(cats)}, but {words} lists {len(word_list)} words")
    ratings = np.asarray(_npy(concreteness), dtype=np.float64).reshape(-1)
    if len(ratings) != len(word_list):
        raise DataError(f"{concreteness}: {len(ratings)} ratings for {len(word_list)} words")
    select = np.asarray(_npy(common)).reshape(-1) > 0 if common else np.ones(len(word_list), dtype=bool)
    if len(select) != len(word_list):
        raise DataError(f"{common}: {len(select)} entries for {len(word_list)} words")
    return word_list, cats, ratings, select


def load_csv_inputs(path: str | Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """A CSV with columns word, category, concreteness[, common] -> the same as `load_npy_inputs`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"word", "category", "concreteness"}
    if not rows or not need <= set(rows[0]):
        raise DataError(f"{path}: needs the columns {sorted(need)} (and optionally 'common')")
    try:
        ratings = np.asarray([float(r["concreteness"]) for r in rows])
        common = [float(r["common"]) if (r.get("common") or "").strip() else None for r in rows]
    except ValueError as e:
        raise DataError(f"{path}: a concreteness / common value is not a number ({e})") from None
    bad = next((i for i, v in enumerate(ratings) if not np.isfinite(v)), None)
    if bad is not None:  # "nan" parses as a float: a rating that would turn every correlation into NaN
        raise DataError(f"{path}:{bad + 2}: concreteness {rows[bad]['concreteness']!r} is not a finite number")
    if "common" in rows[0] and any(v is None for v in common):  # an empty cell is not "selected"
        blank = next(i for i, v in enumerate(common) if v is None)
        raise DataError(f"{path}:{blank + 2}: empty 'common' cell (1 = the word is selected, 0 = not)")
    select = np.asarray([v is None or v > 0 for v in common])
    return [r["word"] for r in rows], [r["category"] for r in rows], ratings, select


def pc1(embeddings: np.ndarray) -> np.ndarray:
    """Projection of each (centred) row on the first principal axis (SVD)."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[0]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def concreteness_correlations(
    embeddings: np.ndarray, ratings: np.ndarray, categories: Sequence[str], select: np.ndarray
) -> dict[str, Any]:
    """-> {"pc1" (oriented), "word_r", "category_r", "category_pc1", "category_rating", "category_names"}."""
    scores = pc1(embeddings)
    word_r = _pearson(scores[select], ratings[select])
    if word_r < 0:  # PC1's sign is arbitrary: orient it to correlate positively (the notebook flips it by hand)
        scores, word_r = -scores, -word_r
    cats = np.asarray(list(categories))
    names = [c for c in dict.fromkeys(cats[select])]
    cat_pc = np.asarray([scores[select & (cats == c)].mean() for c in names])
    cat_rating = np.asarray([ratings[select & (cats == c)].mean() for c in names])
    return {
        "pc1": scores,
        "word_r": word_r,
        "category_r": _pearson(cat_pc, cat_rating),
        "category_pc1": cat_pc,
        "category_rating": cat_rating,
        "category_names": names,
    }


def word_embeddings(encoder: Any, tokenizer: Any, words: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """(n, H): `encoder.encode_objects` on `[CLS] word [SEP]` (10 positions), in eval mode, no gradients."""
    import torch

    encoder.eval()
    out = []
    device = next(encoder.parameters()).device
    with torch.no_grad():
        for start in range(0, len(words), batch_size):
            chunk = list(words[start : start + batch_size])
            enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=10, return_tensors="pt")
            ids = enc["input_ids"].unsqueeze(1).to(device)
            mask = enc["attention_mask"].unsqueeze(1).to(device)
            obj = torch.ones(len(chunk), 1, dtype=torch.long, device=device)
            out.append(encoder.encode_objects(ids, mask, obj)[:, 0].float().cpu().numpy())
    return np.concatenate(out)


def write_report(
    out_dir: Path, name: str, words: Sequence[str], categories: Sequence[str], ratings: np.ndarray, result: dict
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "concreteness.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["word", "category", "concreteness", "pc1"])
        for w, c, r, s in zip(words, categories, ratings, result["pc1"]):
            writer.writerow([w, c, f"{r:.4f}", f"{s:.6f}"])
    (out_dir / "concreteness.md").write_text(
        f"| model | word-level r | category-level r |\n|---|---|---|\n"
        f"| {name} | {result['word_r']:.3f} | {result['category_r']:.3f} |\n",
        encoding="utf-8",
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        log.warning("matplotlib is not installed: no concreteness.png")
        return
    x, y = result["category_pc1"], result["category_rating"]
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    ax.scatter(x, y, c=y, cmap="jet")
    for xi, yi, label in zip(x, y, result["category_names"]):
        ax.annotate(label, (xi, yi), fontsize=7)
    if len(x) > 1 and np.std(x) > 0:
        m, b = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 10)
        ax.plot(xs, m * xs + b, c="grey", alpha=0.6, label=f"r = {result['category_r']:.3f}")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("principal axis (PC1), category mean")
    ax.set_ylabel("concreteness rating")
    ax.set_title(f"{name}: word r = {result['word_r']:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "concreteness.png")
    plt.close(fig)


def run_concreteness(
    encoder: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    name: str = "model",
    words: str | None = None,
    categories: str | None = None,
    concreteness: str | None = None,
    common: str | None = None,
    csv_path: str | None = None,
) -> dict[str, float]:
    """The probe end to end (module docstring); returns {"test/concreteness_word_r", "test/concreteness_category_r", ...}."""
    if csv_path:
        inputs = load_csv_inputs(csv_path)
    elif words or categories or concreteness:
        if not (words and categories and concreteness):
            raise ConfigError("task: the .npy inputs need task.words, task.categories and task.concreteness")
        inputs = load_npy_inputs(words, categories, concreteness, common)
    else:
        inputs = embedded_words()
        log.info("concreteness: the embedded corpus's words with synthetic ratings (a mechanics check only)")
    word_list, cats, ratings, select = inputs
    if not hasattr(encoder, "encode_objects"):
        raise ConfigError(
            f"ckpt_path: the concreteness probe needs a VG-BERT encoder (object encoder), not {type(encoder).__name__}"
        )
    result = concreteness_correlations(word_embeddings(encoder, tokenizer, word_list), ratings, cats, select)
    write_report(Path(out_dir), name, word_list, cats, ratings, result)
    return {
        "test/concreteness_word_r": result["word_r"],
        "test/concreteness_category_r": result["category_r"],
        "test/concreteness_words": float(select.sum()),
        "test/concreteness_categories": float(len(result["category_names"])),
    }
