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


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    _generator().generate(tmp_path / "generated")
    fresh = {p.relative_to(tmp_path / "generated"): p.read_bytes() for p in tmp_path.rglob("*.py*")}
    committed = {p.relative_to(GENERATED): p.read_bytes() for p in GENERATED.rglob("*.py*")}
    stale = sorted(str(name) for name in fresh.keys() | committed.keys()
                   if fresh.get(name) != committed.get(name))  # fmt: skip
    assert not stale, f"stale generated code, run `python protos/generate.py`: {stale}"
