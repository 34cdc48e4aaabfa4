"""Memory Colors / Visual Property Norms probes: real sample files, numbers equal a direct computation, AP vs sklearn,
single-wordpiece and one-[MASK] errors, checkpoint scorer (implicit / explicit CLIP-BERT), report files, CLI."""

from __future__ import annotations

import csv
import functools
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.metrics import average_precision_score
from transformers import BertConfig, BertForMaskedLM

from tests.conftest import REAL_SAMPLES, real_sample
from vl.errors import ConfigError, DataError
from vl.eval.probes import memory_colors as mc
from vl.eval.probes import visual_property_norms as vpn
from vl.eval.probes.report import probe_metrics, write_probe_report
from vl.eval.probes.scorers import CheckpointScorer, HFMaskedLMScorer, RandomScorer, encode_masked

MC_REAL = REAL_SAMPLES / "memory_colors" / "memory_colors.jsonl"
VPN_REAL = REAL_SAMPLES / "visual_property_norms"
needs_real = pytest.mark.skipif(
    not (MC_REAL.is_file() and VPN_REAL.is_dir()),
    reason=f"real samples not found at {REAL_SAMPLES} (set VL_REAL_SAMPLES to the shared real_samples dir)",
)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BertForMaskedLM with the bert-base-uncased vocab (copied from the packaged MiniLM)."""
    from vl.pretrained import resolve_model_dir

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(cfg).save_pretrained(path)
    src = resolve_model_dir("minilm")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (src / name).is_file():
            shutil.copy(src / name, path / name)
    return path


@pytest.fixture(scope="module")
def scorer(tiny_bert_dir):
    return HFMaskedLMScorer(str(tiny_bert_dir), name="tiny")


@functools.cache
def _load_direct(model_dir: Path) -> BertForMaskedLM:
    return BertForMaskedLM.from_pretrained(str(model_dir)).eval()


def _direct_logits(model_dir: Path, tokenizer, text: str) -> torch.Tensor:
    """One text, no padding, no batching: the reference computation."""
    model = _load_direct(model_dir)
    enc = tokenizer(text, return_tensors="pt")
    pos = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().item()
    with torch.no_grad():
        return model(**enc).logits[0, pos]


# ------------------------------------------------------------------------------------------ real samples
@needs_real
def test_real_memory_colors_and_vpn_samples_load():
    items = mc.load_memory_colors(MC_REAL)
    assert len(items) == 109
    counts = {c: sum(it["label"] == c for it in items) for c in mc.COLORS}
    assert counts["white"] == 25 and counts["green"] == 19 and counts["purple"] == 3
    labels = vpn.load_labels(VPN_REAL / "labels.txt")
    assert len(labels) == 614
    descriptors = vpn.load_descriptors(VPN_REAL / "descriptors.csv")
    assert descriptors["accordion"] == "an" and len(descriptors) > 600
    from vl.data.collate import load_tokenizer

    tok = load_tokenizer("minilm")
    assert len(mc.single_wordpiece_ids(tok, labels, what="label")) == 614
    assert len(mc.single_wordpiece_ids(tok, mc.COLORS)) == 11


# ------------------------------------------------------------------------------------------ templates / errors
#: the 13 published Memory Colors templates, in the order of the `question_template` column of the seed's
#: `memory_colors/data/results.csv` (lovhag/measure-visual-commonsense-knowledge; copied by hand from that file, whose
#: order is also its notebook's `QUESTION_TEMPLATES`; ../shared/spec/clip_bert.md lists them in another order)
PUBLISHED_MC_TEMPLATES = [
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
]


def test_memory_colors_template_order_is_the_published_results_files():
    """The order of first appearance in the real `results.csv` (`question_template` column), read from the file."""
    path = real_sample("memory_colors", "results.csv")  # skips, naming the path, where the sample is absent
    with open(path, newline="") as f:
        order = list(dict.fromkeys(row["question_template"] for row in csv.DictReader(f)))
    assert order == PUBLISHED_MC_TEMPLATES
    assert list(mc.TEMPLATES) == order


def test_memory_colors_templates_are_the_published_ones(tmp_path):
    assert list(mc.TEMPLATES) == PUBLISHED_MC_TEMPLATES
    # results and the report name each template by its text, in that order
    items = [{"descriptor": "the", "item": f"thing{i}", "label": mc.COLORS[i % 11]} for i in range(5)]
    res = mc.run_memory_colors(RandomScorer(seed=0), items)
    assert list(res["per_template"]) == PUBLISHED_MC_TEMPLATES
    assert {p["template"] for p in res["predictions"]} == set(PUBLISHED_MC_TEMPLATES)
    paths = write_probe_report(tmp_path, "memory_colors", {"random": res})
    with open(paths["csv"], newline="") as f:
        row = next(csv.DictReader(f))
    assert [k for k in row if "[MASK]" in k] == PUBLISHED_MC_TEMPLATES
    assert all(float(row[t]) == pytest.approx(res["per_template"][t]) for t in PUBLISHED_MC_TEMPLATES)
    md = paths["md"].read_text()
    assert all(f"`{t}`" in md for t in PUBLISHED_MC_TEMPLATES) and "template_1" not in md
    assert not any("[MASK]" in k for k in probe_metrics("memory_colors", {"random": res}))
    with pytest.raises(DataError, match="distinct"):
        mc.run_memory_colors(RandomScorer(seed=0), items, [mc.TEMPLATES[0]] * 2)


def test_templates_and_fill():
    assert len(mc.TEMPLATES) == 13 and len(set(mc.TEMPLATES)) == 13
    assert all(t.count("[MASK]") == 1 for t in mc.TEMPLATES)
    assert len(vpn.TEMPLATES) == 9 and all(t.count("[MASK]") == 1 for t in vpn.TEMPLATES)
    t = "Q: What is the color of [DESCRIPTOR] [ITEM]? A: It is [MASK]."
    assert mc.fill_template(t, "", "grass") == "Q: What is the color of grass? A: It is [MASK]."
    assert (
        mc.fill_template(t, "the inside of a", "kiwi")
        == "Q: What is the color of the inside of a kiwi? A: It is [MASK]."
    )
    assert vpn.fill_template(vpn.TEMPLATES[0], "an", "apple", "is") == "an apple is [MASK]."
    assert vpn.fill_template(vpn.TEMPLATES[0], "", "grass", "has") == "grass has [MASK]."
    with pytest.raises(DataError, match="exactly one"):
        mc.fill_template("[MASK] [ITEM] [MASK]", "", "x")


def test_single_wordpiece_and_one_mask_errors(scorer):
    with pytest.raises(DataError, match="'aquamarine'"):
        mc.single_wordpiece_ids(scorer.tokenizer, ["white", "aquamarine"])
    items = [{"descriptor": "", "item": "grass", "label": "green"}]
    with pytest.raises(DataError, match="aquamarine"):
        mc.run_memory_colors(scorer, items, mc.TEMPLATES[:1], colors=("green", "aquamarine"))
    with pytest.raises(DataError, match="exactly one"):
        encode_masked(scorer.tokenizer, ["no mask here."])
    with pytest.raises(DataError, match="exactly one"):
        scorer.mask_logits(["[MASK] and [MASK]."])


def test_bad_memory_colors_file(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"descriptor": "", "item": "sky", "label": "azure"}\n')
    with pytest.raises(DataError, match="azure"):
        mc.load_memory_colors(bad)
    bad.write_text('{"descriptor": "", "item": "sky"}\n')
    with pytest.raises(DataError, match="label"):
        mc.load_memory_colors(bad)


# ------------------------------------------------------------------------------------------ memory colors
@needs_real
def test_memory_colors_equals_direct_computation(scorer, tiny_bert_dir):
    items = mc.load_memory_colors(MC_REAL)[:12]
    templates = mc.TEMPLATES[:3]
    res = mc.run_memory_colors(scorer, items, templates)
    tok = scorer.tokenizer
    color_ids = [tok.convert_tokens_to_ids(c) for c in mc.COLORS]
    expected = []
    for template in templates:
        correct = 0
        for it in items:
            text = mc.fill_template(template, it["descriptor"], it["item"])
            logits = _direct_logits(tiny_bert_dir, tok, text)
            correct += mc.COLORS[int(logits[color_ids].argmax())] == it["label"]
        expected.append(correct / len(items))
    assert res["per_template"] == pytest.approx(dict(zip(templates, expected)))
    assert res["accuracy_mean"] == pytest.approx(statistics.fmean(expected))
    assert res["accuracy_sd"] == pytest.approx(statistics.stdev(expected))
    assert len(res["predictions"]) == len(items) * len(templates)


def test_sd_over_templates_published_ddof_on_a_hand_example(tmp_path):
    """Per-template accuracies 1/4, 2/4, 3/4, 4/4, ... (item i right under template k iff i < k % 4 + 1): the sd
    over templates is np.std(..., ddof=1) by default for Memory Colors (the seed's printed table, pandas .std()) and
    np.std(..., ddof=0) with sd_ddof=0 (its figure); run_probes / the CLI pick the published ddof per task."""
    from vl.data.collate import load_tokenizer
    from vl.eval.probes import run_probes

    tok = load_tokenizer("minilm")
    items = [{"descriptor": "", "item": f"thing{i}", "label": "red"} for i in range(4)]
    red, green = tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("green")
    right = {
        mc.fill_template(t, "", it["item"]): i < k % 4 + 1
        for k, t in enumerate(mc.TEMPLATES)
        for i, it in enumerate(items)
    }
    accuracies = [(k % 4 + 1) / 4 for k in range(len(mc.TEMPLATES))]

    class Fixed:
        tokenizer = tok

        def mask_logits(self, texts, image_embeds=None):
            rows = torch.zeros(len(texts), len(tok))
            for row, text in zip(rows, texts):
                row[red if right[text] else green] = 1.0
            return rows

    assert mc.template_sd([0.25, 0.5, 1.0], 0) == pytest.approx(np.std([0.25, 0.5, 1.0]), abs=1e-12)
    assert mc.template_sd([0.25, 0.5, 1.0], 1) == pytest.approx(np.std([0.25, 0.5, 1.0], ddof=1), abs=1e-12)
    assert mc.template_sd([0.25], 1) == 0.0 and mc.template_sd([0.25], 0) == 0.0
    res = mc.run_memory_colors(Fixed(), items)
    assert list(res["per_template"].values()) == pytest.approx(accuracies)
    assert res["accuracy_sd"] == pytest.approx(np.std(accuracies, ddof=1), abs=1e-12)
    assert mc.run_memory_colors(Fixed(), items, sd_ddof=0)["accuracy_sd"] == pytest.approx(np.std(accuracies))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    for ddof, want in ((None, np.std(accuracies, ddof=1)), (0, np.std(accuracies)), (1, np.std(accuracies, ddof=1))):
        results, _ = run_probes(
            "memory_colors",
            {"m": Fixed()},
            out_dir=tmp_path / str(ddof),
            data=data,
            random_baseline=False,
            sd_ddof=ddof,
        )
        assert results["m"]["accuracy_sd"] == pytest.approx(want, abs=1e-12)
    with pytest.raises(ConfigError, match="sd_ddof: 2"):
        run_probes("memory_colors", {"m": Fixed()}, out_dir=tmp_path, data=data, sd_ddof=2)
    assert mc.PUBLISHED_SD_DDOF == {"memory_colors": 1, "visual_property_norms": 0}


def test_random_baseline_memory_colors():
    items = [{"descriptor": "the", "item": f"thing{i}", "label": mc.COLORS[i % 11]} for i in range(200)]
    res = mc.run_memory_colors(RandomScorer(seed=3), items, mc.TEMPLATES[:2])
    assert 0.0 <= res["accuracy_mean"] <= 0.25  # chance = 1/11


# ------------------------------------------------------------------------------------------ AP
@pytest.mark.parametrize("seed", range(6))
def test_average_precision_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = (rng.random(n) < 0.2).astype(int)
    y[rng.integers(n)] = 1
    scores = rng.random(n) if seed % 2 else rng.integers(0, 5, n).astype(float)  # odd: ties
    assert vpn.average_precision(y, scores) == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    assert vpn.average_precision(torch.tensor(y), torch.tensor(scores)) == pytest.approx(
        average_precision_score(y, scores), abs=1e-12
    )


def test_average_precision_edge_cases():
    assert vpn.average_precision([1, 0, 0], [3.0, 2.0, 1.0]) == 1.0
    assert vpn.average_precision([0, 0, 1], [3.0, 2.0, 1.0]) == pytest.approx(1 / 3)
    assert np.isnan(vpn.average_precision([0, 0], [1.0, 2.0]))


# ------------------------------------------------------------------------------------------ VPN
NORMS = """concept_id\tconcept\tfeature\tfeature type\tpf\tfeature alternatives\tparticipant list
1\tapple\tis red\tvisual perceptual\t20\t\t
1\tapple\tis round\tvisual perceptual\t30\t\t
1\tapple\thas a stalk\tvisual perceptual\t5\t\t
1\tapple\thas pips\tvisual perceptual\t12\t\t
1\tapple\tis dark green\tvisual perceptual\t10\t\t
1\tapple\tis tasty\ttaste\t25\t\t
1\tapple\tis green\tvisual perceptual\t2\t\t
2\tkettle\tmade of metal\tvisual perceptual\t18\t\t
2\tkettle\thas a handle\tvisual perceptual\t12\t\t
2\tkettle\thas a lid\tvisual perceptual\t31\t\t
2\tkettle\thas a spout\tvisual perceptual\t9\t\t
2\tkettle\tis shiny\tvisual perceptual\t4\t\t
3\tcar_(vehicle)\thas wheels\tvisual perceptual\t25\t\t
4\tsheep\tis black_white\tvisual perceptual\t7\tis white; is black\tp 1 2 3 / 4
4\tsheep\thas fur_wool\tvisual perceptual\t6\thas wool; is furry\tp 1 / 2 3
4\tsheep\tis big_large\tvisual perceptual\t3\tis huge; is large\tp 1 2 / 3
"""


@pytest.fixture()
def vpn_data(tmp_path, scorer):
    (tmp_path / "norms.dat").write_text(NORMS)
    (tmp_path / "descriptors.csv").write_text("concept,descriptor\napple,an\nkettle,a\ncar_(vehicle),a\nsheep,a\n")
    counts = vpn.build_vpn_queries(tmp_path / "norms.dat", tmp_path / "descriptors.csv", scorer.tokenizer, tmp_path)
    return tmp_path, counts


def test_vpn_builder(vpn_data):
    root, counts = vpn_data
    labels = vpn.load_labels(root / "labels.txt")
    # tasty: not visual; pips / spout: not one wordpiece; "dark green": two words. Alternatives, as the seed:
    # "is black_white" -> the most given "is white" (3 vs 1 participants); "has fur_wool" -> "is furry" (2 vs 1)
    # -> replaced by "has fur"; "is big_large" -> "is huge" is not one of its spellings -> the first part "is big"
    assert labels == [
        "big",
        "fur",
        "green",
        "handle",
        "lid",
        "metal",
        "red",
        "round",
        "shiny",
        "stalk",
        "wheels",
        "white",
    ]
    rows = vpn.load_queries(root / "queries" / "template_0_pf_2.jsonl")
    by_key = {(r["concept"], r["feature_starter"]): r for r in rows}
    assert set(by_key) == {
        ("apple", "is"),
        ("apple", "has a"),
        ("kettle", "is made of"),
        ("kettle", "has a"),
        ("kettle", "is"),
        ("car_(vehicle)", "has"),
        ("sheep", "is"),
        ("sheep", "has"),
    }
    assert by_key[("sheep", "is")]["labels"] == ["big", "white"] and by_key[("sheep", "has")]["labels"] == ["fur"]
    assert by_key[("apple", "is")]["labels"] == ["green", "red", "round"]
    assert by_key[("apple", "is")]["query"] == "an apple is [MASK]."
    assert by_key[("kettle", "is made of")]["query"] == "a kettle is made of [MASK]."
    assert set(by_key[("apple", "is")]) == {"query", "labels", "concept", "query_template", "feature_starter", "pf"}
    pf30 = vpn.load_queries(root / "queries" / "template_0_pf_30.jsonl")
    assert {(r["concept"], tuple(r["labels"])) for r in pf30} == {("apple", ("round",)), ("kettle", ("lid",))}
    assert counts["template_8_pf_30"] == 2 and len(list((root / "queries").glob("*.jsonl"))) == 45
    last = vpn.load_queries(root / "queries" / "template_8_pf_5.jsonl")
    assert {r["query"] for r in last} >= {
        "describe the properties of a sheep. a sheep usually is [MASK].",
        "describe the properties of a car (vehicle). a car (vehicle) usually has [MASK].",
    }
    (root / "alt.dat").write_text("concept\tfeature\tfeature type\tpf\nsheep\tis black_white\tvisual perceptual\t3\n")
    with pytest.raises(DataError, match="alt.dat:2.*black_white.*feature alternatives"):
        vpn.build_vpn_queries(root / "alt.dat", root / "descriptors.csv", None, root / "out")
    with pytest.raises(DataError, match="feature type"):
        (root / "bad.dat").write_text("concept\tfeature\tpf\nx\tis red\t3\n")
        vpn.build_vpn_queries(root / "bad.dat", root / "descriptors.csv", None, root / "out")
    (root / "twice.csv").write_text("concept,descriptor\napple,an\nsheep,a\napple,a\n")  # a later row replaced one
    with pytest.raises(DataError, match=r"twice\.csv:4: concept 'apple' is listed twice"):
        vpn.load_descriptors(root / "twice.csv")


def test_vpn_equals_direct_computation(vpn_data, scorer, tiny_bert_dir):
    """Default: the mean over all queries of a (pf, template), as the seed's `groupby([model, pf, query_template])`;
    `average="concept"`: each concept's queries averaged first."""
    root, _ = vpn_data
    labels = vpn.load_labels(root / "labels.txt")
    queries = [q for q in vpn.load_query_dir(root / "queries") if q["template"] in (0, 6) and q["pf"] in (2, 10)]
    res = vpn.run_visual_property_norms(scorer, queries, labels)
    res_concept = vpn.run_visual_property_norms(scorer, queries, labels, average="concept")
    tok = scorer.tokenizer
    label_ids = [tok.convert_tokens_to_ids(w) for w in labels]
    for pf in (2, 10):
        per_template, per_template_concept = {}, {}
        for template in (0, 6):
            concept_scores: dict[str, list[tuple[float, float]]] = {}
            for q in queries:
                if q["pf"] != pf or q["template"] != template:
                    continue
                logits = _direct_logits(tiny_bert_dir, tok, q["query"]).numpy()
                y = np.zeros(logits.shape[0])
                y[[tok.convert_tokens_to_ids(w) for w in q["labels"]]] = 1
                ym = np.array([w in q["labels"] for w in labels], dtype=int)
                concept_scores.setdefault(q["concept"], []).append(
                    (average_precision_score(y, logits), average_precision_score(ym, logits[label_ids]))
                )
            all_scores = [sc for v in concept_scores.values() for sc in v]
            per_template[template] = (np.mean([m[0] for m in all_scores]), np.mean([m[1] for m in all_scores]))
            means = [np.mean(v, axis=0) for v in concept_scores.values()]
            per_template_concept[template] = (np.mean([m[0] for m in means]), np.mean([m[1] for m in means]))
            key = (pf, vpn.TEMPLATES[template])
            for got, want in ((res, per_template), (res_concept, per_template_concept)):
                assert got["per_template"][key]["map"] == pytest.approx(want[template][0], abs=1e-5)
                assert got["per_template"][key]["masked_map"] == pytest.approx(want[template][1], abs=1e-5)
            assert res["per_template"][key]["n_queries"] == len(all_scores)
        masked = [v[1] for v in per_template.values()]
        assert res["per_pf"][pf]["masked_map_mean"] == pytest.approx(np.mean(masked), abs=1e-5)
        # the default sd is the seed's VPN figure's (seaborn ci="sd" = np.std, ddof=0)
        assert res["per_pf"][pf]["masked_map_sd"] == pytest.approx(np.std(masked), abs=1e-5)
    # the two averages differ on this data (concepts have different numbers of queries), so the test can tell them
    assert res["per_pf"][2]["masked_map_mean"] != pytest.approx(res_concept["per_pf"][2]["masked_map_mean"], abs=1e-6)


def test_vpn_averaging_on_a_hand_computed_example(tmp_path):
    """Two templates; under template T, concept A has 2 queries (masked AP 1 and 1/2), concept B one (AP 1/3); under
    T2 every query ranks its label first (AP 1). Over queries: T = (1 + 1/2 + 1/3) / 3 = 11/18; per concept:
    (3/4 + 1/3) / 2 = 13/24. pf mean over templates (11/18 + 1) / 2 = 29/36; sd over the two templates
    |1 - 11/18| / 2 = 7/36 with ddof=0 (the default: the seed's figure, np.std), |1 - 11/18| / sqrt(2) with ddof=1."""
    from vl.data.collate import load_tokenizer

    tok = load_tokenizer("minilm")
    labels = ["red", "green", "blue"]
    ids = {w: tok.convert_tokens_to_ids(w) for w in labels}

    def logits(order: list[str]) -> torch.Tensor:
        row = torch.zeros(len(tok))
        for rank, w in enumerate(order):
            row[ids[w]] = 3.0 - rank  # every label above the rest of the vocabulary
        return row

    table = {
        "t a is [MASK].": logits(["red", "green", "blue"]),
        "t a has [MASK].": logits(["red", "green", "blue"]),
        "t b is [MASK].": logits(["red", "green", "blue"]),
        "t2 a is [MASK].": logits(["red", "green", "blue"]),
        "t2 a has [MASK].": logits(["green", "red", "blue"]),
        "t2 b is [MASK].": logits(["blue", "red", "green"]),
    }

    class Fixed:
        tokenizer = tok

        def mask_logits(self, texts, image_embeds=None):
            return torch.stack([table[t] for t in texts])

    def q(text, concept, label, template):
        return {"query": text, "labels": [label], "concept": concept, "pf": 2, "query_template": template}

    queries = [
        q("t a is [MASK].", "a", "red", "T"),
        q("t a has [MASK].", "a", "green", "T"),
        q("t b is [MASK].", "b", "blue", "T"),
        q("t2 a is [MASK].", "a", "red", "T2"),
        q("t2 a has [MASK].", "a", "green", "T2"),
        q("t2 b is [MASK].", "b", "blue", "T2"),
    ]
    by_query = vpn.run_visual_property_norms(Fixed(), queries, labels)
    by_concept = vpn.run_visual_property_norms(Fixed(), queries, labels, average="concept")
    for key in ("masked_map", "map"):
        assert by_query["per_template"][(2, "T")][key] == pytest.approx(11 / 18, abs=1e-12)
        assert by_concept["per_template"][(2, "T")][key] == pytest.approx(13 / 24, abs=1e-12)
        assert by_query["per_template"][(2, "T2")][key] == pytest.approx(1.0, abs=1e-12)
    assert by_query["per_pf"][2]["masked_map_mean"] == pytest.approx(29 / 36, abs=1e-12)
    assert by_query["per_pf"][2]["masked_map_sd"] == pytest.approx(7 / 36, abs=1e-12)
    assert np.std([11 / 18, 1.0]) == pytest.approx(7 / 36, abs=1e-12)  # the hand value is np.std's
    sample = vpn.run_visual_property_norms(Fixed(), queries, labels, sd_ddof=1)
    assert sample["per_pf"][2]["masked_map_sd"] == pytest.approx((7 / 18) / 2**0.5, abs=1e-12)
    assert sample["per_pf"][2]["map_sd"] == pytest.approx(np.std([11 / 18, 1.0], ddof=1), abs=1e-12)
    assert (
        by_query["per_template"][(2, "T")]["n_queries"] == 3 and by_query["per_template"][(2, "T")]["n_concepts"] == 2
    )
    with pytest.raises(ValueError, match="average"):
        vpn.run_visual_property_norms(Fixed(), queries, labels, average="mean")
    with pytest.raises(ConfigError, match="sd_ddof: 2"):
        vpn.run_visual_property_norms(Fixed(), queries, labels, sd_ddof=2)
    # run_probes (the CLI and evaluate.py) default to the published VPN sd, ddof=0
    from vl.eval.probes import run_probes

    (tmp_path / "q.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    for ddof, want in ((None, 7 / 36), (1, (7 / 18) / 2**0.5)):
        results, _ = run_probes(
            "visual_property_norms",
            {"f": Fixed()},
            out_dir=tmp_path / f"out{ddof}",
            queries=tmp_path / "q.jsonl",
            labels=tmp_path / "labels.txt",
            random_baseline=False,
            sd_ddof=ddof,
        )
        assert results["f"]["per_pf"][2]["masked_map_sd"] == pytest.approx(want, abs=1e-12)

    class Wider(Fixed):  # an MLM head one row wider than the tokenizer: the seed's notebook asserts equal widths
        def mask_logits(self, texts, image_embeds=None):
            rows = super().mask_logits(texts, image_embeds)
            return torch.cat([rows, torch.zeros(len(rows), 1)], 1)

    with pytest.raises(ConfigError, match=rf"MLM head scores {len(tok) + 1} tokens, its tokenizer has {len(tok)}"):
        vpn.run_visual_property_norms(Wider(), queries, labels)


# ------------------------------------------------------------------------------------------ checkpoint scorer
def _write_run(run: Path, *, use_image: bool = True, data_info: dict | None = None) -> Path:
    """A `vl` run dir with a tiny CLIP-BERT / `model=bert` (`use_image=False`) checkpoint (state_dict +
    hyper_parameters) and .hydra/config.yaml; returns the checkpoint path."""
    from hydra.utils import instantiate

    model_cfg = {
        "_target_": "vl.models.clip_bert.ClipBertSystem",
        "_recursive_": False,
        "_convert_": "all",  # as conf/model schemas: plain hyper-parameters, so the checkpoint loads weights-only
        "encoder": {
            "_target_": "vl.models.clip_bert.ClipBertEncoder",
            "text_encoder": {"hidden_size": 32, "num_heads": 2, "num_layers": 1, "intermediate_size": 64, "dropout": 0},
            "image_dim": 512,
            "use_image": use_image,
        },
        "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
        # an untrained model: with BERT's N(0, 0.02) head the image's small effect on it leaves every probe MAP
        # unchanged (logits move by ~6e-4), so the explicit rows would tie with the implicit ones
        "head_init": "torch",
    }
    cfg = OmegaConf.create(
        {"task_name": "clip_bert_tiny", "model": model_cfg, "data": {"tokenizer": "minilm"}, "trainer": {}}
    )
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    torch.manual_seed(0)
    system = instantiate(cfg.model, objectives=["mlm"], data_info={"clip_dim": 512} if data_info is None else data_info)
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def clip_bert_ckpt(tmp_path_factory) -> Path:
    """A `vl` run dir with a tiny CLIP-BERT checkpoint (state_dict + hyper_parameters) and .hydra/config.yaml."""
    return _write_run(tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": "red"}, r"q\.jsonl:2: field 'labels' is 'red', expected a non-empty list of words$"),
        ({"labels": []}, r"q\.jsonl:2: field 'labels' is \[\], expected a non-empty list of words$"),
        ({"pf": "x"}, r"q\.jsonl:2: field 'pf' is 'x', expected an integer \(production frequency\)$"),
        ({"labels": ["red", "mauve"]}, r"q\.jsonl:2: field 'labels' has \['mauve'\], not in .*labels\.txt$"),
    ],
)
def test_bad_vpn_query_lines_fail_before_any_model_scores(tmp_path, change, message):
    """`"labels": "red"`, `"pf": "x"` and a label missing from labels.txt passed `load_queries` and failed only after
    the first model was scored; now one line naming the file and line, before any scorer runs."""
    from vl.eval.probes import run_probes

    class Never:
        tokenizer = None

        def mask_logits(self, texts, image_embeds=None):
            raise AssertionError("a model was scored")

    good = {"query": "a is [MASK].", "labels": ["red"], "concept": "a", "pf": 2, "query_template": "T"}
    (tmp_path / "q.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps({**good, **change}) + "\n")
    (tmp_path / "labels.txt").write_text("red\ngreen\n")
    # the blank line is skipped, so the bad line is the file's line 3 but record 2: the message names the line
    message = message.replace("jsonl:2", "jsonl:3")
    with pytest.raises(DataError, match=message):
        run_probes(
            "visual_property_norms",
            {"m": Never()},
            out_dir=tmp_path / "out",
            queries=tmp_path / "q.jsonl",
            labels=tmp_path / "labels.txt",
            random_baseline=False,
        )


def test_a_vpn_query_file_name_without_integers_is_named(tmp_path):
    row = {"query": "a is [MASK].", "labels": ["red"], "concept": "a", "pf": 30, "query_template": "T"}
    (tmp_path / "template_0_pf_30.jsonl").write_text(json.dumps(row) + "\n")
    assert [(r["template"], r["pf"]) for r in vpn.load_query_dir(tmp_path)] == [(0, 30)]
    (tmp_path / "template_best_pf_30.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"template_best_pf_30\.jsonl: the name is not template_\{i\}_pf_\{pf\}\.jsonl"):
        vpn.load_query_dir(tmp_path)


def test_checkpoint_scorer_implicit_and_explicit(clip_bert_ckpt, tmp_path):
    from vl.eval.probes.scorers import ClipTextEmbedder
    from vl.tools.clip_extract import save_tiny_clip

    sc = CheckpointScorer(clip_bert_ckpt)
    texts = ["the sky is [MASK].", "Q: What is the color of grass? A: It is [MASK]."]
    got = sc.mask_logits(texts)
    assert got.shape == (2, 30522)
    system = sc.system
    for text, row in zip(texts, got):  # one text at a time, no padding: same logits
        enc = sc.tokenizer(text, return_tensors="pt")
        pos = (enc["input_ids"][0] == sc.tokenizer.mask_token_id).nonzero().item()
        with torch.no_grad():
            out = system.encoder(dict(enc))
            ref = system.objectives["mlm"].logits(out.text[0, pos])
        assert torch.allclose(row, ref, atol=1e-4)
    clip = ClipTextEmbedder(save_tiny_clip(tmp_path / "clip"))
    image = clip(texts)
    assert image.shape == (2, 512)
    explicit = sc.mask_logits(texts, image)
    assert not torch.allclose(explicit, got)
    with torch.no_grad():
        enc = sc.tokenizer(texts[:1], return_tensors="pt")
        pos = (enc["input_ids"][0] == sc.tokenizer.mask_token_id).nonzero().item()
        out = system.encoder({**enc, "clip_feats": image[:1, None]})
        assert torch.allclose(explicit[0], system.objectives["mlm"].logits(out.text[0, pos]), atol=1e-4)
    # the explicit memory-colors run feeds each query's CLIP text embedding
    items = [
        {"descriptor": "the", "item": "sky", "label": "blue"},
        {"descriptor": "", "item": "grass", "label": "green"},
    ]
    seen = []

    class Spy:
        tokenizer = sc.tokenizer

        def mask_logits(self, queries, image_embeds=None):
            seen.append((list(queries), image_embeds))
            return sc.mask_logits(queries, image_embeds)

    mc.run_memory_colors(Spy(), items, mc.TEMPLATES[:1], clip_text=clip)
    queries, emb = seen[0]
    assert torch.allclose(emb, clip(queries))


def test_explicit_variant_only_for_models_that_read_the_clip_image(clip_bert_ckpt, vpn_data, tmp_path):
    """The "-explicit" row exists only where the model really reads a CLIP image: `model=bert` (`use_image=False`)
    and CLIP-BERT built on text-only data (no `clip_dim`) ignore `clip_feats`, so they get one plain row and refuse
    image embeddings; CLIP-BERT gets implicit + explicit rows, and its explicit numbers differ from the implicit."""
    from vl.errors import ConfigError
    from vl.eval.probes import run_probes
    from vl.tools.clip_extract import save_tiny_clip

    root, _ = vpn_data
    clip_dir = save_tiny_clip(tmp_path / "clip")
    bert_ckpt = _write_run(tmp_path / "bert", use_image=False)
    text_only_ckpt = _write_run(tmp_path / "text_only", data_info={})
    scorers = {
        "bert": CheckpointScorer(bert_ckpt),
        "text_only": CheckpointScorer(text_only_ckpt),
        "clip_bert": CheckpointScorer(clip_bert_ckpt),
    }
    assert [s.accepts_image for s in scorers.values()] == [False, False, True]
    with pytest.raises(ConfigError, match="no image"):
        scorers["bert"].mask_logits(["the sky is [MASK]."], torch.zeros(1, 512))
    results, _ = run_probes(
        "visual_property_norms",
        scorers,
        out_dir=tmp_path / "out",
        queries=root / "queries",
        labels=root / "labels.txt",
        clip_model=clip_dir,
        random_baseline=False,
    )
    assert set(results) == {"bert", "text_only", "clip_bert-implicit", "clip_bert-explicit"}
    implicit = [v["masked_map"] for v in results["clip_bert-implicit"]["per_template"].values()]
    explicit = [v["masked_map"] for v in results["clip_bert-explicit"]["per_template"].values()]
    assert len(implicit) == len(explicit) > 0 and implicit != explicit


@needs_real
def test_evaluate_task_writes_report(clip_bert_ckpt, tmp_path):
    from vl.eval.tasks import TASKS, run_eval_task

    assert {"memory_colors", "visual_property_norms"} <= set(TASKS)
    task = OmegaConf.create({"_target_": "vl.eval.tasks.memory_colors", "_partial_": True, "data": str(MC_REAL)})
    cfg = OmegaConf.create({"task": task, "ckpt_path": str(clip_bert_ckpt), "seed": 1})
    run_cfg = OmegaConf.load(clip_bert_ckpt.parent.parent / ".hydra" / "config.yaml")
    metrics = run_eval_task(task, cfg=cfg, run_cfg=run_cfg, output_dir=tmp_path)
    assert "clip_bert_tiny/accuracy_mean" in metrics and "random/accuracy_mean" in metrics
    for ext in ("csv", "md", "png"):
        assert (tmp_path / f"memory_colors_results.{ext}").is_file()
    assert "clip_bert_tiny" in (tmp_path / "memory_colors_results.md").read_text()


def test_cli_compares_models_on_vpn(vpn_data, tiny_bert_dir, tmp_path, capsys):
    from vl.tools.probes import main

    root, _ = vpn_data
    out = tmp_path / "report"
    rc = main(
        [
            "--task",
            "visual_property_norms",
            "--queries",
            str(root / "queries"),
            "--labels",
            str(root / "labels.txt"),
            "--models",
            f"tiny={tiny_bert_dir}",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    import csv

    rows = list(csv.DictReader(open(out / "visual_property_norms_results.csv")))
    assert {r["model"] for r in rows} == {"tiny", "random"}
    assert {int(r["pf"]) for r in rows} == {2, 5, 10, 20, 30}
    assert (out / "visual_property_norms_results.png").stat().st_size > 0
    assert "masked MAP" in capsys.readouterr().out


@needs_real
def test_evaluate_entry_point_runs_memory_colors(clip_bert_ckpt, make_cfg):
    """`python evaluate.py task=memory_colors ckpt_path=... task.data=...` through `vl.pipeline.evaluate`."""
    from vl.pipeline import evaluate

    cfg = make_cfg(
        f"ckpt_path={clip_bert_ckpt}",
        "task=memory_colors",
        f"task.data={MC_REAL}",
        "task.random_baseline=false",
        name="eval_mc",
        config_name="evaluate",
        tiny=False,
    )
    metrics = evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    assert set(metrics) == {"clip_bert_tiny/accuracy_mean", "clip_bert_tiny/accuracy_sd"}
    assert (out / "memory_colors_results.png").is_file() and (out / "results.md").is_file()


def test_checkpoint_scorer_region_model_gets_masked_zero_region(tmp_path):
    """A region model (VisualBERT-style system) cannot run without visual keys: one zero region, visual_mask 0."""
    from hydra.utils import instantiate

    model_cfg = {
        "_target_": "vl.models.system.VLSystem",
        "_recursive_": False,
        "_convert_": "all",  # as conf/model schemas: plain hyper-parameters, so the checkpoint loads weights-only
        "encoder": {
            "_target_": "vl.models.single_stream.SingleStreamEncoder",
            "text_encoder": {"hidden_size": 32, "num_heads": 2, "num_layers": 1, "intermediate_size": 64, "dropout": 0},
        },
        "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
    }
    cfg = OmegaConf.create({"task_name": "vb", "model": model_cfg, "data": {"tokenizer": "minilm"}})
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    torch.manual_seed(0)
    system = instantiate(cfg.model, objectives=["mlm", "itm"], data_info={"visual_dim": 16})
    (tmp_path / "checkpoints").mkdir()
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, ckpt)
    sc = CheckpointScorer(ckpt)
    logits = sc.mask_logits(["the sky is [MASK].", "grass is [MASK] ."])
    assert logits.shape == (2, 30522) and sc._needs_visual is True
    enc = sc.tokenizer(["the sky is [MASK]."], return_tensors="pt")
    with torch.no_grad():
        out = sc.system.encoder(
            {
                **enc,
                "visual_feats": torch.ones(1, 1, 16) * 5,
                "visual_boxes": torch.rand(1, 1, 4),
                "visual_mask": torch.zeros(1, 1, dtype=torch.long),
            }
        )  # masked-out region content does not matter
        pos = (enc["input_ids"][0] == sc.tokenizer.mask_token_id).nonzero().item()
        assert torch.allclose(logits[0], sc.system.objectives["mlm"].logits(out.text[0, pos]), atol=1e-4)


# ------------------------------------------------------------------------------------------ LXMERT: the seed's dropout
def _seed_language_only_x_layer(config):
    """The seed's `LxmertLanguageOnlyXLayer` (`models/src/lxmert/alterations.py`), transcribed."""
    from transformers.models.lxmert.modeling_lxmert import LxmertXLayer

    class SeedLayer(LxmertXLayer):
        def forward(
            self, lang_feats, lang_attention_mask, visual_feats, visual_attention_mask, output_attentions=False
        ):
            lang_att_output = self.visual_attention.output(torch.zeros_like(lang_feats), lang_feats)
            lang_att_output, visual_att_output = self.self_att(
                lang_att_output, lang_attention_mask, torch.zeros_like(visual_feats), visual_attention_mask
            )
            return self.output_fc(lang_att_output, visual_att_output)

    return SeedLayer(config)


def _seed_vpn_lxmert(model_dir: Path):
    """The seed's Visual Property Norms notebook, LXMERT cell: `from_pretrained`, the encoder copied, fresh
    language-only x-layers, the copy's weights loaded; no `eval()` after it."""
    import copy

    from transformers import LxmertForPreTraining

    model = LxmertForPreTraining.from_pretrained(str(model_dir))
    prev_encoder = copy.deepcopy(model.lxmert.encoder)
    model.lxmert.encoder.x_layers = torch.nn.ModuleList(
        [_seed_language_only_x_layer(model.lxmert.encoder.config) for _ in range(model.lxmert.encoder.config.x_layers)]
    )
    model.lxmert.encoder.load_state_dict(prev_encoder.state_dict())
    return model


def test_vpn_lxmert_scores_with_the_seed_notebooks_dropout(vpn_data, tmp_path):
    """`lxmert_dropout="seed"` (default): the text-only LXMERT scores Visual Property Norms with dropout on in its
    cross-modality layers, as the seed's notebook (fresh layers after `from_pretrained`, no `eval()`): vl's logits equal
    that construction's under the same torch seed per batch; reproducible, the caller's random state untouched;
    Memory Colors (its notebook calls `eval()`) and `lxmert_dropout="off"` score in eval mode."""
    from transformers import LxmertForPreTraining

    from vl.eval.probes import run_probes
    from vl.eval.probes.scorers import build_scorer
    from vl.models.text_only import tiny_lxmert_config

    root, _ = vpn_data
    model_dir = tmp_path / "lxmert"
    torch.manual_seed(0)
    LxmertForPreTraining(tiny_lxmert_config()).save_pretrained(model_dir)
    scorer = build_scorer(f"lxmert:{model_dir}", name="lxmert")
    scorer.batch_size = 3
    texts = [r["query"] for r in vpn.load_queries(root / "queries" / "template_0_pf_2.jsonl")]
    assert len(texts) == 8  # three batches of 3, 3, 2

    seed_model = _seed_vpn_lxmert(model_dir)
    assert not seed_model.lxmert.embeddings.training and all(x.training for x in seed_model.lxmert.encoder.x_layers)
    expected = []
    with torch.no_grad():
        for i, start in enumerate(range(0, len(texts), 3)):
            enc = scorer.tokenizer(texts[start : start + 3], return_tensors="pt", padding=True)
            n = enc["input_ids"].shape[0]
            torch.manual_seed(11 + i)
            logits = seed_model(
                **enc, visual_feats=torch.zeros(n, 1, 2048), visual_pos=torch.zeros(n, 1, 4)
            ).prediction_logits
            pos = (enc["input_ids"] == scorer.tokenizer.mask_token_id).long().argmax(1)
            expected.append(logits[torch.arange(n), pos])
    expected = torch.cat(expected)
    seed_model.eval()
    with torch.no_grad():
        enc = scorer.tokenizer(texts, return_tensors="pt", padding=True)
        n = enc["input_ids"].shape[0]
        logits = seed_model(
            **enc, visual_feats=torch.zeros(n, 1, 2048), visual_pos=torch.zeros(n, 1, 4)
        ).prediction_logits
        pos = (enc["input_ids"] == scorer.tokenizer.mask_token_id).long().argmax(1)
        eval_mode = logits[torch.arange(n), pos]

    scorer.set_cross_dropout(True, seed=11)
    state = torch.get_rng_state()
    got = scorer.mask_logits(texts)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is where it was
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - eval_mode).abs().max() > 1e-3  # dropout is really on
    scorer.set_cross_dropout(True, seed=11)
    assert torch.equal(scorer.mask_logits(texts), got)  # reproducible
    scorer.set_cross_dropout(False)
    assert torch.allclose(scorer.mask_logits(texts), eval_mode, atol=1e-5)

    # run_probes: on for Visual Property Norms by default, off with lxmert_dropout="off" and for Memory Colors
    common = dict(queries=root / "queries", labels=root / "labels.txt", random_baseline=False, seed=11)
    first, _ = run_probes("visual_property_norms", {"lxmert": scorer}, out_dir=tmp_path / "a", **common)
    assert scorer.cross_dropout and all(x.training for x in scorer.model.model.lxmert.encoder.x_layers)
    again, _ = run_probes("visual_property_norms", {"lxmert": scorer}, out_dir=tmp_path / "b", **common)
    assert first == again
    off, _ = run_probes(
        "visual_property_norms", {"lxmert": scorer}, out_dir=tmp_path / "c", lxmert_dropout="off", **common
    )
    assert not scorer.cross_dropout and not any(m.training for m in scorer.model.modules())
    assert off != first
    items = tmp_path / "mc.jsonl"
    items.write_text('{"item": "banana", "descriptor": "a", "label": "yellow"}\n')
    scorer.set_cross_dropout(True)
    run_probes("memory_colors", {"lxmert": scorer}, out_dir=tmp_path / "d", data=items, random_baseline=False)
    assert not scorer.cross_dropout
    with pytest.raises(ConfigError, match="lxmert_dropout"):
        run_probes("visual_property_norms", {"lxmert": scorer}, out_dir=tmp_path / "e", lxmert_dropout="on", **common)
