"""The one place a foreign state dict enters a model: read it safely (`read_state_dict`), rename its keys and load it
loudly (`load_mapped_state_dict`: every source key either maps onto a parameter of the model, same shape, or is listed
by the caller as expected-unused; any other key is a `ConfigError`, as is a shape mismatch, so a checkpoint never loads
"half" without saying so; missing model keys, heads the checkpoint lacks, are logged)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from vl.errors import ConfigError
from vl.models.bert_backbone import log_key_report
from vl.pretrained import as_one_element

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path, *, key: str = "model.state_dict_path") -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or a torch file (loaded with `weights_only=True`: no code runs) holding it
    directly or under `module` (DeepSpeed) / `state_dict` (Lightning) / `model`."""
    path = Path(path).expanduser()
    from vl.checkpoint import load_safetensors, load_torch_file

    if path.suffix == ".safetensors":
        return load_safetensors(path, key)  # damage named in one line

    state = load_torch_file(path, key)  # weights_only: a file that would run code is refused, damage named
    for inner in ("module", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(inner), dict):
            state = state[inner]
            break
    if not isinstance(state, dict):
        raise ConfigError(f"{key}: '{path}' holds a {type(state).__name__}, not a state dict")
    return state


def load_mapped_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    map_key: Callable[[str], str | None],
    *,
    what: str,
    expected_unused: Iterable[str] = (),
    transforms: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, list[str]]:
    """Load `state` into `model` through `map_key` (source key -> model key, or None: maps to nothing).

    `expected_unused`: regular expressions (full match on the source key) of keys allowed to map to nothing.
    `transforms`: a function applied to the mapped {model key: tensor} dict before loading (e.g. a label flip).
    Raises `ConfigError` naming the keys that map to nothing unexpectedly, or whose shapes differ. Logs the missing
    and unused keys. Returns {"missing", "unused", "loaded"}."""
    own = model.state_dict()
    patterns = [re.compile(p) for p in expected_unused]
    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unused: list[str] = []
    unknown: list[str] = []
    bad_shape: list[str] = []
    for key, value in state.items():
        new = map_key(key)
        if new is None or new not in own:
            (unused if any(p.fullmatch(key) for p in patterns) else unknown).append(key)
            continue
        if new in mapped:
            raise ConfigError(f"{what}: '{sources[new]}' and '{key}' both map to '{new}'")
        mapped[new], sources[new] = as_one_element(value, own[new]), key
    if transforms is not None:
        mapped = transforms(mapped)
    for new, value in mapped.items():
        if tuple(own[new].shape) != tuple(value.shape):
            bad_shape.append(f"{sources.get(new, new)} {tuple(value.shape)} -> {new} {tuple(own[new].shape)}")
    if unknown:
        more = f" ... (+{len(unknown) - 10})" if len(unknown) > 10 else ""
        raise ConfigError(
            f"{what}: {len(unknown)} checkpoint key(s) map to no parameter of {type(model).__name__}: "
            f"{', '.join(sorted(unknown)[:10])}{more}"
        )
    if bad_shape:
        raise ConfigError(f"{what}: shape mismatch (check the model sizes): {'; '.join(bad_shape[:5])}")
    result = model.load_state_dict(mapped, strict=False)
    loaded_storage = {own[k].data_ptr() for k in mapped}
    # a tied parameter (e.g. the MLM decoder = the word embeddings) is loaded when its twin is
    missing = sorted(k for k in result.missing_keys if own[k].data_ptr() not in loaded_storage)
    log_key_report(what, missing, sorted(unused))
    if unused:
        log.info("%s: the %d unexpected keys are expected-unused (not part of this model)", what, len(unused))
    return {"missing": missing, "unused": sorted(unused), "loaded": sorted(mapped)}
