"""The layer contract of `vl` (pyproject.toml `[tool.importlinter]`): one direction, no cycles. Also run by
`make lint`; here so that it cannot silently regress."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_every_vl_module_imports_in_a_fresh_interpreter() -> None:
    """Each module imports on its own (no hidden order dependence, no cycle hidden by a lazy import)."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "vl").rglob("*.py")
        if p.name != "__main__.py"
    )
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_system_subclasses_restate_no_base_argument() -> None:
    """A system subclass adds only what is special (e.g. a released-weights path) and forwards the rest."""
    import inspect

    from vl.build import MODELS
    from vl.models.system import VLSystem

    base = set(inspect.signature(VLSystem.__init__).parameters) - {"self", "kwargs"}
    for system, _ in MODELS.values():
        own = set(inspect.signature(system.__init__).parameters) - {"self", "kwargs"}
        assert system is VLSystem or not own & base, (system.__name__, sorted(own & base))


def test_schemas_take_their_defaults_from_the_constructors() -> None:
    """`schema/model/<name>` and `schema/data/<name>` are generated: each default is the constructor's (an optional
    mapping whose default is None is an empty mapping in the schema, so the CLI can add keys to it)."""
    import inspect

    from vl.build import DATA, MODELS, data_schema, model_schema

    def same(got, default) -> bool:
        return got == default or (default is None and got == {})

    for name, (system, encoder) in MODELS.items():
        schema = model_schema(system, encoder, name)()
        for key, p in inspect.signature(encoder.__init__).parameters.items():
            if p.default is not p.empty and key != "text_encoder":
                expected = list(p.default) if isinstance(p.default, tuple) else p.default
                assert same(getattr(schema.encoder, key), expected), (name, key)
    for name, datamodule in DATA.items():
        schema = data_schema(datamodule, name)()
        for key, p in inspect.signature(datamodule.__init__).parameters.items():
            if p.default is not p.empty and key not in ("corpus", "splits"):
                assert same(getattr(schema, key), p.default), (name, key)
