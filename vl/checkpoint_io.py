"""Crash-safe checkpoint files.

Lightning's own atomic save goes through fsspec's transaction, which writes to `$TMPDIR` and then moves the file; when
`$TMPDIR` is on another filesystem (tmpfs) the move is a copy, and a kill during it leaves a truncated (or empty)
`last.ckpt` with the previous one already gone. `AtomicCheckpointIO` writes a temp file in the checkpoint's own
directory, fsyncs it, `os.replace`s it over the final name (atomic on one filesystem) and fsyncs the directory: at
every instant the final name holds either the previous complete checkpoint or the new complete one. Temp files of a
killed writer (`.<name>.<random>.tmp`) are removed before the next write of that name; a clean run leaves none.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "stale_temp_files"]

TEMP_SUFFIX = ".tmp"


def stale_temp_files(path: str | Path) -> list[Path]:
    """Temp files an interrupted `atomic_torch_save(..., path)` may have left beside `path`."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover (platforms without directory fds)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover (filesystems that refuse fsync on a directory)
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` so that a crash at any point leaves the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_files(path):  # one writer per run dir (the run-dir claim): these are a dead writer's
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning `CheckpointIO` that saves local checkpoints with `atomic_torch_save` (remote URLs: Lightning's)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported for "
                f"`{type(self).__name__}`. Please implement your custom `CheckpointIO` to define how you'd like to use "
                "`storage_options`."
            )
        if not _is_local_file_protocol(str(path)):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)
