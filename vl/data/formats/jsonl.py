"""JSON and JSON-lines reading with one-line, file:line error messages; atomic file writing."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vl.errors import DataError

__all__ = ["read_json", "load_jsonl", "write_jsonl", "write_atomically"]


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a hidden sibling of `path`, then rename it to `path`: an interrupted write never leaves a
    half file under the final name (the temp file is removed on failure)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: str | Path) -> Any:
    """Read one JSON document. Raises DataError ``"<path>: file not found"`` / ``"<path>: invalid JSON (...)"``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def load_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file -> list of objects (blank lines skipped).

    Raises DataError ``"<path>:<lineno>: invalid JSON ..."`` for a malformed line, ``"<path>:<lineno>: missing field
    'text'"`` when a ``required`` field is absent, and ``"<path>: file not found"`` for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records: list[dict[str, Any]] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for name in required:
                if name not in obj:
                    raise DataError(f"{path}:{lineno}: missing field {name!r}")
            records.append(obj)
    return records


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` one compact JSON object a line (UTF-8, ``\\n`` endings, deterministic bytes)."""
    with Path(path).open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False))
            f.write("\n")
