"""Memory Colors probe: zero-shot colour prediction of everyday items with a masked LM.

Input: the Memory Colors JSONL (`{"descriptor", "item", "label", "picture", "picture_path"}`, 109 items). Each item
fills each of the 13 `TEMPLATES`; an empty descriptor removes "[DESCRIPTOR] ". The scorer's logits at the single
[MASK] are restricted to the 11 `COLORS` (each must be a single wordpiece) and the arg-max is the prediction. Metric:
top-1 accuracy per template, reported as mean ± sd over templates: by default the sample sd (ddof=1), as the seed's
printed table (`results.groupby("model").agg({"accuracy": ["mean", "std", ...]})`, pandas' ddof=1); its figure's
error bars (seaborn `ci="sd"`, `np.std`) are ddof=0: `sd_ddof=0`.

CLIP-BERT variants: *implicit* = no image token; *explicit* = the image token is the CLIP **text** embedding of the
filled query sentence (`ClipTextEmbedder`), passed to the scorer as `image_embeds`.

Templates: the 13 published ones, in the order of the `question_template` column of the original
`memory_colors/data/results.csv` (and of the seed notebook's `QUESTION_TEMPLATES`; the spec lists them in another order,
the published file wins); results are reported per template by its text.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vl.data.formats.jsonl import load_jsonl
from vl.errors import ConfigError, DataError

COLORS: tuple[str, ...] = (
    "white",
    "green",
    "yellow",
    "red",
    "brown",
    "grey",
    "black",
    "blue",
    "orange",
    "pink",
    "purple",
)

#: The 13 published templates in the order of the `question_template` column of the seed's
#: `memory_colors/data/results.csv` (= its notebook's `QUESTION_TEMPLATES`). ../shared/spec/clip_bert.md lists the same
#: 13 in another order; the published file wins.
TEMPLATES: tuple[str, ...] = (
    "Q: What is the color of [DESCRIPTOR] [ITEM]? A: It is [MASK].",
    "Q: What is the color of [DESCRIPTOR] [ITEM]? [SEP] A: It is [MASK].",
    "Q: What is the colour of [DESCRIPTOR] [ITEM]? A: It is [MASK].",
    "What is the color of [DESCRIPTOR] [ITEM]? [MASK].",
    "What is the color of [DESCRIPTOR] [ITEM]? [SEP] [MASK].",
    "What is the colour of [DESCRIPTOR] [ITEM]? [MASK].",
    "The color of [DESCRIPTOR] [ITEM] is [MASK].",
    "The usual color of [DESCRIPTOR] [ITEM] is [MASK].",
    "[DESCRIPTOR] [ITEM] usually has the color of [MASK].",
    "What is the usual color of [DESCRIPTOR] [ITEM]? [MASK].",
    "What is the usual color of [DESCRIPTOR] [ITEM]? [SEP] [MASK].",
    "What is the typical color of [DESCRIPTOR] [ITEM]? [MASK].",
    "What is the typical color of [DESCRIPTOR] [ITEM]? [SEP] [MASK].",
)

REQUIRED_FIELDS = ("descriptor", "item", "label")


def load_memory_colors(path: str | Path) -> list[dict[str, Any]]:
    """Read the Memory Colors JSONL (blank lines skipped; a last line without newline is fine)."""
    items = load_jsonl(path, required=REQUIRED_FIELDS)
    for number, row in enumerate(items, 1):
        if row["label"] not in COLORS:
            raise DataError(f"{path}: item {number}: label '{row['label']}' is not one of the colours {list(COLORS)}")
    if not items:
        raise DataError(f"{path}: no items")
    return items


def fill_template(template: str, descriptor: str, item: str) -> str:
    """Fill [DESCRIPTOR]/[ITEM]; an empty descriptor removes "[DESCRIPTOR] ". Exactly one [MASK] is required."""
    if template.count("[MASK]") != 1:
        raise DataError(f"template {template!r}: expected exactly one [MASK], found {template.count('[MASK]')}")
    text = template.replace("[DESCRIPTOR] ", "") if not descriptor else template.replace("[DESCRIPTOR]", descriptor)
    return text.replace("[ITEM]", item)


def single_wordpiece_ids(tokenizer: Any, words: Sequence[str], what: str = "colour") -> list[int]:
    """Token id of each word; DataError naming the word when it is not exactly one wordpiece."""
    ids = []
    for word in words:
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1:
            raise DataError(f"{what} word '{word}' is not a single wordpiece for this tokenizer (pieces: {pieces})")
        ids.append(int(tokenizer.convert_tokens_to_ids(pieces[0])))
    return ids


#: the published sd of each probe: Memory Colors' printed table (pandas `.std()`); VPN's only published numbers are its
#: figure's error bars (seaborn `ci="sd"` = `np.std`)
PUBLISHED_SD_DDOF = {"memory_colors": 1, "visual_property_norms": 0}


def template_sd(values: Sequence[float], ddof: int) -> float:
    """The sd of per-template numbers with `ddof` 0 (`np.std`, population) or 1 (pandas `.std()`, sample); 0.0 where
    there are no more values than `ddof`."""
    if ddof not in (0, 1):
        raise ConfigError(f"sd_ddof: {ddof!r} is not 0 (np.std, the seed's figures) or 1 (pandas .std(), its table)")
    if len(values) <= ddof:
        return 0.0
    return statistics.stdev(values) if ddof == 1 else statistics.pstdev(values)


def run_memory_colors(
    scorer: Any,
    items: Sequence[dict[str, Any]],
    templates: Sequence[str] = TEMPLATES,
    *,
    clip_text: Callable[[list[str]], torch.Tensor] | None = None,
    colors: Sequence[str] = COLORS,
    sd_ddof: int = PUBLISHED_SD_DDOF["memory_colors"],
) -> dict[str, Any]:
    """Run the probe. `clip_text` (e.g. `ClipTextEmbedder`): the explicit variant's image embeddings per query.
    `sd_ddof`: `accuracy_sd`'s delta degrees of freedom (1: the seed's table, default; 0: its figure).

    Returns {"accuracy_mean", "accuracy_sd", "per_template": {template text: accuracy} (in `templates` order),
    "n_items", "n_templates", "predictions": [{"template" (its text), "query", "item", "label", "prediction"}]}."""
    template_sd([], sd_ddof)  # a bad ddof fails before any model runs
    if len(set(templates)) != len(templates):
        raise DataError("memory_colors: the templates must be distinct (results are keyed by template text)")
    color_ids = torch.tensor(single_wordpiece_ids(scorer.tokenizer, colors))
    label_index = {c: i for i, c in enumerate(colors)}
    per_template: dict[str, float] = {}
    predictions: list[dict[str, Any]] = []
    for template in templates:
        queries = [fill_template(template, str(it["descriptor"]), str(it["item"])) for it in items]
        image = clip_text(queries) if clip_text is not None else None
        logits = scorer.mask_logits(queries, image)  # (N, V)
        pred = logits[:, color_ids].argmax(-1)
        gold = torch.tensor([label_index[it["label"]] for it in items])
        per_template[template] = float((pred == gold).float().mean())
        for it, q, p in zip(items, queries, pred.tolist()):
            predictions.append(
                {"template": template, "query": q, "item": it["item"], "label": it["label"], "prediction": colors[p]}
            )
    return {
        "accuracy_mean": float(statistics.fmean(per_template.values())),
        "accuracy_sd": template_sd(list(per_template.values()), sd_ddof),
        "per_template": per_template,
        "n_items": len(items),
        "n_templates": len(templates),
        "predictions": predictions,
    }
