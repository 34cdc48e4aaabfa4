"""Zero-shot visual-commonsense probes for masked LMs (Memory Colors, Visual Property Norms).

* Python: `run_memory_colors(scorer, items, templates)`, `run_visual_property_norms(scorer, queries, labels)` with a
  scorer from `vl.eval.probes.scorers` (`build_scorer("minilm" | "random" | path.ckpt | HF dir | "lxmert:DIR" ...)`).
* `python evaluate.py task=memory_colors ckpt_path=... task.data=memory_colors.jsonl [task.clip_model=DIR]`
  (and `task=visual_property_norms task.queries=DIR/queries task.labels=DIR/labels.txt`).
* `python -m vl.tools.probes --task memory_colors --data memory_colors.jsonl --models bert=minilm clip=run/last.ckpt
  --out DIR` compares several scorers in one table/plot.

`run_probes` is what both entry points call: it runs every scorer (plus an "-explicit" variant of each scorer that
takes image embeddings, i.e. whose model reads a CLIP image (`accepts_image`), when a CLIP model dir is given, plus the
random baseline) and writes the report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vl.errors import ConfigError
from vl.eval.probes.memory_colors import (
    COLORS,
    PUBLISHED_SD_DDOF,
    TEMPLATES,
    load_memory_colors,
    run_memory_colors,
)
from vl.eval.probes.report import probe_metrics, write_probe_report
from vl.eval.probes.visual_property_norms import (
    PF_SPLITS,
    average_precision,
    build_vpn_queries,
    load_labels,
    load_queries,
    load_query_dir,
    run_visual_property_norms,
)

log = logging.getLogger(__name__)

__all__ = [
    "COLORS",
    "PF_SPLITS",
    "PUBLISHED_SD_DDOF",
    "TEMPLATES",
    "average_precision",
    "build_vpn_queries",
    "load_labels",
    "load_memory_colors",
    "load_queries",
    "load_query_dir",
    "run_memory_colors",
    "run_probes",
    "run_visual_property_norms",
]


def _load_vpn_queries(path: str | Path, labels: list[str], labels_file: str) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        return load_query_dir(path, labels, labels_file)
    return load_queries(path, labels, labels_file)


def run_probes(
    task: str,
    scorers: dict[str, Any],
    *,
    out_dir: str | Path,
    data: str | Path | None = None,
    queries: str | Path | None = None,
    labels: str | Path | None = None,
    clip_model: str | Path | None = None,
    random_baseline: bool = True,
    seed: int = 0,
    device: str = "cpu",
    average: str = "query",
    lxmert_dropout: str = "seed",
    sd_ddof: int | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Run `task` for every scorer; returns (results per model name, flat metrics) and writes the report.
    `average`: visual_property_norms' averaging within a (pf, template) (`run_visual_property_norms`).
    `lxmert_dropout`: "seed" scores the text-only LXMERT as the seed's notebook of the task did: Visual Property Norms
    with dropout on in its language-only cross-modality layers (the notebook never called `eval()` after swapping
    them in; seeded from `seed`, `LxmertTextOnlyScorer.set_cross_dropout`), Memory Colors in eval mode; "off": eval
    mode for both (deterministic logits).
    `sd_ddof`: the sd over templates' delta degrees of freedom; None: the task's published one (`PUBLISHED_SD_DDOF`:
    Memory Colors 1, as the seed's printed table; Visual Property Norms 0, as its figure, its only published numbers)."""
    from vl.eval.probes.scorers import ClipTextEmbedder, RandomScorer

    if average not in ("query", "concept"):
        raise ConfigError(f"average: '{average}' is not 'query' (the seed's mean over queries) or 'concept'")
    ddof = PUBLISHED_SD_DDOF.get(task, 1) if sd_ddof is None else int(sd_ddof)
    if ddof not in (0, 1):
        raise ConfigError(f"sd_ddof: {sd_ddof!r} is not 0 (np.std, the seed's figures) or 1 (pandas .std(), its table)")
    if lxmert_dropout not in ("seed", "off"):
        raise ConfigError(f"lxmert_dropout: '{lxmert_dropout}' is not 'seed' (as the seed's notebooks) or 'off'")
    for scorer in scorers.values():
        set_cross_dropout = getattr(scorer, "set_cross_dropout", None)
        if set_cross_dropout is not None:
            set_cross_dropout(task == "visual_property_norms" and lxmert_dropout == "seed", seed=seed)
    clip_text = ClipTextEmbedder(clip_model, device=device) if clip_model else None
    runs: list[tuple[str, Any, Any]] = []
    for name, scorer in scorers.items():
        explicit = clip_text is not None and getattr(scorer, "accepts_image", False)
        if clip_text is not None and not explicit:
            log.info("%s: the model reads no CLIP image; no '-explicit' variant (it would repeat the numbers)", name)
        runs.append((f"{name}-implicit" if explicit else name, scorer, None))
        if explicit:
            runs.append((f"{name}-explicit", scorer, clip_text))
    if random_baseline:
        first = next(iter(scorers.values()), None)
        tok = getattr(first, "tokenizer", None)
        runs.append(("random", RandomScorer(tok, seed=seed), None))

    results: dict[str, dict[str, Any]] = {}
    if task == "memory_colors":
        if not data:
            raise ConfigError("task_cfg.data: the Memory Colors JSONL path is required")
        items = load_memory_colors(data)
        for name, scorer, clip in runs:
            results[name] = run_memory_colors(scorer, items, TEMPLATES, clip_text=clip, sd_ddof=ddof)
            log.info(
                "memory_colors %s: %.3f ± %.3f", name, results[name]["accuracy_mean"], results[name]["accuracy_sd"]
            )
    elif task == "visual_property_norms":
        if not queries or not labels:
            raise ConfigError("task_cfg.queries (query dir or JSONL) and task_cfg.labels (labels.txt) are required")
        words = load_labels(labels)
        rows = _load_vpn_queries(queries, words, str(labels))  # every query checked before any model scores
        for name, scorer, clip in runs:
            results[name] = run_visual_property_norms(
                scorer, rows, words, clip_text=clip, average=average, sd_ddof=ddof
            )
    else:
        raise ConfigError(f"task: unknown probe '{task}'; choose from memory_colors, visual_property_norms")
    write_probe_report(out_dir, task, results)
    return results, probe_metrics(task, results)
