"""Loading checkpoints and weight files without running code from them, with one-line errors naming the file.

* `load_torch_file(path, what)`: `torch.load(weights_only=True)` (PyTorch's restricted unpickler: tensors, plain
  containers and numbers only; a file whose pickle imports anything else is refused, never executed). `vl`'s own
  Lightning checkpoints need no extra allow-listed globals (`ALLOWED_GLOBALS`: hyper-parameters are plain dicts,
  since models are instantiated with `_convert_: all`). A missing, empty, truncated or non-torch file fails with
  `what: 'path' ...what is wrong`.
* `read_checkpoint(path, what, resume=...)`: the above, plus "is this a Lightning checkpoint" (and, to resume, one that
  holds the optimizer and loop state).
* `check_architecture(ckpt, model, path, what)`: the checkpoint holds the model class that was asked for, with the
  same parameter names and shapes; otherwise one line naming both architectures / the first mismatching keys.
  Run before Lightning sees the file, so a wrong `ckpt_path` never ends in a traceback.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from vl.errors import ConfigError, VLError

#: Globals (beyond PyTorch's defaults) that vl's own checkpoints need under `weights_only=True`: none today. Add a
#: class here only if a checkpoint written by vl cannot load otherwise; `torch.serialization.add_safe_globals` is
#: called with it on import.
ALLOWED_GLOBALS: list[Any] = []
if ALLOWED_GLOBALS:  # pragma: no cover
    torch.serialization.add_safe_globals(ALLOWED_GLOBALS)

#: key written into every vl checkpoint (`VLSystem.on_save_checkpoint`): the LightningModule class that saved it
ARCH_KEY = "vl_architecture"
#: key of the run record every vl checkpoint holds (`VLSystem.run_record`, set by the pipeline): `format`,
#: `vl_version`, `config` (the stage's resolved config), `tokenizer`, `answers` (answer vocabulary or None)
RUN_KEY = "vl_run"
#: the layout of the run record this vl writes and reads; a checkpoint with a newer format is refused
CHECKPOINT_FORMAT = 1
_ZIP_MAGIC = b"PK\x03\x04"


def _refused_global(message: str) -> str | None:
    """The global a weights-only unpickler refused, from torch's multi-line message."""
    for pattern in (r"unsupported GLOBAL (\S+)", r"Unsupported global: GLOBAL (\S+)", r"GLOBAL (\S+)"):
        found = re.search(pattern, message, flags=re.IGNORECASE)
        if found:
            return found.group(1)
    return None


def _crc_failure(path: Path) -> str | None:
    """The first record of a torch zip file whose CRC-32 does not match (same-size damage), else None."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
        return f"? ({_first_line(e)})"


def load_torch_file(path: str | Path, what: str, *, error: type[VLError] = ConfigError, verify: bool = True) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with a one-line `error` naming `what` and the file
    when it is missing, empty, truncated / damaged, not a torch file, or would need code to unpickle. `verify`: also
    check every record's CRC-32 (reads the whole file once; catches same-size damage torch itself does not see)."""
    path = Path(path).expanduser()
    where = f"{what}: '{path}'"
    if not path.exists():
        raise error(f"{where} does not exist")
    if path.is_dir():
        raise error(f"{where} is a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise error(f"{where} is empty (0 bytes; an interrupted write?)")
    with path.open("rb") as f:
        head = f.read(4)
    is_zip = head == _ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(path):
        raise error(
            f"{where} is truncated or damaged ({size} bytes; its zip directory is missing - an interrupted write?)"
        )
    if not is_zip and head[:1] != b"\x80":  # neither torch's zip format nor its legacy pickle format
        raise error(f"{where} is not a PyTorch checkpoint (it starts with {head!r})")
    if is_zip and verify:
        bad = _crc_failure(path)
        if bad:
            raise error(f"{where} is damaged: its record '{bad}' fails its CRC check ({size} bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused:
            raise error(
                f"{where} refused: unpickling it would import '{refused}' (code, not weights); vl loads only tensors "
                "and plain data (weights_only=True) - re-export the weights (e.g. safetensors) from a trusted source"
            ) from None
        raise error(f"{where} is not a PyTorch checkpoint ({_first_line(e)})") from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        if is_zip:
            raise error(f"{where} is truncated or damaged ({size} bytes; {_first_line(e)})") from None
        raise error(f"{where} is not a PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from None


def load_safetensors(
    path: str | Path, what: str, *, keys: Any = None, error: type[VLError] = ConfigError
) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file (only those whose names are in `keys` when given: the others are not
    read), with a one-line `error` naming `what` and the file when it is missing or not a readable safetensors file
    (truncated, damaged, foreign: safetensors' own `SafetensorError` was a traceback)."""
    path = Path(path).expanduser()
    where = f"{what}: '{path}'"
    if not path.is_file():
        raise error(f"{where} does not exist")
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if keys is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k in keys}
    except Exception as e:  # noqa: BLE001 - a truncated / foreign file: one line naming it
        raise error(f"{where} is not a readable safetensors file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


def read_checkpoint(path: str | Path, what: str = "ckpt_path", *, resume: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint (dict with a `state_dict` of tensors), safely loaded. `resume`: it must also hold the
    optimizer and loop state (not a `save_weights_only` file)."""
    ckpt = load_torch_file(path, what)
    where = f"{what}: '{Path(path).expanduser()}'"
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{where} is not a Lightning checkpoint (it holds a {type(ckpt).__name__})")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(str(k)[:60] for k in list(ckpt)[:3]) + (", ..." if len(ckpt) > 3 else "")
        raise ConfigError(f"{where} is not a Lightning checkpoint (no 'state_dict' of tensors; top-level keys: {keys})")
    if resume:
        lacking = [k for k in ("optimizer_states", "loops", "epoch", "global_step") if k not in ckpt]
        if lacking:
            raise ConfigError(
                f"{where} cannot resume training: it holds weights only (no {', '.join(lacking)}); start a new run "
                "from it with model.init_from=<file> instead"
            )
    return ckpt


def is_deepspeed_dir(path: str | Path) -> bool:
    """A DeepSpeed checkpoint directory (`hardware=deepspeed` saves `last.ckpt/` with `latest` + `checkpoint/`):
    resumed by DeepSpeed's own loader, which `vl` cannot make weights-only."""
    path = Path(path).expanduser()
    return path.is_dir() and ((path / "latest").is_file() or (path / "checkpoint").is_dir())


def architecture_name(model: torch.nn.Module) -> str:
    """The architecture a system is: its encoder's class (one shared system runs every encoder), else its class."""
    encoder = getattr(model, "encoder", None)
    return type(encoder).__name__ if isinstance(encoder, torch.nn.Module) else type(model).__name__


def architecture_of(ckpt: dict[str, Any]) -> str:
    """The architecture a checkpoint holds: the recorded name, else inferred from its hyper-parameters."""
    if isinstance(ckpt.get(ARCH_KEY), str):
        return ckpt[ARCH_KEY]
    hparams = ckpt.get("hyper_parameters") or {}
    encoder = hparams.get("encoder")
    if isinstance(encoder, dict) and isinstance(encoder.get("_target_"), str):
        return encoder["_target_"].rsplit(".", 1)[-1]
    # checkpoints of the systems before encoders were injected
    if "v_hidden" in hparams or "bi_hidden" in hparams:
        return "VilbertEncoder"
    if "use_image" in hparams or "state_dict_path" in hparams or "image_dim" in hparams:
        return "ClipBertEncoder"
    if "pooling" in hparams:
        return "SingleStreamEncoder"
    return "unknown"


def check_architecture(ckpt: dict[str, Any], model: torch.nn.Module, path: str | Path, what: str = "ckpt_path") -> None:
    """One line when `ckpt` does not hold `model`'s architecture, or holds it with other parameter names / shapes."""
    where = f"{what}: '{Path(path).expanduser()}'"
    held, asked = architecture_of(ckpt), architecture_name(model)
    if held not in ("unknown", asked):
        raise ConfigError(f"{where} holds a {held} checkpoint, but the config asks for {asked}")
    if hasattr(model, "drop_unbuilt"):  # parts an older vl built although unused (e.g. the pooler under mean pooling)
        model.drop_unbuilt(ckpt["state_dict"])
    saved, own = ckpt["state_dict"], model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = sorted(k for k in set(own) & set(saved) if tuple(own[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatch(es), e.g. {k}: {tuple(saved[k].shape)} in the file, "
                f"{tuple(own[k].shape)} asked"
            )
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise ConfigError(
            f"{where} holds a {held if held != 'unknown' else 'model'} that does not match the configured {asked} "
            f"({'; '.join(parts)})"
        )


def run_record(ckpt: dict[str, Any], path: str | Path, what: str = "ckpt_path") -> dict[str, Any] | None:
    """The checkpoint's run record (resolved config, tokenizer, answers), None for a checkpoint written before vl
    stored one; a record of a newer, unknown layout is refused in one line."""
    record = ckpt.get(RUN_KEY)
    if record is None:
        return None
    where = f"{what}: '{Path(path).expanduser()}'"
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"{where} holds a damaged run record ('{RUN_KEY}' is not a dict with a 'config')")
    fmt = record.get("format")
    if not isinstance(fmt, int) or fmt > CHECKPOINT_FORMAT:
        from vl._version import __version__

        raise ConfigError(
            f"{where} was written by vl {record.get('vl_version', '?')} (checkpoint format {fmt}); this vl "
            f"{__version__} reads format {CHECKPOINT_FORMAT} and older - use the vl version that wrote it"
        )
    return record


__all__ = [
    "ARCH_KEY",
    "CHECKPOINT_FORMAT",
    "RUN_KEY",
    "run_record",
    "architecture_name",
    "architecture_of",
    "check_architecture",
    "load_torch_file",
    "read_checkpoint",
]
