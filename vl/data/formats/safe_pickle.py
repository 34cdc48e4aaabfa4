"""Reading data pickles (ViLBERT's VQA target / answer caches, RefCOCO refs, hard-negative pools, LMDB feature records)
without running code from them.

`pickle.load` calls any importable callable a file names. `SafeUnpickler` resolves only plain-data globals: builtins
containers/scalars, `collections` containers, numpy arrays / dtypes / scalars (and `_codecs.encode`, which protocol-2
pickles use for bytes). Anything else (`os.system`, `builtins.eval`, a class of some package) is refused with a
`DataError` naming the file and the global, before anything is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import IO, Any

from vl.errors import DataError

_BUILTINS = {
    "set",
    "frozenset",
    "list",
    "dict",
    "tuple",
    "int",
    "float",
    "complex",
    "str",
    "bytes",
    "bytearray",
    "bool",
    "slice",
    "range",
}
ALLOWED: dict[str, set[str]] = {
    "builtins": _BUILTINS,
    "__builtin__": _BUILTINS,  # Python 2 pickles
    "collections": {"OrderedDict", "defaultdict", "Counter", "deque"},
    "_codecs": {"encode"},
    "codecs": {"encode"},
    "numpy": {"ndarray", "dtype", "bool_", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"},
    "numpy._core.numeric": {"_frombuffer"},
    "numpy.dtypes": {
        f"{t}DType" for t in ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "Float16", "Float32", "Float64")
    },
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside `ALLOWED`."""


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")


def _refusal(where: str, err: RefusedGlobal) -> DataError:
    return DataError(
        f"{where}: refused to unpickle: it would call '{err}', which is not plain data (allowed: builtins and "
        "collections containers, numpy arrays)"
    )


def safe_load(f: IO[bytes], where: str, *, encoding: str = "ASCII") -> Any:
    """Unpickle from an open binary file; `where` names it in errors. Other unpickling errors propagate."""
    try:
        return SafeUnpickler(f, encoding=encoding).load()
    except RefusedGlobal as e:
        raise _refusal(where, e) from None


def safe_loads(data: bytes, where: str) -> Any:
    """Unpickle bytes (e.g. an LMDB value); `where` names the file and key in errors."""
    return safe_load(io.BytesIO(data), where)


def read_pickle_file(path: str | Path, *, latin1_fallback: bool = False) -> Any:
    """A data pickle file -> its object; DataError naming the file when missing, refused or unreadable.
    `latin1_fallback`: retry with ``encoding="latin1"`` (Python 2 pickles with non-ASCII byte strings)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            try:
                return safe_load(f, str(path))
            except UnicodeDecodeError:
                if not latin1_fallback:
                    raise
                f.seek(0)
                return safe_load(f, str(path), encoding="latin1")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a data error
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from None


__all__ = ["ALLOWED", "SafeUnpickler", "read_pickle_file", "safe_load", "safe_loads"]
