"""The generated code is exactly what `python protos/generate.py` writes from the protos now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "authz_server" / "generated"

pytestmark = pytest.mark.static


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "generate_protos", ROOT / "protos" / "generate.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate_protos"] = module
    spec.loader.exec_module(module)
    return module


def _sources(root: Path) -> dict[Path, bytes]:
    """The .py and .pyi files under root (not __pycache__), by path relative to root."""
    return {
        path.relative_to(root): path.read_bytes()
        for path in root.rglob("*")
        if path.suffix in (".py", ".pyi") and "__pycache__" not in path.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    _generator().generate(tmp_path / "generated")
    fresh = _sources(tmp_path / "generated")
    committed = _sources(GENERATED)
    stale = sorted(str(name) for name in fresh.keys() | committed.keys()
                   if fresh.get(name) != committed.get(name))  # fmt: skip
    assert not stale, f"stale generated code, run `python protos/generate.py`: {stale}"
