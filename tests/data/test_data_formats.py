"""VQA / COCO / JSONL format helpers: pure functions, one-line DataErrors, and the real sample files."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from vl.data.formats.coco import load_coco_captions
from vl.data.formats.jsonl import load_jsonl, write_jsonl
from vl.data.formats.vqa import (
    build_targets,
    load_annotations,
    load_answer_vocab,
    load_label2ans,
    load_questions,
    load_targets,
    vqa_soft_score,
)
from vl.errors import DataError

REAL = Path(os.environ.get("VL_REAL_SAMPLES") or Path(__file__).resolve().parents[2].parent / "shared" / "real_samples")
needs_real = pytest.mark.skipif(
    not REAL.is_dir(), reason=f"real sample files not found at {REAL} (set VL_REAL_SAMPLES)"
)


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# -------------------------------------------------------------------------------------------------------------- VQA


def test_soft_score_table() -> None:
    assert [vqa_soft_score(k) for k in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        vqa_soft_score(-1)


def test_build_targets() -> None:
    ans2label = {"yes": 0, "no": 1, "2": 2}
    anns = [
        {"question_id": 7, "image_id": 3, "answers": [{"answer": "no"}] * 2 + [{"answer": "yes"}] * 8},
        {"question_id": 8, "image_id": 3, "answers": [{"answer": "2"}] * 3 + [{"answer": "two"}] * 7},
        {"question_id": 9, "answers": [{"answer": "maybe"}] * 10},
    ]
    assert build_targets(anns, ans2label) == [
        {"question_id": 7, "image_id": 3, "labels": [0, 1], "scores": [1.0, 0.6]},
        # the official evaluator normalises "two" to "2": all 10 annotators credit the answer "2"
        {"question_id": 8, "image_id": 3, "labels": [2], "scores": [1.0]},
        {"question_id": 9, "image_id": None, "labels": [], "scores": []},
    ]
    with pytest.raises(DataError, match="annotation 0 has no 'answers'"):
        build_targets([{"question_id": 1}], ans2label)


def test_question_loader_errors(tmp_path: Path) -> None:
    good = {"question_id": 1, "image_id": 2, "question": "what?"}
    path = _dump(tmp_path / "q.json", {"questions": [good, good, good, {"image_id": 2, "question": "x"}]})
    with pytest.raises(DataError, match=r"q\.json: entry 3 has no 'question_id'"):
        load_questions(path)
    with pytest.raises(DataError, match=r"top\.json: missing top-level field 'questions'"):
        load_questions(_dump(tmp_path / "top.json", {"annotations": []}))
    with pytest.raises(DataError, match=r"typ\.json: entry 0 field 'image_id'"):
        load_questions(_dump(tmp_path / "typ.json", {"questions": [{**good, "image_id": "2"}]}))
    (tmp_path / "broken.json").write_text('{"questions": [')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON"):
        load_questions(tmp_path / "broken.json")
    with pytest.raises(DataError, match=r"absent\.json: file not found"):
        load_questions(tmp_path / "absent.json")
    assert load_questions(_dump(tmp_path / "ok.json", {"questions": [good]})) == [good]
    twice = {"questions": [good, {**good, "question_id": 2}, {**good, "question": "again?"}]}
    with pytest.raises(DataError, match=r"twice\.json: questions 0 and 2 are both question 1"):
        load_questions(_dump(tmp_path / "twice.json", twice))


def test_targets_pickle_and_json(tmp_path: Path) -> None:
    targets = [{"question_id": 1, "image_id": 5, "labels": [0, 3], "scores": [1.0, 0.3]}]
    with (tmp_path / "t.pkl").open("wb") as f:
        pickle.dump(targets, f)
    assert load_targets(tmp_path / "t.pkl") == targets == load_targets(_dump(tmp_path / "t.json", targets))
    bad = [{**targets[0], "scores": [1.0]}]
    with pytest.raises(DataError, match=r"bad\.json: entry 0 has 2 labels but 1 scores"):
        load_targets(_dump(tmp_path / "bad.json", bad))
    with pytest.raises(DataError, match=r"noimg\.json: entry 0 has no 'image_id'"):
        load_targets(_dump(tmp_path / "noimg.json", [{"question_id": 1, "labels": [], "scores": []}]))
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04junk")
    with pytest.raises(DataError, match=r"junk\.pkl: cannot unpickle"):
        load_targets(tmp_path / "junk.pkl")
    # a soft score outside [0, 1] (NaN too), a label twice, a question twice (its later entry would replace the first)
    for name, entries, message in [
        ("big", [{**targets[0], "scores": [1.0, 1.5]}], r"entry 0 \(question 1\) has a score outside \[0, 1\]"),
        ("nan", [{**targets[0], "scores": [float("nan"), 0.3]}], r"entry 0 \(question 1\) has a score outside"),
        ("twice", [{**targets[0], "labels": [3, 3]}], r"entry 0 \(question 1\) repeats a label: \[3, 3\]"),
        ("repeat", [targets[0], {**targets[0], "labels": [], "scores": []}], r"entries 0 and 1 are both question 1"),
    ]:
        with (tmp_path / f"{name}.pkl").open("wb") as f:
            pickle.dump(entries, f)
        with pytest.raises(DataError, match=rf"{name}\.pkl: {message}"):
            load_targets(tmp_path / f"{name}.pkl")


def test_answer_vocab_layouts(tmp_path: Path) -> None:
    assert load_answer_vocab(_dump(tmp_path / "l2a.json", ["yes", "no"])) == {"yes": 0, "no": 1}
    with (tmp_path / "a2l.pkl").open("wb") as f:
        pickle.dump({"no": 1, "yes": 0}, f)
    assert load_answer_vocab(tmp_path / "a2l.pkl") == {"yes": 0, "no": 1}
    assert load_label2ans(tmp_path / "a2l.pkl") == ["yes", "no"]
    with pytest.raises(DataError, match=r"gap\.json: labels are not 0\.\.1"):
        load_answer_vocab(_dump(tmp_path / "gap.json", {"yes": 0, "no": 2}))
    with pytest.raises(DataError, match=r"dup\.json: answer 'yes' appears twice"):
        load_answer_vocab(_dump(tmp_path / "dup.json", ["yes", "yes"]))
    with pytest.raises(DataError, match=r"num\.json"):
        load_answer_vocab(_dump(tmp_path / "num.json", 3))


# ------------------------------------------------------------------------------------------------------ JSONL, COCO


def test_jsonl_round_trip_and_errors(tmp_path: Path) -> None:
    recs = [{"text": "a red circle.", "image_id": "1000"}, {"text": "ünïcode", "image_id": "1001"}]
    write_jsonl(tmp_path / "ok.jsonl", recs)
    assert load_jsonl(tmp_path / "ok.jsonl", required=("text", "image_id")) == recs
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "field.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataError, match=r"field\.jsonl:2: missing field 'text'"):
        load_jsonl(tmp_path / "field.jsonl", required=("text",))
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object"):
        load_jsonl(tmp_path / "list.jsonl")
    with pytest.raises(DataError, match=r"gone\.jsonl: file not found"):
        load_jsonl(tmp_path / "gone.jsonl")
    for i, bad in enumerate(['"  "', "null", "3"]):  # a text field that is empty or not a string
        (tmp_path / f"text{i}.jsonl").write_text('{"text": "a"}\n{"text": ' + bad + "}\n")
        with pytest.raises(DataError, match=rf"text{i}\.jsonl:2: field 'text' is empty or not a string"):
            load_jsonl(tmp_path / f"text{i}.jsonl", texts=("text",))
        assert len(load_jsonl(tmp_path / f"text{i}.jsonl")) == 2  # only checked where asked


def test_coco_errors(tmp_path: Path) -> None:
    img = {"id": 1, "file_name": "1.png", "width": 4, "height": 4}
    ok = {"images": [img], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]}
    images, anns = load_coco_captions(_dump(tmp_path / "ok.json", ok))
    assert images == {1: img} and anns == ok["annotations"]
    with pytest.raises(DataError, match=r"noimg\.json: missing top-level list 'images'"):
        load_coco_captions(_dump(tmp_path / "noimg.json", {"annotations": []}))
    with pytest.raises(DataError, match=r"nocap\.json: annotations\[0\] has no 'caption'"):
        load_coco_captions(_dump(tmp_path / "nocap.json", {"images": [img], "annotations": [{"image_id": 1}]}))
    blank = {"images": [img], "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "  "}]}
    with pytest.raises(DataError, match=r"blank\.json: annotations\[1\] field 'caption' is empty or not a string"):
        load_coco_captions(_dump(tmp_path / "blank.json", blank))
    with pytest.raises(DataError, match=r"dangling\.json: annotations\[0\] refers to unknown image id 9"):
        load_coco_captions(
            _dump(tmp_path / "dangling.json", {"images": [img], "annotations": [{"image_id": 9, "caption": "x"}]})
        )
    with pytest.raises(DataError, match=r"noid\.json: images\[0\] has no 'id'"):
        load_coco_captions(_dump(tmp_path / "noid.json", {"images": [{"file_name": "a"}], "annotations": []}))


# ------------------------------------------------------------------------------------------------------ real files


@needs_real
def test_real_vqa_vocab() -> None:
    ans2label = load_answer_vocab(REAL / "vqa" / "trainval_ans2label.json")
    label2ans = load_label2ans(REAL / "vqa" / "trainval_label2ans.json")
    assert len(ans2label) == len(label2ans) == 3129
    assert all(ans2label[a] == i for i, a in enumerate(label2ans))
    assert load_answer_vocab(REAL / "vqa" / "trainval_label2ans.json") == ans2label
    assert {"yes", "no", "2", "red"} <= set(ans2label)


@needs_real
def test_real_vqa_official_format() -> None:
    root = REAL / "vqa" / "vqav2_official_format"
    qs = load_questions(root / "questions.json")
    assert [q["question_id"] for q in qs] == [458752000, 458752001, 458752002]
    assert qs[1]["image_id"] == 458752 and qs[1]["question"] == "What position is this man playing?"
    anns = load_annotations(root / "annotations.json")
    assert [a["question_id"] for a in anns] == [q["question_id"] for q in qs]
    ans2label = load_answer_vocab(REAL / "vqa" / "trainval_ans2label.json")
    targets = build_targets(anns, ans2label)
    first = dict(zip(targets[0]["labels"], targets[0]["scores"]))
    assert first[ans2label["net"]] == 1.0 and first[ans2label["pitcher"]] == 0.3
    pitcher = dict(zip(targets[1]["labels"], targets[1]["scores"]))
    assert pitcher[ans2label["pitcher"]] == 1.0 and pitcher[ans2label["catcher"]] == 0.3


@needs_real
def test_real_coco_captions() -> None:
    images, anns = load_coco_captions(REAL / "coco" / "captions_val2014_first200images.json")
    assert len(images) == 200 and len(anns) == 1001
    assert images[318219]["file_name"] == "COCO_val2014_000000318219.jpg"
    assert all(isinstance(a["caption"], str) and a["caption"] for a in anns)


@needs_real
def test_real_lxmert_text_jsonl() -> None:
    lines = load_jsonl(REAL / "lxmert_text" / "lxmert_finetune_val.jsonl", required=("text",))
    assert len(lines) == 200 and lines[0]["text"] == "What's in the water? Surfboard."
