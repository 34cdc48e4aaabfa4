"""vl: Hydra-configured PyTorch Lightning framework for vision-and-language BERTs.

`from vl import load` stays light: the model stack is imported when `load` is called."""

from __future__ import annotations

from typing import Any

from vl._version import __version__

__all__ = ["__version__", "load"]


def load(path: Any, **kwargs: Any) -> Any:
    """A trained run ready for `match` / `answer` / `rank` / `fill_mask` (`vl.inference.load`)."""
    from vl.inference import load as _load

    return _load(path, **kwargs)
