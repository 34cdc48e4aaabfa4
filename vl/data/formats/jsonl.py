"""JSON and JSON-lines reading with one-line, file:line error messages; atomic file writing."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vl.errors import DataError

__all__ = ["read_json", "load_jsonl", "write_jsonl", "write_atomically", "write_dir_once"]


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


def write_dir_once(
    final: str | Path, stamp: dict[str, Any], write: Callable[[Path], Any], *, stamp_file: str = "DONE.json"
) -> Path:
    """The directory `final`, written once: reused while its `stamp_file` records `stamp` (e.g. format version +
    settings); else `write(tmp)` fills a hidden sibling, the stamp goes in last (with what `write` returned, if
    anything, under "counts") and the sibling is renamed into place. Concurrent callers serialise on a lock file
    next to it; an interrupted write leaves no stamp, so the next caller writes again."""
    import fcntl
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)

    def valid() -> bool:
        try:
            recorded = json.loads((final / stamp_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(recorded, dict) and {k: v for k, v in recorded.items() if k != "counts"} == stamp

    if valid():
        return final
    with open(final.parent / f".{final.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if valid():
                return final
            tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                counts = write(tmp)
                record = {**stamp, "counts": counts} if counts is not None else dict(stamp)
                (tmp / stamp_file).write_text(json.dumps(record), encoding="utf-8")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return final
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


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


def load_jsonl(
    path: str | Path, required: tuple[str, ...] = (), record: str | None = None, texts: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Read a JSONL file -> list of objects (blank lines skipped).

    Raises DataError ``"<path>:<lineno>: invalid JSON ..."`` for a malformed line, ``"<path>:<lineno>: missing field
    'text'"`` when a ``required`` field is absent (``"... (a <record> needs [...])"`` when ``record`` names what a
    line is), ``"<path>:<lineno>: field 'text' is empty or not a string"`` for a present ``texts`` field that is not
    a non-empty string (an empty text would train as ``[CLS] [SEP]``, a non-string crash in the collator), and
    ``"<path>: file not found"`` for a missing file.
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
                    needs = f" (a {record} needs {list(required)})" if record else ""
                    raise DataError(f"{path}:{lineno}: missing field {name!r}{needs}")
            for name in texts:
                if name in obj and not (isinstance(obj[name], str) and obj[name].strip()):
                    raise DataError(f"{path}:{lineno}: field {name!r} is empty or not a string")
            records.append(obj)
    return records


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` one compact JSON object a line (UTF-8, ``\\n`` endings, deterministic bytes)."""
    with Path(path).open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False))
            f.write("\n")
