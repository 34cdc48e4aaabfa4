"""VQA answers as the official evaluator (vqaEval.py) treats them: a table of cases worked out by hand from reading
its `processPunctuation` / `processDigitArticle` / `evaluate`, hand-computed accuracies for both of its releases,
soft-score targets, the real answer vocabulary, and the official-JSON -> targets converter on an official-format
fixture."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import real_sample
from vl.data.formats.vqa import build_targets, load_questions, load_targets, vqa_soft_score
from vl.data.formats.vqa_answers import (
    CONTRACTIONS,
    PUNCTUATION,
    normalize_answer,
    official_vqa_accuracy,
    trainval_minval_split,
)
from vl.errors import DataError
from vl.tools.vqa_convert import main as convert_main


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two", "2"),
        ("the red one", "red 1"),
        ("A dog.", "dog"),
        ("2.5", "2.5"),
        ("2.", "2"),  # a period not followed by a digit goes, also after a digit
        (".5", ".5"),
        ("u.s.", "us"),
        ("yes!", "yes"),
        ("yes !", "yes"),  # next to a space: deleted, not a space
        ("dont know", "don't know"),
        ("whats up", "what's up"),
        ("oclock", "o'clock"),
        ("somebody'd", "somebodyd"),  # the table's own entry
        ("Im here", "im here"),  # the capitalised keys never match lower-cased words
        ("an Apple", "apple"),
        ("the", ""),
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("1,000", "1000"),
        ("3,5 (approx)", "35 approx"),  # a digit-comma-digit anywhere: every listed character is deleted
        ("t-shirt", "t shirt"),
        ("black/white", "black white"),
        ("black / white", "black white"),
        ("(x)", "x"),
        ("x (y)", "x y"),
        ("10:30", "10:30"),  # not in the list: kept
        ("it's", "it's"),
        ("AT&T", "at&t"),
        ("50%", "50%"),
        ("$5", "$5"),
        ("#1", "#1"),
        ("\tYes\n", "yes"),
        ("a." * 40, "a" * 32 + "a." * 8),  # at most 32 periods removed (re.UNICODE passed as `count`)
    ],
)
def test_normalize_answer_as_the_official_evaluator(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_official_tables() -> None:
    assert PUNCTUATION == tuple(';/[]"{}()=+\\_-><@`,?!')
    assert len(CONTRACTIONS) == 120 and CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["twas"] == "'twas"


def test_official_accuracy_hand_cases() -> None:
    for evaluator in ("2021", "2016"):
        assert official_vqa_accuracy("blue", ["red"] * 10, evaluator) == 0.0
        # 3 of 10 humans said "red": 7 leave-one-out subsets see 3 matches (1.0), 3 see 2 matches (2/3)
        assert official_vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7, evaluator) == pytest.approx(
            (7 + 3 * 2 / 3) / 10
        )
        # 1 of 10: 9 subsets see 1 match (1/3), 1 sees none
        assert official_vqa_accuracy("The Red.", ["red"] + ["blue"] * 9, evaluator) == pytest.approx(0.3)
    # 2021: unanimous humans are compared raw (stripped) with the raw prediction
    assert official_vqa_accuracy("two", ["2"] * 10) == 0.0
    assert official_vqa_accuracy(" 2\n", ["2"] * 10) == 1.0
    assert official_vqa_accuracy("two", ["2"] * 10, "2016") == 1.0
    # humans disagree: 2021 normalises them ("Yes" == "yes"); 2016 only strips their punctuation
    humans = ["Yes"] * 8 + ["yes"] * 2
    assert official_vqa_accuracy("yes", humans) == 1.0
    assert official_vqa_accuracy("yes", humans, "2016") == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    # 2016: "yes!" -> "yes " (the "!" becomes a space and nothing strips it), so it never equals "yes"; 2021 matches
    assert official_vqa_accuracy("yes", ["yes!"] * 2 + ["no"] * 8, "2016") == 0.0
    assert official_vqa_accuracy("yes", ["yes!"] * 2 + ["no"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    # the soft score is close to the official formula for k humans
    for k in range(0, 11):
        official = official_vqa_accuracy("x", ["x"] * k + ["y"] * (10 - k))
        assert abs(official - vqa_soft_score(k)) < 0.1
    with pytest.raises(ValueError, match="evaluator"):
        official_vqa_accuracy("x", ["x"], "2019")


VOCAB = {"yes": 0, "no": 1, "2": 2, "red": 3, "t shirt": 4}


def _ann(qid: int, answers: list[str]) -> dict:
    return {"question_id": qid, "image_id": 7, "answers": [{"answer": a} for a in answers]}


def test_build_targets_match_answers_as_the_evaluator() -> None:
    anns = [
        _ann(1, ["yes"] * 3 + ["Yes"] * 2 + ["no"] * 5),
        _ann(2, ["two"] * 4 + ["2"] * 2 + ["red"] * 4),
        _ann(3, ["t-shirt"] * 10),
        _ann(4, ["t-shirt"] * 9 + ["red"]),
    ]

    def as_dict(targets: list[dict]) -> dict[int, dict[int, float]]:
        return {t["question_id"]: dict(zip(t["labels"], t["scores"])) for t in targets}

    # 2021: disagreeing humans normalised ("Yes" -> yes: 5 -> 1.0; "two" -> 2: 6 -> 1.0); ten "t-shirt" stay raw and
    # so never match the vocabulary's "t shirt" (a model answering "t shirt" gets 0 from the evaluator)
    assert as_dict(build_targets(anns, VOCAB)) == {
        1: {0: 1.0, 1: 1.0},
        2: {2: 1.0, 3: 1.0},
        3: {},
        4: {3: 0.3, 4: 1.0},
    }
    # 2016: humans get only the punctuation step ("Yes" and "two" stay themselves)
    assert as_dict(build_targets(anns, VOCAB, matching="2016")) == {
        1: {0: 0.9, 1: 1.0},
        2: {2: 0.6, 3: 1.0},
        3: {},
        4: {3: 0.3, 4: 1.0},
    }
    # raw strings (the bottom-up-attention seed): "t-shirt" is not "t shirt"
    assert as_dict(build_targets(anns, VOCAB, matching="raw")) == {
        1: {0: 0.9, 1: 1.0},
        2: {2: 0.6, 3: 1.0},
        3: {},
        4: {3: 0.3},
    }
    assert [t["labels"] for t in build_targets(anns, VOCAB)] == [[0, 1], [2, 3], [], [3, 4]]  # sorted by label
    with pytest.raises(ValueError, match="matching"):
        build_targets(anns, VOCAB, matching="lower")


def test_real_answer_vocabulary_is_already_normalised() -> None:
    """The 3129-answer vocabulary was built from answers normalised with the evaluator's rules, so normalising leaves
    every entry unchanged (the earlier vl normaliser changed 143 of them, e.g. "10:30" -> "10 30")."""
    label2ans = json.loads(real_sample("vqa", "trainval_label2ans.json").read_text())
    assert len(label2ans) == 3129
    changed = [a for a in label2ans if normalize_answer(a) != a]
    assert changed == []
    assert "10:30" in label2ans and "t shirt" in label2ans and "don't know" in label2ans


def test_trainval_minval_rule() -> None:
    ids = list(range(10_000, 0, -1))
    trainval, minval = trainval_minval_split(ids, minval_size=3000)
    assert minval == list(range(7001, 10_001)) and trainval == list(range(1, 7001))


# ----------------------------------------------------------------------------------------------- the converter
INFO = {
    "description": "This is v2.0 of the VQA dataset.",
    "url": "http://visualqa.org",
    "version": "2.0",
    "year": 2017,
    "contributor": "VQA Team",
    "date_created": "2017-04-26 17:07:13",
}
LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0"}


def _write_official(root: Path, split: str, qas: dict[int, list[str]]) -> tuple[Path, Path]:
    """Questions + annotations files in the official v2 layout (all fields of the released files)."""
    common = {"info": INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": LICENSE}
    questions = [{"image_id": qid // 10, "question": f"What is {qid}?", "question_id": qid} for qid in qas]
    annotations = [
        {
            "question_type": "what is",
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
            "image_id": qid // 10,
            "answer_type": "other",
            "question_id": qid,
        }
        for qid, answers in qas.items()
    ]
    qpath = root / f"v2_OpenEnded_mscoco_{split}2014_questions.json"
    apath = root / f"v2_mscoco_{split}2014_annotations.json"
    qpath.write_text(json.dumps({**common, "data_subtype": f"{split}2014", "questions": questions}))
    apath.write_text(json.dumps({**common, "data_subtype": f"{split}2014", "annotations": annotations}))
    return qpath, apath


def test_convert_official_json_to_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    train = {30: ["yes"] * 3 + ["Yes"] * 2 + ["no"] * 5, 10: ["red"] * 10}
    val = {55: ["2"] * 10, 51: ["two"] * 4 + ["2"] * 2 + ["red"] * 4, 54: ["no"] * 10, 52: ["t-shirt"] * 10, 53: ["x"]}
    tq, ta = _write_official(src, "train", train)
    vq, va = _write_official(src, "val", val)
    (src / "ans2label.json").write_text(json.dumps(VOCAB))
    out = tmp_path / "vqa"
    args = ["--out", str(out), "--answers", str(src / "ans2label.json"), "--minval-size", "2"]
    args += ["--train-questions", str(tq), "--train-annotations", str(ta)]
    assert convert_main(args + ["--val-questions", str(vq), "--val-annotations", str(va), "--matching", "2021"]) == 0
    assert "100%" in capsys.readouterr().err  # the progress bar

    expected = {  # question id -> {label: score}, by hand (2021 matching)
        30: {0: 1.0, 1: 1.0},
        10: {3: 1.0},
        55: {2: 1.0},
        51: {2: 1.0, 3: 1.0},
        54: {1: 1.0},
        52: {},
        53: {},
    }

    def read(name: str) -> list[tuple[int, dict[int, float]]]:
        return [(t["question_id"], dict(zip(t["labels"], t["scores"]))) for t in load_targets(out / "cache" / name)]

    assert read("train_target.pkl") == [(q, expected[q]) for q in (30, 10)]  # the questions file's order
    assert read("val_target.pkl") == [(q, expected[q]) for q in (55, 51, 54, 52, 53)]
    # minval = the last 2 val questions by id; trainval = train (by id) + the rest of val (by id)
    assert read("trainval_target.pkl") == [(q, expected[q]) for q in (10, 30, 51, 52, 53)]
    assert read("minval_target.pkl") == [(q, expected[q]) for q in (54, 55)]
    assert [q["question_id"] for q in load_questions(out / "v2_OpenEnded_mscoco_trainval2014_questions.json")] == [
        10,
        30,
        51,
        52,
        53,
    ]
    minval_q = json.loads((out / "v2_OpenEnded_mscoco_minval2014_questions.json").read_text())
    assert [q["question_id"] for q in minval_q["questions"]] == [54, 55] and minval_q["info"] == INFO
    assert pickle.loads((out / "cache" / "trainval_ans2label.pkl").read_bytes()) == VOCAB
    assert pickle.loads((out / "cache" / "trainval_label2ans.pkl").read_bytes()) == ["yes", "no", "2", "red", "t shirt"]

    # an annotation without its question: one line naming the file, nothing written
    bad = tmp_path / "bad"
    _, bad_a = _write_official(src, "bad", {99: ["yes"] * 10})
    assert (
        convert_main(
            ["--out", str(bad), "--answers", str(src / "ans2label.json")]
            + ["--val-questions", str(vq)]
            + [
                "--val-annotations",
                str(bad_a),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "v2_mscoco_bad2014_annotations.json" in err and not bad.exists()
    with pytest.raises(SystemExit):
        convert_main(["--out", str(bad), "--answers", str(src / "ans2label.json"), "--train-questions", str(tq)])


def test_convert_reads_the_real_official_sample(tmp_path: Path) -> None:
    root = real_sample("vqa", "vqav2_official_format")
    vocab = real_sample("vqa", "trainval_ans2label.json")
    args = ["--out", str(tmp_path), "--answers", str(vocab), "-q"]
    assert (
        convert_main(
            args
            + ["--train-questions", str(root / "questions.json")]
            + [
                "--train-annotations",
                str(root / "annotations.json"),
            ]
        )
        == 0
    )
    targets = load_targets(tmp_path / "cache" / "train_target.pkl")
    ans2label = json.loads(vocab.read_text())
    first = dict(zip(targets[0]["labels"], targets[0]["scores"]))
    # question 458752000: net x6, netting, mesh, pitcher, orange (each once)
    counts = {"net": 1.0, "netting": 0.3, "mesh": 0.3, "pitcher": 0.3, "orange": 0.3}
    assert first == {ans2label[a]: score for a, score in counts.items() if a in ans2label}
    assert ans2label["net"] in first and len(targets) == 3


def test_converter_rejects_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 2}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": []}))
    (tmp_path / "v.json").write_text(json.dumps(VOCAB))
    from vl.tools.vqa_convert import convert_vqa

    with pytest.raises(DataError, match="q.json.*question"):
        convert_vqa(tmp_path / "out", tmp_path / "v.json", {"train": (tmp_path / "q.json", tmp_path / "a.json")})


def test_convert_defaults_to_the_seeds_raw_string_counts(tmp_path: Path) -> None:
    """Without --matching the targets are the bottom-up-attention `compute_softscore.py` ones the ViLBERT seed's caches
    hold: raw human strings counted, a vocabulary entry scored 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 of them
    ("Yes" is not "yes", "two" is not "2"); transcribed here on random annotations."""
    rng = np.random.default_rng(7)
    pool = ["yes", "Yes", "no", "2", "two", "red", "t shirt", "t-shirt", "blue"]
    train = {int(q): [str(a) for a in rng.choice(pool, size=10)] for q in range(10, 40)}
    tq, ta = _write_official(tmp_path, "train", train)
    (tmp_path / "ans2label.json").write_text(json.dumps(VOCAB))
    out = tmp_path / "vqa"
    args = ["--out", str(out), "--answers", str(tmp_path / "ans2label.json")]
    assert convert_main(args + ["--train-questions", str(tq), "--train-annotations", str(ta), "-q"]) == 0

    def seed_score(count: int) -> float:  # compute_softscore.get_score
        return {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}.get(count, 1.0)

    got = {
        t["question_id"]: dict(zip(t["labels"], t["scores"])) for t in load_targets(out / "cache" / "train_target.pkl")
    }
    for qid, answers in train.items():
        counts: dict[str, int] = {}
        for a in answers:
            counts[a] = counts.get(a, 0) + 1
        want = {VOCAB[a]: seed_score(c) for a, c in counts.items() if a in VOCAB}
        assert got[qid] == pytest.approx(want), qid
