"""Progress bars with an ETA for the long steps outside the training loop (corpus generation, evaluation over large
galleries, conversion tools): tqdm on stderr when it is a terminal, silent in logs and CI. `VL_PROGRESS=1` forces the
bars on, `VL_PROGRESS=0` off."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    forced = os.environ.get("VL_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`iterable`, with a bar (count, rate, ETA) while it is consumed when `progress_enabled()`."""
    if not progress_enabled():
        yield from iterable
        return
    from tqdm import tqdm

    bar: Any = tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False)
    try:
        yield from bar
    finally:
        bar.close()
