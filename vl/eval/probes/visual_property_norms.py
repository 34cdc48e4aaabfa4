"""Visual Property Norms (VPN) probe: rank a concept's visual-perceptual features with a masked LM.

Data (derived from the CSLB property norms `norms.dat`, licence-restricted, not shipped):
* `build_vpn_queries(norms, descriptors, tokenizer, out_dir)` follows the seed's notebook
  (`create-visual-property-norms-evaluation.ipynb`): keep rows with `feature type == "visual perceptual"`; a feature
  that lists alternatives (`is black_white`) becomes the alternative most participants gave (`feature alternatives`
  split at "; ", counted from `participant list` "p 3 29 / 14" = groups separated by "/"; a few synonyms mapped as the
  seed does, `FEATURE_REPLACEMENTS`), or the part before "_" when that pick is not one of the feature's spellings;
  the feature's last word is the answer and the words before it the starter, kept when the starter is one of
  {"is", "has", "has a", "made of" -> "is made of"} and the answer a single wordpiece. For each PF split s in
  `PF_SPLITS` (features with pf >= s) and each template i (from 0, as the seed) it writes
  `queries/template_{i}_pf_{s}.jsonl`: one query per (concept, feature_starter),
  `{"query", "labels": [words], "concept", "query_template", "feature_starter", "pf"}`, and `labels.txt` (all
  answer words, sorted). `norms.dat` is tab-separated with the columns `concept`, `feature`, `feature type`, `pf`
  (and `feature alternatives`, `participant list` when a feature lists alternatives).
* `descriptors.csv`: `concept,descriptor` (the article; an empty descriptor removes "[DESCRIPTOR] ").

Metric per query: average precision of the [MASK] logits against the labels, over the whole vocabulary (`score`)
and over the label-set tokens only (`masked_score`, the headline). Averaged over all queries of a (model, pf,
template) as the seed does (`average="query"`; `average="concept"` averages each concept's queries first), then
reported as mean ± sd over templates per pf: by default ddof=0, as the seed's figure (seaborn `ci="sd"` = `np.std`),
its only published numbers; `sd_ddof=1`: the sample sd (pandas `.std()`).

Templates: the nine of the seed's notebook, in its order.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vl.data.formats.jsonl import load_jsonl
from vl.errors import ConfigError, DataError
from vl.eval.probes.memory_colors import PUBLISHED_SD_DDOF, single_wordpiece_ids, template_sd

log = logging.getLogger(__name__)

PF_SPLITS: tuple[int, ...] = (2, 5, 10, 20, 30)

TEMPLATES: tuple[str, ...] = (
    "[DESCRIPTOR] [CONCEPT] [FEATURE_STARTER] [MASK].",
    "everybody knows that [DESCRIPTOR] [CONCEPT] [FEATURE_STARTER] [MASK].",
    "[DESCRIPTOR] [CONCEPT] usually [FEATURE_STARTER] [MASK].",
    "q: [DESCRIPTOR] [CONCEPT] [FEATURE_STARTER]? a: [MASK].",
    "q: [DESCRIPTOR] [CONCEPT] usually [FEATURE_STARTER]? a: [MASK].",
    "generally, [DESCRIPTOR] [CONCEPT] [FEATURE_STARTER] [MASK].",
    "[DESCRIPTOR] [CONCEPT] generally [FEATURE_STARTER] [MASK].",
    "describe the properties of [DESCRIPTOR] [CONCEPT]. [DESCRIPTOR] [CONCEPT] [FEATURE_STARTER] [MASK].",
    "describe the properties of [DESCRIPTOR] [CONCEPT]. [DESCRIPTOR] [CONCEPT] usually [FEATURE_STARTER] [MASK].",
)

#: feature starter (the feature's words before its last) -> the starter used in the query; others are dropped
STARTERS: dict[str, str] = {"is": "is", "has": "has", "has a": "has a", "made of": "is made of"}
#: the seed's replacements of a picked alternative (synonyms folded onto one spelling)
FEATURE_REPLACEMENTS: dict[str, str] = {
    "has a skin": "has skin", "is furry": "has fur", "is stream-lined": "is streamlined",
    "is made of material": "made of fabric", "made of material": "made of fabric", "is hairy": "has fur",
    "made of porcelain": "made of ceramic", "is see through": "is transparent", "is ceramic": "made of ceramic",
    "made of clay": "made of ceramic", "is translucent": "is transparent", "has a cable": "has a wire",
    "has wires": "has a wire", "made of wires": "has a wire", "has a hard skin": "has hard skin",
    "has a tough skin": "has tough skin", "is see-through": "is transparent", "is rounded": "is round",
    "has round": "is round", "has a pip": "has pips",
}  # fmt: skip
VISUAL_TYPE = "visual perceptual"
NORMS_COLUMNS = ("concept", "feature", "feature type", "pf")
ALTERNATIVE_COLUMNS = ("feature alternatives", "participant list")


# ---------------------------------------------------------------------------------------------------- metric
def average_precision(y_true: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds (ties form one threshold), highest first:
    the definition of `sklearn.metrics.average_precision_score`. NaN when there is no positive."""
    y = np.asarray(y_true.cpu() if isinstance(y_true, torch.Tensor) else y_true).astype(np.float64).ravel()
    s = np.asarray(scores.detach().cpu().double() if isinstance(scores, torch.Tensor) else scores, np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} differ in shape")
    n_pos = y.sum()
    if n_pos <= 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # index of the last element of each threshold group
    tp = np.cumsum(y)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ---------------------------------------------------------------------------------------------------- data
def load_labels(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels.txt not found")
    labels = [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]
    if len(set(labels)) != len(labels):
        raise DataError(f"{path}: repeated labels")
    return labels


def load_descriptors(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: descriptors.csv not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"concept", "descriptor"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected the header 'concept,descriptor', got {reader.fieldnames}")
        out: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            if row["concept"] in out:  # a second row would replace the first's descriptor
                raise DataError(f"{path}:{line}: concept {row['concept']!r} is listed twice")
            out[row["concept"]] = (row["descriptor"] or "").strip()
        return out


def load_queries(
    path: str | Path, labels: Collection[str] | None = None, labels_file: str = "labels.txt"
) -> list[dict[str, Any]]:
    """One query JSONL (`{"query", "labels", "concept", "query_template", "pf", ...}` a line), checked before any
    model scores it: `labels` a non-empty list of strings (each in `labels` when given, the words of `labels_file`),
    `pf` an integer; a bad line is a DataError naming the file and the line (they failed after scoring a model)."""
    path = Path(path)
    rows = load_jsonl(path, required=("query", "labels", "concept", "query_template", "pf"), texts=("query", "concept"))
    with path.open("r", encoding="utf-8") as f:
        lines = [n for n, line in enumerate(f, start=1) if line.strip()]
    vocabulary = None if labels is None else set(labels)
    for lineno, row in zip(lines, rows):
        words = row["labels"]
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            raise DataError(f"{path}:{lineno}: field 'labels' is {words!r}, expected a non-empty list of words")
        pf = row["pf"]
        if isinstance(pf, bool) or not (isinstance(pf, int) or (isinstance(pf, float) and pf.is_integer())):
            raise DataError(f"{path}:{lineno}: field 'pf' is {pf!r}, expected an integer (production frequency)")
        if vocabulary is not None:
            unknown = [w for w in words if w not in vocabulary]
            if unknown:
                raise DataError(f"{path}:{lineno}: field 'labels' has {unknown}, not in {labels_file}")
    return rows


def load_query_dir(
    query_dir: str | Path, labels: Collection[str] | None = None, labels_file: str = "labels.txt"
) -> list[dict[str, Any]]:
    """All `template_{i}_pf_{pf}.jsonl` under `query_dir` (`load_queries`), each row tagged with `template` (i) and
    `pf`; a file so named whose i or pf is not an integer is a DataError naming it."""
    query_dir = Path(query_dir)
    files = sorted(query_dir.glob("template_*_pf_*.jsonl"))
    if not files:
        raise DataError(f"{query_dir}: no template_{{i}}_pf_{{pf}}.jsonl query files")
    rows = []
    for path in files:
        parts = path.stem.split("_")  # template, i, pf, s
        if len(parts) != 4 or not parts[1].isdigit() or not parts[3].isdigit():
            raise DataError(f"{path}: the name is not template_{{i}}_pf_{{pf}}.jsonl with integers i and pf")
        for row in load_queries(path, labels, labels_file):
            rows.append({**row, "template": int(parts[1]), "pf": int(parts[3])})
    return rows


def fill_template(template: str, descriptor: str, concept: str, starter: str) -> str:
    """Fill the placeholders, then fold the double space an empty descriptor leaves and strip (the seed's rule)."""
    if template.count("[MASK]") != 1:
        raise DataError(f"template {template!r}: expected exactly one [MASK]")
    text = template.replace("[DESCRIPTOR]", descriptor).replace("[CONCEPT]", concept)
    return text.replace("[FEATURE_STARTER]", starter).replace("  ", " ").strip()


def participant_counts(participant_list: str) -> list[int]:
    """CSLB `participant list` "p 3 29 / 14" -> participants per alternative ([2, 1]): groups split at "/"."""
    counts, n = [], 0
    for token in participant_list.split()[1:]:
        if token == "/":
            counts.append(n)
            n = 0
        else:
            n += 1
    return counts + [n]


def resolve_alternatives(feature: str, alternatives: str | None, participants: str | None, where: str = "") -> str:
    """A feature listing alternatives ("is black_white") -> the alternative most participants gave (first on ties),
    mapped by `FEATURE_REPLACEMENTS`; the part before "_" when that pick is not one of the feature's spellings
    (before "_", after it, the first word + after it, ...). A feature without "_" is returned unchanged."""
    if "_" not in feature:
        return feature
    if alternatives is None or participants is None:
        raise DataError(
            f"{where}feature {feature!r} lists alternatives; the columns {list(ALTERNATIVE_COLUMNS)} are needed"
        )
    options = alternatives.split("; ")
    counts = participant_counts(participants)
    best = int(np.argmax(counts))
    if best >= len(options):
        raise DataError(f"{where}participant list {participants!r} has more groups than alternatives {options}")
    pick = FEATURE_REPLACEMENTS.get(options[best], options[best])
    head, tail = feature.split("_")[0], feature.split("_")[1]
    head_words, tail_words = head.split(" "), tail.split(" ")
    spellings = [head, tail, " ".join([head_words[0], tail])]
    if len(head_words) > 2:
        spellings.append(" ".join(head_words[:2] + [tail]))
    if len(tail_words) > 1:
        spellings.append(" ".join([head] + tail_words[1:]))
    if pick not in spellings:
        log.warning("%sfeature %r: most common alternative %r is not among %s; using %r", where, feature, pick,
                    spellings, head)  # fmt: skip
        return head
    return pick


def split_feature(feature: str) -> tuple[str, str] | None:
    """The seed's rule: last word = the answer (cut at "_"), the words before it = the starter; "has a tail" ->
    ("has a", "tail"), "made of metal" -> ("is made of", "metal"); None when the starter is not in `STARTERS`."""
    words = feature.split()
    if len(words) < 2:
        return None
    starter = " ".join(words[:-1])
    if starter not in STARTERS:
        return None
    return STARTERS[starter], words[-1].split("_")[0]


def read_norms(path: str | Path) -> list[dict[str, Any]]:
    """CSLB `norms.dat` (tab-separated) -> rows {concept, feature (alternatives resolved), type, pf}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CSLB norms file not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in NORMS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing} (tab-separated; have {reader.fieldnames})")
        rows = []
        for lineno, row in enumerate(reader, 2):
            try:
                pf = int(float(row["pf"]))
            except (TypeError, ValueError):
                raise DataError(f"{path}:{lineno}: pf '{row['pf']}' is not a number") from None
            feature = row["feature"]
            if row["feature type"].strip().lower() == VISUAL_TYPE:
                alts, parts = (row.get(c) for c in ALTERNATIVE_COLUMNS)
                feature = resolve_alternatives(feature, alts, parts, where=f"{path}:{lineno}: ")
            rows.append({"concept": row["concept"], "feature": feature, "type": row["feature type"], "pf": pf})
    return rows


def build_vpn_queries(
    norms_path: str | Path,
    descriptors_path: str | Path,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    templates: Sequence[str] = TEMPLATES,
    pf_splits: Sequence[int] = PF_SPLITS,
) -> dict[str, Any]:
    """Write `labels.txt` and `queries/template_{i}_pf_{pf}.jsonl` (i from 0). Returns counts."""
    norms = read_norms(norms_path)
    descriptors = load_descriptors(descriptors_path)
    vocab = tokenizer.get_vocab()
    # (concept, starter) -> {word: pf}
    features: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for row in norms:
        if row["type"].strip().lower() != VISUAL_TYPE:
            continue
        split = split_feature(row["feature"])
        if split is None:
            continue
        starter, word = split
        if word not in vocab or tokenizer.tokenize(word) != [word]:
            continue  # not a single bert-base-uncased wordpiece
        key = (row["concept"], starter)
        features[key][word] = max(row["pf"], features[key].get(word, 0))
    out_dir = Path(out_dir)
    (out_dir / "queries").mkdir(parents=True, exist_ok=True)
    min_split = min(pf_splits)
    labels = sorted({w for feats in features.values() for w, pf in feats.items() if pf >= min_split})
    (out_dir / "labels.txt").write_text("".join(f"{w}\n" for w in labels), encoding="utf-8")
    counts: dict[str, Any] = {"labels": len(labels)}
    for i, template in enumerate(templates):
        for split in pf_splits:
            n = 0
            path = out_dir / "queries" / f"template_{i}_pf_{split}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for (concept, starter), feats in sorted(features.items()):
                    words = sorted(w for w, pf in feats.items() if pf >= split)
                    if not words:
                        continue
                    name = concept.replace("_", " ")
                    if concept not in descriptors:
                        raise DataError(f"{descriptors_path}: no descriptor for concept {concept!r}")
                    query = fill_template(template, descriptors[concept], name, starter)
                    row = {
                        "query": query,
                        "labels": words,
                        "concept": concept,
                        "query_template": template,
                        "feature_starter": starter,
                        "pf": split,
                    }
                    f.write(json.dumps(row) + "\n")
                    n += 1
            counts[f"template_{i}_pf_{split}"] = n
    return counts


# ---------------------------------------------------------------------------------------------------- probe
def run_visual_property_norms(
    scorer: Any,
    queries: Sequence[dict[str, Any]],
    labels: Sequence[str],
    *,
    clip_text: Callable[[list[str]], torch.Tensor] | None = None,
    batch_size: int = 256,
    average: str = "query",
    sd_ddof: int = PUBLISHED_SD_DDOF["visual_property_norms"],
) -> dict[str, Any]:
    """Queries need `query`, `labels`, `concept`, `pf` and `query_template` (its text; results are keyed by it).

    `average="query"` (the seed): a (pf, template)'s MAP is the mean over all its queries (concept x starter);
    `"concept"`: the mean over concepts of each concept's mean. `sd_ddof`: the delta degrees of freedom of the sd over
    templates (0: the seed's figure, default; 1: the sample sd).
    Returns {"per_pf": {pf: {"masked_map_mean", "masked_map_sd", "map_mean", "map_sd", "n_templates"}},
    "per_template": {(pf, template text): {"masked_map", "map", "n_queries", "n_concepts"}}, "per_query": [...]}."""
    if average not in ("query", "concept"):
        raise ValueError(f"average must be 'query' (the seed) or 'concept', got {average!r}")
    template_sd([], sd_ddof)  # a bad ddof fails before any model runs
    tok = scorer.tokenizer
    label_ids = single_wordpiece_ids(tok, labels, what="label")
    label_pos = {w: i for i, w in enumerate(labels)}
    label_ids_t = torch.tensor(label_ids)
    texts = sorted({q["query"] for q in queries})  # the same text recurs across pf splits: score it once
    logits: dict[str, torch.Tensor] = {}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        image = clip_text(chunk) if clip_text is not None else None
        for text, row in zip(chunk, scorer.mask_logits(chunk, image)):
            logits[text] = row
    width = next(iter(logits.values())).shape[0] if logits else len(tok)
    if width != len(tok):  # the seed asserts it: a wider head would score its extra rows as negatives
        raise ConfigError(
            f"visual property norms: the model's MLM head scores {width} tokens, its tokenizer has {len(tok)}; the "
            "whole-vocabulary MAP needs one score per tokenizer entry"
        )
    per_query = []
    # (pf, template) -> concept -> [(score, masked_score)]
    groups: dict[tuple[int, Any], dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for q in queries:
        words = list(q["labels"])
        unknown = [w for w in words if w not in label_pos]
        if unknown:
            raise DataError(f"query {q['query']!r}: labels {unknown} are not in labels.txt")
        row = logits[q["query"]]
        y_vocab = np.zeros(row.shape[0])
        y_vocab[single_wordpiece_ids(tok, words, what="label")] = 1
        score = average_precision(y_vocab, row)
        y_masked = np.zeros(len(labels))
        y_masked[[label_pos[w] for w in words]] = 1
        masked = average_precision(y_masked, row[label_ids_t])
        if "query_template" not in q:
            raise DataError(f"query {q['query']!r} has no 'query_template'")
        template = q["query_template"]
        groups[(int(q["pf"]), template)][q["concept"]].append((score, masked))
        per_query.append({**q, "score": score, "masked_score": masked})
    per_template: dict[tuple[int, Any], dict[str, float]] = {}
    for key, concepts in groups.items():
        if average == "query":
            values = np.array([s for scores in concepts.values() for s in scores])
        else:
            values = np.array([np.mean(np.array(v), axis=0) for v in concepts.values()])
        per_template[key] = {
            "map": float(np.mean(values[:, 0])),
            "masked_map": float(np.mean(values[:, 1])),
            "n_queries": sum(len(v) for v in concepts.values()),
            "n_concepts": len(concepts),
        }
    per_pf: dict[int, dict[str, float]] = {}
    for pf in sorted({k[0] for k in per_template}):
        vals = [v for k, v in per_template.items() if k[0] == pf]
        masked_vals = [v["masked_map"] for v in vals]
        full_vals = [v["map"] for v in vals]
        per_pf[pf] = {
            "masked_map_mean": float(statistics.fmean(masked_vals)),
            "masked_map_sd": template_sd(masked_vals, sd_ddof),
            "map_mean": float(statistics.fmean(full_vals)),
            "map_sd": template_sd(full_vals, sd_ddof),
            "n_templates": len(vals),
        }
    return {"per_pf": per_pf, "per_template": per_template, "per_query": per_query}
