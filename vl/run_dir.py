"""One run per run dir: a Hydra callback that claims `hydra.run.dir` (or the multirun's `hydra.sweep.dir`) before
Hydra writes anything into it.

Hydra saves `<run dir>/.hydra/config.yaml` before the task function (and `on_job_start`) runs, so a guard inside
`train()` comes too late: a refused re-run would already have replaced the old run's config, after which its
checkpoints no longer evaluate. `RunDirGuard.on_run_start` runs before that. The claim is an exclusive `flock` on
`<run dir>/.vl-run.lock`, held for the life of the process (the kernel drops it when the process ends, also on a
kill): of two runs given the same dir at once exactly one proceeds; the other is refused with one line, as is a run
into a dir that already holds checkpoints (unless it resumes: `ckpt_path=` set).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from vl.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "RunDirGuard", "check_launcher", "claim_run_dir", "is_requeued", "release_run_dir"]

LOCK_NAME = ".vl-run.lock"
_held: dict[Path, int] = {}  # run dir -> fd of its lock file, for this process


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Non-empty `checkpoints/` dirs of the run (its own, a pretrain stage's, a sweep's jobs')."""
    found = []
    for pattern in ("checkpoints", "*/checkpoints", "*/*/checkpoints"):
        found += [d for d in run_dir.glob(pattern) if d.is_dir() and any(d.iterdir())]
    return found


def claim_run_dir(
    run_dir: str | Path, *, resume: bool = False, key: str = "hydra.run.dir", instead: str | None = None
) -> Path:
    """Claim `run_dir` for this process (created if needed). Raises ConfigError when another live process holds it,
    or when it already holds checkpoints and `resume` is false (naming `key`; `instead`: what to do, when not the
    default "use a new dir, or ckpt_path=<checkpoint> to resume"). Idempotent within one process."""
    import fcntl

    run_dir = Path(run_dir).expanduser().resolve()
    if run_dir in _held:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = lock.read_text().strip() or "another process"
        os.close(fd)
        raise ConfigError(f"{key}: {run_dir} is in use by another run ({owner}); give each run its own dir") from None
    ckpts = [] if resume else _checkpoint_dirs(run_dir)
    if ckpts:
        os.close(fd)  # releases the lock
        raise ConfigError(
            f"{key}: {run_dir} already holds checkpoints of an earlier run ({ckpts[0]}); refusing to overwrite "
            f"them, its results or its .hydra/config.yaml ({instead or 'use a new dir, or ckpt_path=<checkpoint> to resume'})"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held[run_dir] = fd
    return run_dir


def release_run_dir(run_dir: str | Path) -> None:
    """Drop this process's claim (the lock file stays; it is only a lock)."""
    fd = _held.pop(Path(run_dir).expanduser().resolve(), None)
    if fd is not None:
        os.close(fd)


def _is_secondary_rank() -> bool:
    """Processes a launcher starts for ranks > 0 (Lightning's DDP subprocess launcher re-runs the script with the same
    hydra.run.dir; torchrun / SLURM start one per rank): the rank-0 process holds the claim."""
    return any(int(os.environ.get(key) or 0) != 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def is_requeued() -> bool:
    """A SLURM job started again after preemption or timeout (`SLURM_RESTART_COUNT` > 0): it resumes in its own run
    dir from `checkpoints/last.ckpt`, so that dir holding checkpoints is expected."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def _rank_zero_writes_only(config: DictConfig) -> None:
    """On ranks > 0 Hydra would write the same `.hydra/` files into the shared run dir and append to rank 0's log:
    keep `.hydra/` to rank 0 and send this rank's log to `logs/rank<k>.log`."""
    rank = next((os.environ[k] for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK") if os.environ.get(k)), "x")
    read_only = OmegaConf.is_readonly(config)
    OmegaConf.set_readonly(config, False)
    try:
        with open_dict(config):
            config.hydra.output_subdir = None
            handler = OmegaConf.select(config, "hydra.job_logging.handlers.file")
            if handler is not None and "filename" in handler:
                handler.filename = f"${{hydra.runtime.output_dir}}/logs/rank{rank}.log"
                Path(OmegaConf.select(config, "hydra.run.dir") or ".", "logs").mkdir(parents=True, exist_ok=True)
    finally:
        OmegaConf.set_readonly(config, read_only)


class RunDirGuard(Callback):
    """Hydra callback (`hydra.callbacks.run_dir_guard` in conf/hydra/default.yaml). `resume_key`: the config key
    whose value, when set, allows a dir that already holds checkpoints (train: `ckpt_path`; evaluate: none)."""

    def __init__(self, resume_key: str | None = "ckpt_path") -> None:
        self.resume_key = resume_key

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guard(config, "hydra.run.dir")
        if not _is_secondary_rank() and _chosen_output_dir(config):  # the run writes there, not in hydra.run.dir
            self._guard(config, "paths.output_dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_launcher(config)  # before the sweep dir is claimed (created)
        self._guard(config, "hydra.sweep.dir")

    def _guard(self, config: DictConfig, key: str) -> None:
        if _is_secondary_rank():
            _rank_zero_writes_only(config)
            return
        run_dir = OmegaConf.select(config, key)
        keys = [self.resume_key, "resume"] if self.resume_key else []  # `resume=<run dir>` continues in its dir
        resume = any(OmegaConf.select(config, k, default=None) for k in keys) or is_requeued()
        instead = (
            None if self.resume_key else "an evaluation writes its results and predictions there: give it another dir"
        )
        try:
            claim_run_dir(str(run_dir), resume=resume, key=key, instead=instead)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


def check_launcher(config: DictConfig) -> None:
    """`hydra/launcher=slurm` where SLURM is not (no `sbatch` on PATH): one line and exit 2 before any job is planned,
    instead of submitit's traceback ("Could not detect srun") at the first submission."""
    import shutil

    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if "submitit" in target and "Slurm" in target and shutil.which("sbatch") is None:
        print(
            "error: hydra/launcher=slurm: no `sbatch` on PATH (not a SLURM node); run the sweep on the cluster's login "
            "node, or drop hydra/launcher=slurm to run its jobs here",
            file=sys.stderr,
        )
        sys.exit(2)


def _chosen_output_dir(config: DictConfig) -> bool:
    """Whether `paths.output_dir` is set to a dir of its own (`paths.output_dir=<dir>`), not Hydra's run dir."""
    paths = config.get("paths")
    if not isinstance(paths, DictConfig) or "output_dir" not in paths:
        return False
    raw = OmegaConf.to_container(paths, resolve=False).get("output_dir")
    return isinstance(raw, str) and "hydra:runtime.output_dir" not in raw
