"""VQA answer normalisation and the official accuracy on hand-made cases."""

from __future__ import annotations

import pytest

from vl.data.formats.vqa import vqa_soft_score
from vl.data.formats.vqa_answers import normalize_answer, official_vqa_accuracy, trainval_minval_split


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two", "2"),
        ("the red one", "red 1"),
        ("A dog.", "dog"),
        ("2.5", "2.5"),
        ("yes!", "yes"),
        ("dont know", "don't know"),
        ("black and white", "black and white"),
        ("an Apple", "apple"),
        ("1,000", "1000"),
        ("t-shirt", "t shirt"),
    ],
)
def test_normalize_answer(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_official_accuracy_hand_cases() -> None:
    assert official_vqa_accuracy("two", ["2"] * 10) == 1.0
    assert official_vqa_accuracy("blue", ["red"] * 10) == 0.0
    # 3 of 10 humans said "red": 7 leave-one-out subsets see 3 matches (1.0), 3 see 2 matches (2/3)
    assert official_vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((7 * 1.0 + 3 * 2 / 3) / 10)
    # 1 of 10: 9 subsets see 1 match (1/3), 1 sees none
    assert official_vqa_accuracy("The Red.", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    # the soft score is close to the official formula for k humans
    for k in range(0, 11):
        official = official_vqa_accuracy("x", ["x"] * k + ["y"] * (10 - k))
        assert abs(official - vqa_soft_score(k)) < 0.1


def test_trainval_minval_rule() -> None:
    ids = list(range(10_000, 0, -1))
    trainval, minval = trainval_minval_split(ids, minval_size=3000)
    assert minval == list(range(7001, 10_001)) and trainval == list(range(1, 7001))
