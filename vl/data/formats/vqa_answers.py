"""VQA answer normalisation and the official accuracy, written from the VQA evaluation protocol.

`normalize_answer`: lower-case; punctuation removed (or turned into a space between words); a period is kept only
inside a number ("2.5"); number words -> digits ("two" -> "2"); articles (a, an, the) dropped; common contractions
restored ("dont" -> "don't"). `official_vqa_accuracy`: for each of the (usually 10) human answers, min(1, matches
among the *other* humans / 3), averaged -- the soft score 0/0.3/0.6/0.9/1.0 is its leave-none-out approximation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't", "its": "it's",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're", "wasnt": "wasn't",
    "werent": "weren't", "whats": "what's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
}  # fmt: skip
_PUNCTUATION = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$~'|:")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation (see the module docstring)."""
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip().lower())
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def official_vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the human answers (all normalised)."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in human_answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores) if scores else 0.0


def trainval_minval_split(question_ids: Sequence[int], minval_size: int = 3000) -> tuple[list[int], list[int]]:
    """The seed's split of the val questions: sorted by question id, the last `minval_size` are `minval`, the rest
    join train as `trainval`. Returns (val ids going to trainval, minval ids)."""
    ordered = sorted(question_ids)
    cut = max(0, len(ordered) - minval_size)
    return ordered[:cut], ordered[cut:]
