"""VCR: format readers on the real sample, text conversion, errors, the embedded-corpus writer, the data module
contract (labelled 2-block and unlabelled 5-block layouts) and the leaderboard CSV."""

from __future__ import annotations

import collections
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from vl.data.formats.vcr import (
    SUBMISSION_COLUMNS,
    image_int_id,
    load_metadata,
    load_names_table,
    load_vcr_jsonl,
    person_names,
    record_texts,
    token_detections,
    tokens_to_text,
    write_vcr_submission,
)
from vl.data.scenes import SceneSettings, generate_scenes
from vl.data.scenes.writers.vcr import write_vcr_corpus
from vl.data.vcr import VCRDataModule, VCRQuestions
from vl.errors import DataError

REAL = Path(os.environ.get("VL_REAL_SAMPLES") or Path(__file__).resolve().parents[2].parent / "shared" / "real_samples")
REAL_VCR = REAL / "vcr"
needs_real = pytest.mark.skipif(not (REAL_VCR / "val_sample.jsonl").is_file(), reason=f"no VCR sample at {REAL_VCR}")


def _record(**over) -> dict:
    rec = {
        "question": ["What", "is", [0], "doing", "?"],
        "answer_choices": [[[0], "runs", "."], [[1], "sits", "."], ["nothing", "."], [[0, 1], "talk", "."]],
        "rationale_choices": [["r", str(i), "."] for i in range(4)],
        "answer_label": 0,
        "rationale_label": 2,
        "img_id": "val-5",
        "annot_id": "val-0",
        "img_fn": "d/x.jpg",
        "metadata_fn": "d/x.json",
        "objects": ["person", "dog"],
    }
    rec.update(over)
    return rec


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------------------ real sample


@needs_real
def test_real_sample_reads_and_converts() -> None:
    (rec,) = load_vcr_jsonl(REAL_VCR / "val_sample.jsonl")
    names = load_names_table(REAL_VCR / "unisex_names_table.csv")
    assert names[:2] == ["Casey", "Riley"] and len(names) > 900
    meta = load_metadata(REAL_VCR / "vcr1images" / rec["metadata_fn"])
    assert meta["names"] == rec["objects"] and meta["boxes"].shape == (len(rec["objects"]), 5)
    assert meta["width"] > 0 and meta["height"] > 0
    assert image_int_id(rec["img_id"]) == 1_000_000 + int(rec["img_id"].split("-")[1])

    texts = record_texts(rec, names)
    assert record_texts(rec, names) == texts  # deterministic per record
    mapping = person_names(rec["objects"], names, rec["annot_id"])
    assert sorted(mapping) == [i for i, o in enumerate(rec["objects"]) if o == "person"]
    assert set(mapping.values()) <= set(names)
    name0 = mapping[0]
    # question ["Does", [0], "live", ...]: [0] is a person -> the same name in question, answers and rationales
    assert texts["question"] == f"Does {name0} live in this house ?"
    assert texts["answers"][2] == f"No , {name0} is a visitor ."
    assert texts["answers"][3] == f"No {mapping[1]} does not belong here ."
    assert texts["rationales"][3].startswith(f"{name0} is wearing outerwear")
    assert texts["detections"] == [0, 1, 2]
    assert all("[" not in t for t in [texts["question"], *texts["answers"], *texts["rationales"]])
    # a non-person detection keeps its class name; a list's names follow each other (ViLBERT: no "and")
    assert tokens_to_text(["see", [0, 3, 5]], rec["objects"], mapping) == f"see {name0} car clock"


def test_text_helpers() -> None:
    objects = ["person", "dog", "person"]
    mapping = person_names(objects, ["A", "B", "C"], "k-1", "distinct")
    assert sorted(mapping) == [0, 2] and mapping[0] != mapping[2]
    assert mapping == person_names(objects, ["A", "B", "C"], "k-1", "distinct")
    assert person_names(objects, ["A", "B", "C"], "k-1") == person_names(objects, ["A", "B", "C"], "k-1")
    assert person_names(["dog"], [], "x") == {}
    assert tokens_to_text([[1], "barks", "at", [0, 2]], objects, {0: "Ann", 2: "Bo"}) == "dog barks at Ann Bo"
    assert token_detections([[2], "x", [0, 2], [1]]) == [2, 0, 1]
    # more persons than names: repeats allowed
    assert len(person_names(["person"] * 3, ["Z"], "k")) == 3


def test_image_int_id() -> None:
    assert image_int_id("train-123") == 123
    assert image_int_id("val-0") == 1_000_000
    assert image_int_id("test-7") == 2_000_007
    for bad in ("dev-1", "train", "train-x", "train--1", "val-1000000", "123"):
        with pytest.raises(ValueError):
            image_int_id(bad)


# ----------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"answer_choices": [[[0], "runs"], [[2], "x"], ["a"], ["b"]]}, r":2: field 'answer_choices' choice 1 .*2"),
        ({"question": ["who", [5]]}, r":2: field 'question' token 1 refers to detection 5"),
        ({"rationale_choices": [["a"]] * 3}, r":2: field 'rationale_choices' has 3 choices"),
        ({"answer_label": 4}, r":2: field 'answer_label'"),
        ({"img_id": "dev-3"}, r":2: field 'img_id'"),
        ({"objects": "person"}, r":2: field 'objects'"),
        ({"question": ["a", ["0"]]}, r":2: field 'question' token 1"),
        ({"annot_id": "val-0"}, r":2: field 'annot_id' 'val-0' repeats line 1"),
    ],
)
def test_load_vcr_jsonl_errors(tmp_path: Path, over: dict, match: str) -> None:
    path = _write_jsonl(tmp_path / "v.jsonl", [_record(), _record(**{"annot_id": "val-1", **over})])
    with pytest.raises(DataError, match=match) as e:
        load_vcr_jsonl(path)
    assert str(e.value).startswith(str(path))


def test_answer_label_without_rationale_label_is_named(tmp_path: Path) -> None:
    """A record with `answer_label` but no `rationale_label` gave QA->R the label -1, which the choice head drops from
    the loss: QA->R never trained, silently. Refused on the line, as the opposite case is."""
    answer_only = _record(annot_id="val-1")
    del answer_only["rationale_label"]
    path = _write_jsonl(tmp_path / "v.jsonl", [_record(), answer_only])
    with pytest.raises(
        DataError, match=r"v\.jsonl:2: field 'rationale_label' is missing while 'answer_label' is given$"
    ):
        load_vcr_jsonl(path)
    rationale_only = _record(annot_id="val-1")
    del rationale_only["answer_label"]
    path = _write_jsonl(tmp_path / "v.jsonl", [_record(), rationale_only])
    with pytest.raises(DataError, match=r"v\.jsonl:2: field 'rationale_label' is given without 'answer_label'$"):
        load_vcr_jsonl(path)


def test_format_reader_errors(tmp_path: Path) -> None:
    rec = _record()
    del rec["objects"]
    path = _write_jsonl(tmp_path / "v.jsonl", [rec])
    with pytest.raises(DataError, match=r"v.jsonl:1: missing field 'objects'"):
        load_vcr_jsonl(path)
    with pytest.raises(DataError, match="file not found"):
        load_vcr_jsonl(tmp_path / "none.jsonl")
    # a test record has no labels
    rec = _record()
    del rec["answer_label"], rec["rationale_label"]
    assert load_vcr_jsonl(_write_jsonl(tmp_path / "t.jsonl", [rec]))[0]["annot_id"] == "val-0"

    (tmp_path / "names.csv").write_text("id,first\n1,Ann\n")
    with pytest.raises(DataError, match=r"names.csv:1: .*'name'"):
        load_names_table(tmp_path / "names.csv")
    (tmp_path / "names.csv").write_text('"","name"\n"1","Ann"\n"2",""\n')
    with pytest.raises(DataError, match=r"names.csv:3: column 1"):
        load_names_table(tmp_path / "names.csv")

    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"names": ["a"], "boxes": [[0, 0, 1, 1, 0.9]], "width": 4}))
    with pytest.raises(DataError, match=r"m.json: missing field 'height'"):
        load_metadata(meta)
    meta.write_text(json.dumps({"names": ["a", "b"], "boxes": [[0, 0, 1, 1]], "width": 4, "height": 3}))
    with pytest.raises(DataError, match=r"'boxes' has 1 rows but 'names' has 2"):
        load_metadata(meta)
    meta.write_text(json.dumps({"names": ["a"], "boxes": [[0, 0, 1, 1]], "width": 4, "height": 3}))
    assert load_metadata(meta)["boxes"].shape == (1, 4)


# ---------------------------------------------------------------------------------------------- embedded corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list[Path]]:
    root = tmp_path_factory.mktemp("vcr_corpus")
    settings = SceneSettings(num_images=60)
    scenes = generate_scenes(settings)
    written = write_vcr_corpus(root, scenes, settings)
    return root, scenes, written


def test_corpus_files(corpus) -> None:
    root, scenes, written = corpus
    assert all(p.is_file() for p in written)
    rel = {p.relative_to(root).as_posix() for p in written}
    assert {"vcr/train.jsonl", "vcr/val.jsonl", "vcr/test.jsonl", "vcr/unisex_names_table.csv"} <= rel
    assert "vcr/regions.lmdb/data.mdb" in rel
    assert len([r for r in rel if r.startswith("vcr/vcr1images/")]) == len(scenes)
    names = load_names_table(root / "vcr" / "unisex_names_table.csv")
    assert 15 <= len(names) <= 30
    by_id = {sc.image_id: sc for sc in scenes}
    labels = []
    for split in ("train", "val", "test"):
        records = load_vcr_jsonl(root / "vcr" / f"{split}.jsonl")
        assert records, split
        for rec in records:
            assert rec["img_id"].startswith(f"{split}-") and rec["annot_id"].startswith(f"{split}-")
            scene = by_id[int(rec["img_id"].split("-")[1])]
            assert scene.split == split
            meta = load_metadata(root / "vcr" / "vcr1images" / rec["metadata_fn"])
            assert meta["names"] == rec["objects"] and meta["boxes"].shape == (len(scene.shapes), 5)
            (k,) = token_detections(rec["question"])
            shape = scene.shapes[k]
            # the gold answer and rationale are true of the scene; the gold rationale agrees with the gold answer
            assert shape.colour in rec["answer_choices"][rec["answer_label"]]
            gold_r = rec["rationale_choices"][rec["rationale_label"]]
            assert shape.colour in gold_r and shape.position in gold_r
            assert sum(shape.colour in r for r in rec["answer_choices"]) == 1
            assert sum(shape.colour in r and shape.position in r for r in rec["rationale_choices"]) == 1
            labels.append((rec["answer_label"], rec["rationale_label"]))
    assert {a for a, _ in labels} == {0, 1, 2, 3} and {r for _, r in labels} == {0, 1, 2, 3}


def test_datamodule_contract(corpus) -> None:
    root, scenes, _ = corpus
    dm = VCRDataModule(root=str(root))
    dm.prepare_data()
    assert dm.info == {"visual_dim": 2048, "num_choices": 4, "mc_blocks": ["vcr_qa", "vcr_qar"]}
    dm.setup()
    saw_name = False
    for split in ("train", "val", "test"):
        data = dm.datasets[split]
        records = load_vcr_jsonl(root / "vcr" / f"{split}.jsonl")
        assert len(data) == len(records) > 0 and data.has_labels
        for i in range(len(data)):
            ex = data[(3, i)] if i % 2 else data[i]
            rec = records[i]
            assert ex["annot_id"] == rec["annot_id"] and ex["example_id"] == ex["index"] == i
            assert ex["epoch"] == (3 if i % 2 else 0)
            a, r = rec["answer_label"], rec["rationale_label"]
            choices = ex["choices"]
            assert all(set(c) == {"text", "text_b"} for c in choices)
            # the Q->A rows and the QA->R rows named by their own draws, as the seed's two task datasets
            qa, qar = (record_texts(rec, dm.names, task=t) for t in ("Q-A", "QA-R"))
            q = choices[0]["text"]
            assert all(c["text"] == qa["question"] for c in choices[:4])
            assert [c["text_b"] for c in choices[:4]] == qa["answers"]
            if split == "test":  # every answer's QA->R block (a complete leaderboard file); labelled under the gold
                assert ex["mc_labels"] == [a] + [r if i == a else -1 for i in range(4)] and len(choices) == 20
                assert all(
                    c["text"] == f"{qar['question']} [SEP] {qar['answers'][i // 4]}" for i, c in enumerate(choices[4:])
                )
            else:
                assert ex["mc_labels"] == [a, r] and len(choices) == 8
                assert all(c["text"] == f"{qar['question']} [SEP] {qar['answers'][a]}" for c in choices[4:])
            assert [c["text_b"] for c in choices[4:8]] == qar["rationales"]
            visual = ex["visual"]
            assert visual["features"].shape[1] == 2048 and visual["cls_prob"] is not None
            assert int(visual["image_id"]) == image_int_id(rec["img_id"])
            if "person" in rec["objects"] and rec["objects"][token_detections(rec["question"])[0]] == "person":
                assert "person" not in q
                assert any(n in q for n in dm.names)
                saw_name = True
    assert saw_name
    assert dm.metadata("val", 0)["names"] == dm.datasets["val"].records[0]["objects"]
    assert dm.baselines("test") == pytest.approx(
        {
            "test/vcr_qa_acc_chance": 0.25,
            "test/vcr_qar_acc_chance": 0.25,
            "test/vcr_q2ar_acc_chance": 0.0625,
            "test/vcr_qa_acc_longest": 0.25,
            "test/vcr_qar_acc_longest": 0.25,
            "test/vcr_q2ar_acc_longest": 0.0625,
        }
    )


def test_unlabelled_layout(corpus) -> None:
    root, _, _ = corpus
    dm = VCRDataModule(root=str(root))
    records = [dict(r) for r in load_vcr_jsonl(root / "vcr" / "test.jsonl")]
    for r in records:
        del r["answer_label"], r["rationale_label"]
    data = VCRQuestions(records, dm.regions, dm.names, has_labels=False)
    ex = data[0]
    texts = record_texts(records[0], dm.names, task="QA-R")
    assert ex["mc_labels"] == [-1] * 5 and len(ex["choices"]) == 20
    for a in range(4):
        for r in range(4):
            row = ex["choices"][4 + 4 * a + r]
            assert row == {
                "text": f"{texts['question']} [SEP] {texts['answers'][a]}",
                "text_b": texts["rationales"][r],
            }


def test_qa_to_r_row_tokenises_as_question_sep_answer_then_rationale(corpus) -> None:
    """vilbert-multi-task QA->R input: tokens_a = question + [SEP] + answer, tokens_b = rationale, i.e.
    `[CLS] q [SEP] a [SEP] r [SEP]` with segment 0 up to the second [SEP] (built here by hand from the tokenizer)."""
    root, _, _ = corpus
    dm = VCRDataModule(root=str(root), max_text_len=128)
    dm.setup("fit")
    ex = dm.datasets["train"][0]
    rec = dm.datasets["train"].records[0]
    texts = record_texts(rec, dm.names, task="QA-R")
    batch = dm.collator("train")([ex])
    tok = dm.tokenizer
    row = 4 + int(rec["rationale_label"])  # a QA->R row of the first example
    q, a = tok.tokenize(texts["question"]), tok.tokenize(texts["answers"][rec["answer_label"]])
    r = tok.tokenize(texts["rationales"][rec["rationale_label"]])
    tokens_a = ["[CLS]", *q, "[SEP]", *a, "[SEP]"]
    expected = tok.convert_tokens_to_ids([*tokens_a, *r, "[SEP]"])
    n = len(expected)
    assert batch["input_ids"][row, :n].tolist() == expected
    assert batch["token_type_ids"][row, :n].tolist() == [0] * len(tokens_a) + [1] * (len(r) + 1)
    assert batch["attention_mask"][row].sum() == n


def test_gt_regions_merge_after_the_detections(corpus) -> None:
    """`gt_features`: the GT-box regions follow the detections, kept first when `max_regions` cuts (as upstream)."""
    root, _, _ = corpus
    plain = VCRDataModule(root=str(root), max_regions=10)
    merged = VCRDataModule(root=str(root), max_regions=10, gt_features="vcr/regions.lmdb")  # any region file
    plain.setup("fit"), merged.setup("fit")
    rec = plain.datasets["train"].records[0]
    dets = plain.regions[str(image_int_id(rec["img_id"]))]
    n = int(dets["features"].shape[0])
    n_gt = min(n, 10)
    n_det = min(n, 10 - n_gt)
    got = merged.datasets["train"][0]["visual"]
    want = np.concatenate([dets["features"][:n_det], dets["features"][:n_gt]])
    np.testing.assert_array_equal(got["features"], want)
    assert got["num_boxes"] == n_det + n_gt
    assert "vcr/regions.lmdb" in {p.relative_to(root).as_posix() for p in merged.required_files()}


def _copy_root(src: Path, dst: Path) -> Path:
    (dst / "vcr").mkdir(parents=True)
    for name in ("vcr1images", "unisex_names_table.csv", "regions.lmdb", "train.jsonl", "val.jsonl", "test.jsonl"):
        os.symlink(src / "vcr" / name, dst / "vcr" / name)
    return dst


def test_datamodule_errors(corpus, tmp_path: Path) -> None:
    root, _, _ = corpus
    bad = _copy_root(root, tmp_path / "r")
    records = load_vcr_jsonl(root / "vcr" / "val.jsonl")

    (bad / "vcr" / "val.jsonl").unlink()
    _write_jsonl(bad / "vcr" / "val.jsonl", [{**records[0], "img_id": "val-999999"}])
    dm = VCRDataModule(root=str(bad))
    with pytest.raises(DataError, match=r"regions.lmdb: no region features .*field 'img_id' 'val-999999'.*val.jsonl"):
        dm.setup("validate")

    (bad / "vcr" / "val.jsonl").unlink()
    unlabelled = {k: v for k, v in records[1].items() if k not in ("answer_label", "rationale_label")}
    _write_jsonl(bad / "vcr" / "val.jsonl", [records[0], unlabelled])
    with pytest.raises(DataError, match=r"val.jsonl: field 'answer_label' is present in some records"):
        VCRDataModule(root=str(bad)).setup("validate")

    (bad / "vcr" / "val.jsonl").unlink()
    answer_only = {k: v for k, v in records[1].items() if k != "rationale_label"}
    _write_jsonl(bad / "vcr" / "val.jsonl", [records[0], answer_only])
    with pytest.raises(
        DataError, match=r"val.jsonl:2: field 'rationale_label' is missing while 'answer_label' is given"
    ):
        VCRDataModule(root=str(bad)).setup("validate")

    (bad / "vcr" / "val.jsonl").unlink()
    _write_jsonl(bad / "vcr" / "val.jsonl", [{**records[0], "question": ["is", [9], "?"]}])
    with pytest.raises(DataError, match=r"val.jsonl:1: field 'question' token 1 refers to detection 9"):
        VCRDataModule(root=str(bad)).setup("validate")

    (bad / "vcr" / "regions.lmdb").unlink()
    with pytest.raises(DataError, match=r"regions.lmdb: file not found"):
        VCRDataModule(root=str(bad)).prepare_data()


# ----------------------------------------------------------------------------------------------------- submission


def test_submission_csv(tmp_path: Path) -> None:
    preds = [
        {"annot_id": "test-10", "answer_probs": [0.1, 0.2, 0.3, 0.4], "rationale_probs": np.eye(4).tolist()},
        {"annot_id": "test-2", "answer_probs": [0.25] * 4, "rationale_probs": [0.7, 0.1, 0.1, 0.1]},
    ]
    path = write_vcr_submission(preds, tmp_path / "sub.csv")
    rows = list(csv.reader(path.open()))
    assert rows[0] == list(SUBMISSION_COLUMNS) and len(rows[0]) == 21
    assert rows[0][:6] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3", "rationale_conditioned_on_a0_0"]
    assert rows[0][-1] == "rationale_conditioned_on_a3_3"
    assert [r[0] for r in rows[1:]] == ["test-2", "test-10"]  # numeric order within the split
    gold_only = [float(x) for x in rows[1][5:]]
    assert gold_only == [0.7, 0.1, 0.1, 0.1] * 4  # gold-conditioned probs repeated for every answer
    assert [float(x) for x in rows[2][1:5]] == [0.1, 0.2, 0.3, 0.4]
    assert [float(x) for x in rows[2][5:]] == np.eye(4).reshape(-1).tolist()
    dm = VCRDataModule(root=str(tmp_path))
    assert dm.write_predictions(preds[:1], tmp_path / "b.csv").read_text().count("\n") == 2
    with pytest.raises(ValueError, match="rationale_probs has shape"):
        write_vcr_submission([{**preds[0], "rationale_probs": [[0.5] * 4] * 2}], tmp_path / "c.csv")


def test_person_names_are_drawn_as_the_seed_draws_them() -> None:
    """vilbert_beta's `generate_random_name` draws `random.choice(names)` for every person detection on its own, so two
    persons of a record share a name with probability 1 / len(names) and each name is equally likely: the default
    ("independent") draws so, over 3000 records (annot ids) of 2 persons and a 3-name table; "distinct" never repeats.
    Binomial bounds at ~5 standard deviations."""
    names, objects, n = ["A", "B", "C"], ["person", "car", "person"], 3000
    draws = [person_names(objects, names, f"val-{k}") for k in range(n)]
    same = sum(d[0] == d[2] for d in draws)
    sd = (n * (1 / 3) * (2 / 3)) ** 0.5
    assert abs(same - n / 3) < 5 * sd
    first = collections.Counter(d[0] for d in draws)
    assert all(abs(first[name] - n / 3) < 5 * sd for name in names)
    distinct = [person_names(objects, names, f"val-{k}", "distinct") for k in range(200)]
    assert all(d[0] != d[2] for d in distinct)
    with pytest.raises(ValueError, match="person names: 'unique'"):
        person_names(objects, names, "k", "unique")


def test_person_names_option_of_the_data_module(corpus) -> None:
    from vl.errors import ConfigError

    root, _, _ = corpus
    for draw in ("independent", "distinct"):
        dm = VCRDataModule(
            root=str(root), max_text_len=128, **({} if draw == "independent" else {"person_names": draw})
        )
        dm.setup("fit")
        data = dm.datasets["train"]
        for i in range(len(data.records)):
            texts = record_texts(data.records[i], dm.names, draw, task="Q-A")
            assert data[i]["choices"][0]["text"] == texts["question"]
    with pytest.raises(ConfigError, match="data.person_names: 'unique'"):
        VCRDataModule(person_names="unique")
    dm = VCRDataModule(root=str(root), max_text_len=128, person_names_per="record")  # vl's earlier rule
    dm.setup("fit")
    data = dm.datasets["train"]
    for i in range(len(data.records)):
        texts = record_texts(data.records[i], dm.names)
        rec = data.records[i]
        assert data[i]["choices"][0]["text"] == texts["question"]
        assert data[i]["choices"][4]["text"] == f"{texts['question']} [SEP] {texts['answers'][rec['answer_label']]}"
    with pytest.raises(ConfigError, match="data.person_names_per: 'question'"):
        VCRDataModule(person_names_per="question")


def test_the_two_blocks_of_a_question_are_named_by_separate_draws_as_the_seed_tasks() -> None:
    """vilbert_beta builds its Q->A and QA->R datasets apart (`_load_annotationsQ_A` / `_load_annotationsQA_R`), each
    calling `generate_random_name` on the record's detections, so a person is named by two independent draws: the same
    name in both blocks with probability 1 / len(names). Default `person_names_per="task"` draws so (3000 records of one
    person, a 4-name table: the same name in ~1/4 of them, ~5 sd bounds); "record" names both blocks alike."""
    names, n = ["A", "B", "C", "D"], 3000
    records = [
        {
            "annot_id": f"val-{k}",
            "objects": ["person", "car"],
            "question": ["Is", [0], "near", [1], "?"],
            "answer_choices": [["Yes", [0], "is", "."], ["No", "."], ["Maybe", "."], ["Never", "."]],
            "rationale_choices": [[[0], "stands", "."], ["Far", "."], ["Near", "."], ["None", "."]],
        }
        for k in range(n)
    ]
    qa = [record_texts(r, names, task="Q-A")["question"].split()[1] for r in records]
    qar = [record_texts(r, names, task="QA-R")["question"].split()[1] for r in records]
    same = sum(a == b for a, b in zip(qa, qar))
    sd = (n * (1 / 4) * (3 / 4)) ** 0.5
    assert abs(same - n / 4) < 5 * sd
    assert collections.Counter(qar).keys() == set(names)
    # within a block the naming is consistent: question, answers and rationales name the person alike
    texts = record_texts(records[0], names, task="QA-R")
    name = texts["question"].split()[1]
    assert texts["answers"][0] == f"Yes {name} is ." and texts["rationales"][0] == f"{name} stands ."
    with pytest.raises(ValueError, match="VCR task 'Q-R'"):
        record_texts(records[0], names, task="Q-R")


def _seed_word_pieces(tok, words: list[str]) -> list[str]:
    """vilbert_beta's `replace_det_with_name`: each token of the VCR row tokenised on its own."""
    return [piece for w in words for piece in tok.tokenize(w)]


def _seed_vcr_rows(
    tok, tokens_a: list[str], choices: list[list[str]], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """vilbert_beta's `VCRDataset.tokenize` for one entry, transcribed: `tokens_a` is shared by the entry's choices and
    `_truncate_seq_pair(tokens_a, tokens_b, max_length - 3)` pops from it in place (the longer one, `tokens_b` on a
    tie), then `[CLS] a [SEP] b [SEP]` with segment ids 0 ... 0 1 ... 1 (no padding here)."""
    rows = []
    for words in choices:
        tokens_b = _seed_word_pieces(tok, words)
        while len(tokens_a) + len(tokens_b) > max_length - 3:
            if len(tokens_a) > len(tokens_b):
                tokens_a.pop()
            else:
                tokens_b.pop()
        tokens = ["[CLS]", *tokens_a, "[SEP]", *tokens_b, "[SEP]"]
        rows.append((tok.convert_tokens_to_ids(tokens), [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)))
    return rows


@pytest.mark.parametrize("fixed", [False, True])
def test_vilbert_truncation_is_the_seed_vcr_readers(fixed: bool) -> None:
    """VCR rows over their length, collated with `truncation="seed"` (the VCR default), equal the seed reader's on
    random Q->A blocks (at 60, as the seed's TASK1) and QA->R blocks (`question [SEP] answer`, at 80) of long texts:
    ties cut the choice, and the question cut for one choice stays cut for the next ones of its block (not across
    examples that happen to share the question text)."""
    from vl.data.collate import Collator, load_tokenizer

    tok = load_tokenizer("minilm")
    rng = np.random.default_rng(3)
    vocab = "the person on the left is holding a large umbrella because it rains heavily outside today".split()

    def words(lo: int, hi: int) -> list[str]:
        return [str(w) for w in rng.choice(vocab, size=int(rng.integers(lo, hi)))]

    collator = Collator(tok, max_text_len=80, fixed_shapes=fixed, truncation="seed")
    differs = 0
    for _ in range(4):
        examples, want = [], []
        question = words(20, 70)
        for k in range(3):  # the first two examples share their question text
            q = question if k < 2 else words(20, 70)
            answers = [words(5, 60) for _ in range(4)]
            rationales = [words(10, 70) for _ in range(4)]
            gold = answers[int(rng.integers(4))]
            choices = [{"text": " ".join(q), "text_b": " ".join(a), "max_text_len": 60} for a in answers]
            choices += [{"text": " ".join([*q, "[SEP]", *gold]), "text_b": " ".join(r)} for r in rationales]
            visual = {"features": np.ones((2, 4), np.float32), "boxes_norm": np.zeros((2, 4), np.float32)}
            examples.append({"choices": choices, "mc_labels": [0, 0], "visual": visual})
            want += _seed_vcr_rows(tok, _seed_word_pieces(tok, q), answers, 60)
            want += _seed_vcr_rows(
                tok, [*_seed_word_pieces(tok, q), "[SEP]", *_seed_word_pieces(tok, gold)], rationales, 80
            )
        batch = collator(examples)
        plain = Collator(tok, max_text_len=80, fixed_shapes=fixed)(examples)
        width = batch["input_ids"].shape[1]
        for i, (ids, segments) in enumerate(want):
            n = len(ids)
            assert batch["input_ids"][i, :n].tolist() == ids, i
            assert batch["token_type_ids"][i, :n].tolist() == segments, i
            assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
            differs += batch["input_ids"][i, :n].tolist() != plain["input_ids"][i, :n].tolist()
    assert differs >= 20  # the tokenizer's own truncation is another function on these rows
    assert VCRDataModule().text_truncation == "seed"
