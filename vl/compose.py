"""What composing a config needs, without importing torch or Lightning: the structured-config schemas and the resolvers.

The schemas are generated from the constructors' signatures (`vl.build.schemas`, `vl.eval.tasks.task_schemas`), which
means importing every model and DataModule (torch, Lightning, transformers: seconds). `train.py --help`, `--cfg job`
and a compose error need none of that, so the generated schemas are cached as JSON (field names, types, defaults; no
code) in `$VL_CACHE_DIR` (default `~/.cache/vl`), keyed by a hash of vl's source files: any edit to `vl/` makes a new
key, so a cached schema never differs from the one the signatures give (`tests/test_configs.py` checks the round trip).
A missing, unreadable or stale cache falls back to importing the classes (and rewrites the cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from vl import config as _config
from vl.config import register_resolvers

log = logging.getLogger(__name__)

CACHE_VERSION = 1
#: hand-written schemas in `vl.config` (cheap to import): referenced by name, not serialised
_REFERENCED = ("OptimizerConfig", "CorpusConfig")


class Unsupported(TypeError):
    """A schema field this cache cannot represent (the caller then uses the generated classes directly)."""


# ---------------------------------------------------------------------------------------------------- source key
def source_digest() -> str:
    """sha256 over vl's Python sources (relative path + bytes), so every edit to `vl/` is a new cache key."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256(f"vl-schemas/{CACHE_VERSION}".encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_path(digest: str) -> Path:
    base = os.environ.get("VL_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vl"
    return Path(base) / f"schemas-{digest[:24]}.json"


# ---------------------------------------------------------------------------------------------------- dataclass <-> JSON
def _type_spec(hint: Any) -> Any:
    if hint in (int, float, str, bool):
        return hint.__name__
    if hint is Any:
        return "Any"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if hint.__name__ in _REFERENCED and getattr(_config, hint.__name__) is hint:
            return {"ref": hint.__name__}
        return {"schema": schema_spec(hint)}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return {"optional": _type_spec(next(a for a in args if a is not type(None)))}
    if origin is list and len(args) == 1:
        return {"list": _type_spec(args[0])}
    if origin is dict and len(args) == 2 and args[0] is str:
        return {"dict": _type_spec(args[1])}
    raise Unsupported(f"type {hint!r}")


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v) for k, v in value.items()}
    raise Unsupported(f"default {value!r}")


def schema_spec(cls: type) -> dict[str, Any]:
    """A schema dataclass -> {"name", "fields": [[name, type, default], ...]} (JSON; nested schemas inline)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        kind = _type_spec(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default: Any = {"value": _json_value(f.default)}
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            made = f.default_factory()  # type: ignore[misc]
            default = {"nested": True} if dataclasses.is_dataclass(made) else {"value": _json_value(made)}
        else:
            default = {}
        fields.append([f.name, kind, default])
    return {"name": cls.__name__, "fields": fields}


def _type_of(spec: Any) -> Any:
    if isinstance(spec, str):
        return {"int": int, "float": float, "str": str, "bool": bool, "Any": Any}[spec]
    if "ref" in spec:
        return getattr(_config, spec["ref"])
    if "schema" in spec:
        return schema_from_spec(spec["schema"])
    if "optional" in spec:
        return Optional[_type_of(spec["optional"])]  # noqa: UP045 - a runtime type object for OmegaConf
    if "list" in spec:
        return list[_type_of(spec["list"])]
    return dict[str, _type_of(spec["dict"])]


def _copying(value: Any) -> Any:
    return lambda: json.loads(json.dumps(value))


def schema_from_spec(spec: dict[str, Any]) -> type:
    """The dataclass `schema_spec` described (same field names, types and defaults)."""
    fields = []
    for name, kind_spec, default in spec["fields"]:
        kind = _type_of(kind_spec)
        if default.get("nested"):
            fields.append((name, kind, field(default_factory=kind)))
        elif "value" in default:
            value = default["value"]
            made = field(default_factory=_copying(value)) if isinstance(value, list | dict) else field(default=value)
            fields.append((name, kind, made))
        else:
            fields.append((name, kind))
    return dataclasses.make_dataclass(spec["name"], fields)


# ---------------------------------------------------------------------------------------------------- registration
def generated_schemas() -> dict[tuple[str, str], type]:
    """Every schema, generated from the signatures (imports the models and DataModules: slow)."""
    from vl.build import schemas
    from vl.eval.tasks import task_schemas

    return {**schemas(), **task_schemas()}


def _read_cache(path: Path) -> dict[tuple[str, str], type] | None:
    try:
        entries = json.loads(path.read_text())
        return {(group, name): schema_from_spec(spec) for group, name, spec in entries}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, generated: dict[tuple[str, str], type]) -> None:
    try:
        entries = [[group, name, schema_spec(cls)] for (group, name), cls in generated.items()]
    except Unsupported as err:
        log.debug("schema cache not written: %s", err)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)
    except OSError as err:  # a read-only home: compose stays correct, only slower
        log.debug("schema cache not written: %s", err)


def _config_store_copies_are_the_store() -> None:
    """Hydra 1.3 deep-copies its config repository for every config group it lists (`--help` lists ~140) and every
    sweep job, and each copy deep-copies the whole ConfigStore singleton (held by its structured-config source): with
    vl's generated schemas that was 40 s of `--help` on 2 busy cores. Upstream Hydra fixed it by re-fetching the
    singleton instead of storing it (facebookresearch/hydra#2928, after 1.3.2); this gives the same behaviour: a copy
    of the store is the store. Hydra copies the repository only to keep its search-path sources private; the store's
    content is never mutated through a copy (`ConfigStore.load` returns a deep copy of the node)."""
    if "__deepcopy__" not in ConfigStore.__dict__:
        ConfigStore.__deepcopy__ = lambda self, memo: self  # type: ignore[attr-defined]


def register(*, use_cache: bool = True) -> str:
    """Register every schema and resolver for Hydra; returns "cache" or "generated" (where the schemas came from)."""
    register_resolvers()
    _config_store_copies_are_the_store()
    path = cache_path(source_digest()) if use_cache else None
    found = _read_cache(path) if path is not None and path.is_file() else None
    source = "cache"
    if found is None:
        found, source = generated_schemas(), "generated"
        if path is not None:
            _write_cache(path, found)
    cs = ConfigStore.instance()
    for (group, name), node in found.items():
        cs.store(group=group, name=name, node=node)
    return source
