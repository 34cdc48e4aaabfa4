"""VQA answer normalisation and accuracy, as the official VQA evaluator computes them (`vqaEval.py` of the VQA API,
GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py`), re-implemented from reading it.

`normalize_answer` = the evaluator's `processPunctuation` then `processDigitArticle` (after newlines/tabs -> spaces
and strip):

- punctuation: each of the 21 characters of `PUNCTUATION` is deleted when the answer has it next to a space or
  contains a digit-comma-digit ("1,000" -> "1000"), otherwise it becomes a space ("t-shirt" -> "t shirt"); then every
  period not followed by a digit is removed ("2." -> "2", "2.5" stays). As in the original, the period substitution
  is capped at 32 replacements (it passes `re.UNICODE`, = 32, where `re.sub` takes `count`). Apostrophes, colons,
  `&`, `$`, `%`, `#`, `*`, `^`, `~`, `|` are kept ("10:30" stays);
- words: lower-cased, number words -> digits (`NUMBER_WORDS`), articles dropped, then the evaluator's
  `CONTRACTIONS` table ("dont" -> "don't").

Which side gets it differs between the two releases of the evaluator (`EVALUATORS`; both compare, per question,
the predicted answer with the human answers, see `compared_forms`):

- `"2021"` (the current official code, commit a013f00 "Fixed processing answers bug"; the default): every answer is
  stripped; when the humans do not all give the same answer, the human answers *and* the prediction get
  `normalize_answer`; when they all agree, nothing more is done on either side (a prediction "two" gets no credit
  from ten "2"s, "Yes" none from ten "yes");
- `"2016"` (the release of 2016-2021, which most published VQA v2 numbers were computed with): the prediction always
  gets `normalize_answer`; the human answers get only the punctuation step, and only when they are not all the same
  (never lower-cased or stripped).

`official_vqa_accuracy`: for each of the (usually 10) human answers, min(1, matches among the *other* humans / 3),
averaged; the 0/0.3/0.6/0.9/1.0 soft score (`vqa_format.vqa_soft_score`) is its usual approximation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: `manualMap`: number words -> digits
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
#: `punct`: deleted or turned into a space (the period is handled separately)
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

#: `contractions`: the evaluator's table, entry for entry (its keys are matched against lower-cased words, so the
#: capitalised keys "Im", "Ive", "Id've", "I'dve" never apply; "somebody'd" -> "somebodyd" is as in the original)
CONTRACTIONS: dict[str, str] = dict(
    pair.split("=")
    for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're
youve=you've
""".split()
)

_PERIOD = re.compile(r"\.(?!\d)")  # the original's "(?!<=\d)(\.)(?!\d)": its first group is a no-op look-ahead
_PERIOD_MAX_REPLACEMENTS = 32  # re.UNICODE passed positionally as `count` in the original
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The evaluator's `processPunctuation` (see the module docstring)."""
    out = text
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if delete or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REPLACEMENTS)


def process_digit_article(text: str) -> str:
    """The evaluator's `processDigitArticle`: lower-case words, number words -> digits, articles dropped, then
    contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """An answer as the evaluator normalises it (see the module docstring)."""
    return process_digit_article(process_punctuation(_clean(answer)))


EVALUATORS: tuple[str, ...] = ("2021", "2016")


def compared_forms(human_answers: Sequence[str], evaluator: str = "2021") -> tuple[list[str], str]:
    """The human answers of one question as the evaluator compares them, and how it transforms the prediction before
    comparing: "normalized" (`normalize_answer`) or "stripped" (newlines/tabs -> spaces, strip)."""
    if evaluator == "2021":
        gts = [_clean(a) for a in human_answers]
        if len(set(gts)) > 1:
            return [process_digit_article(process_punctuation(a)) for a in gts], "normalized"
        return gts, "stripped"
    if evaluator == "2016":
        if len(set(human_answers)) > 1:
            return [process_punctuation(a) for a in human_answers], "normalized"
        return list(human_answers), "normalized"
    raise ValueError(f"evaluator must be one of {EVALUATORS}, got {evaluator!r}")


def prediction_form(answer: str, how: str) -> str:
    """`answer` transformed as `compared_forms` says ("normalized" or "stripped")."""
    return normalize_answer(answer) if how == "normalized" else _clean(answer)


def official_vqa_accuracy(prediction: str, human_answers: Sequence[str], evaluator: str = "2021") -> float:
    """The evaluator's accuracy of one predicted answer against the human answers of its question."""
    gts, how = compared_forms(human_answers, evaluator)
    pred = prediction_form(prediction, how)
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
