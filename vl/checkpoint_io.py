"""Crash-safe checkpoint files.

Lightning's own atomic save goes through fsspec's transaction, which writes to `$TMPDIR` and then moves the file; when
`$TMPDIR` is on another filesystem (tmpfs) the move is a copy, and a kill during it leaves a truncated (or empty)
`last.ckpt` with the previous one already gone. `AtomicCheckpointIO` writes a temp file in the checkpoint's own
directory, fsyncs it, `os.replace`s it over the final name (atomic on one filesystem) and fsyncs the directory: at
every instant the final name holds either the previous complete checkpoint or the new complete one. Temp files of a
killed writer (`.<name>.<random>.tmp`) are removed before the next write of that name; a clean run leaves none.

`ModelCheckpoint` keeps a fit's best checkpoint across a resume into another run dir (see its docstring).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "ModelCheckpoint", "atomic_copy", "atomic_torch_save", "stale_temp_files"]

log = logging.getLogger(__name__)

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


def _atomic_write(path: str | Path, write: Any) -> Path:
    """`write(f)` into a temp file beside `path`, fsync, `os.replace` over `path`, fsync the dir: a crash at any point
    leaves the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_files(path):  # one writer per run dir (the run-dir claim): these are a dead writer's
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` so that a crash at any point leaves the old file or the new one, never a part."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """A copy of the file `src` at `dst`, written as `atomic_torch_save` writes (the old `dst` or the whole copy)."""
    with open(src, "rb") as source:
        return _atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 24))


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


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, which also keeps the best checkpoint(s) so far when a fit resumes into another
    run dir (`ckpt_path=<earlier run>/checkpoints/last.ckpt`, the default being a new dir per run; or a run dir that
    was moved and `resume=`d).

    Lightning restores `best_model_score` and the top-k files only when the checkpoint dir is unchanged; in another
    dir best-tracking restarted at the resumed epoch, so `best.ckpt` was the best since the resume, and the test stage
    scored it instead of the run's best (and `<monitor>_best`, what a sweep optimises, was the best since the resume).
    Here the top-k files are carried over: each is found where the earlier run wrote it (else under the same name in
    this dir: a moved run dir), copied into this run's checkpoint dir (atomically, by rank 0; the earlier run's file is
    only read) and tracked with its score, so the resumed fit keeps, replaces and tests them as the uninterrupted fit
    would. When a file is gone, tracking restarts as in Lightning, with a warning naming it. A callback without a
    monitored metric (`last.ckpt`) has no score to keep: it starts its files in the new dir, quietly. The state key is
    Lightning's (checkpoints of either class load into the other)."""

    _writes_files = True  # rank 0 copies the carried files (set at `setup`)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._writes_files = trainer.is_global_zero

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A callback without a monitored metric (`last.ckpt`) also saves the fit's final state when its schedule did
        not (`every_n_train_steps` past the last multiple, e.g. `trainer.max_steps=3` with a 50-step interval: no
        last.ckpt at all in Lightning), so the last checkpoint is the end of training, to test, probe or resume."""
        super().on_train_end(trainer, pl_module)
        if self.monitor is None and not self._should_skip_saving_checkpoint(trainer):
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        earlier = state_dict.get("dirpath", self.dirpath)
        if earlier == self.dirpath or self.dirpath is None or not _is_local_file_protocol(str(self.dirpath)):
            super().load_state_dict(state_dict)
            return
        carried = self._carry_over(state_dict) if self.monitor else None
        if carried is not None:
            super().load_state_dict({**state_dict, **carried, "dirpath": self.dirpath})
            return
        with warnings.catch_warnings():  # Lightning's "dirpath has changed" note: said in vl's words where it matters
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)

    def _carry_over(self, state_dict: dict[str, Any]) -> dict[str, Any] | None:
        """The state with each top-k file copied into this run's dir; None (and a warning) when one is gone."""
        dirpath = Path(self.dirpath)  # type: ignore[arg-type]
        earlier: dict[str, Any] = dict(state_dict.get("best_k_models") or {})
        if not earlier or state_dict.get("best_model_score") is None:
            return None
        found: dict[str, tuple[Path, Path]] = {}  # earlier path -> (where it is now, where it goes)
        for old in earlier:
            target = dirpath / Path(old).name
            source = next((p for p in (Path(old), target) if p.is_file()), None)
            if source is None:
                log.warning(
                    "resumed into %s: the earlier run's checkpoint %s (%s=%s) is gone, so the best checkpoint is "
                    "tracked from the resumed epoch on",
                    dirpath,
                    old,
                    self.monitor,
                    float(earlier[old]),
                )
                return None
            found[old] = (source, target)
        for source, target in found.values():  # every file found before any is copied
            if self._writes_files and source != target:
                atomic_copy(source, target)
        moved = {old: str(target) for old, (_, target) in found.items()}
        log.info("resumed into %s: carried over the best checkpoint(s) so far: %s", dirpath, ", ".join(moved))
        return {
            "best_k_models": {moved[old]: score for old, score in earlier.items()},
            "best_model_path": moved.get(state_dict.get("best_model_path", ""), ""),
            "kth_best_model_path": moved.get(state_dict.get("kth_best_model_path", ""), ""),
            "last_model_path": "",
        }
