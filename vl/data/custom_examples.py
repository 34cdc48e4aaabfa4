"""`data=custom`'s examples, one per JSONL line (`vl.data.custom` reads and checks the lines): the text, the image's
fields from the visual source and the line's label: VQA soft-score targets (`AnswerLines`) or the file's ITM labels
(`LabelledPairs`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vl.data.samplers import split_key
from vl.data.visual_source import VisualSource

__all__ = ["AnswerLines", "LabelledPairs", "LineExamples", "soft_scores"]


def soft_scores(answers: list[str], ans2label: dict[str, int]) -> tuple[list[int], list[float]]:
    """(labels, scores) of a line's answers in the vocabulary: min(1, count / 3), the VQA paper's accuracy, for any
    number of answers (the VQA corpus's 10-annotator targets average it over the leave-one-out subsets instead:
    `vl.data.formats.vqa.vqa_soft_score`, 0.3 / 0.6 / 0.9 / 1; a line here need not have 10)."""
    counts = Counter(answers)
    labels = [ans2label[a] for a in counts if a in ans2label]
    return labels, [min(1.0, counts[a] / 3.0) for a in counts if a in ans2label]


class LineExamples(Dataset):
    """One example per line: text, the image's fields and the line's label (`label_of(line)` -> {key: value}); None
    when the image is skipped."""

    def __init__(self, lines: list[dict[str, Any]], source: VisualSource, label_of: Any) -> None:
        self.lines, self.source, self.label_of = lines, source, label_of

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        epoch, index = split_key(key)
        line = self.lines[index]
        fields = self.source.fields(str(line["image_id"]))
        if fields is None:
            return None
        return {
            "text": line["text"],
            "image_id": str(line["image_id"]),
            "index": index,
            "epoch": epoch,
            **self.label_of(line),
            **fields,
        }


class AnswerLines(LineExamples):
    """One example per line: text, the image's fields, dense soft-score target (A,)."""

    def __init__(self, lines: list[dict[str, Any]], source: VisualSource, ans2label: dict[str, int]) -> None:
        super().__init__(lines, source, self.target)
        self.ans2label = ans2label

    def target(self, line: dict[str, Any]) -> dict[str, Any]:
        target = np.zeros(len(self.ans2label), dtype=np.float32)
        labels, scores = soft_scores(line.get("answers") or [], self.ans2label)
        target[labels] = scores
        return {"vqa_target": target}


class LabelledPairs(LineExamples):
    """One example per line with the file's `label` as the ITM label (1 = the text matches the image)."""

    def __init__(self, lines: list[dict[str, Any]], source: VisualSource) -> None:
        super().__init__(lines, source, _itm_label)


def _itm_label(line: dict[str, Any]) -> dict[str, Any]:
    return {"itm_label": int(line["label"])}
