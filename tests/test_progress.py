"""`vl.progress`: bars (with an ETA) for long steps outside training, on a terminal or `VL_PROGRESS=1`; silent else."""

from __future__ import annotations

import pytest

from vl.progress import progress


@pytest.mark.parametrize("forced", ["0", "1"])
def test_progress_yields_everything_and_draws_only_when_enabled(monkeypatch, capsys, forced: str) -> None:
    monkeypatch.setenv("VL_PROGRESS", forced)
    assert list(progress(iter(range(5)), desc="corpus: images", total=5)) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert ("corpus: images" in err and "/5" in err) if forced == "1" else err == ""
