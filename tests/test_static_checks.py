"""The project's static checks, run by the test command so CI fails when one does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import drop_database, fresh_database

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.static


def run(*command: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert found, f"{name} is not installed; run python3 tests/run.py"
    return found


def test_ruff_lint() -> None:
    run(tool("ruff"), "check", ".")


def test_ruff_format() -> None:
    run(tool("ruff"), "format", "--check", ".")


def test_mypy_strict() -> None:
    run(tool("mypy"), "authz_server", "clients", "loadtest")


def test_buf_lint() -> None:
    run(tool("buf"), "lint", "protos")


@pytest.mark.sql_schema  # on PostgreSQL too: .ci/run selects it into its PostgreSQL pass
def test_alembic_check(tmp_path: Path) -> None:
    """The migrations produce exactly the tables the code declares (SQLite or PostgreSQL)."""
    url = fresh_database(os.environ.get("TEST_DATABASE_URL"), tmp_path)
    try:
        run(tool("alembic"), "check", env=dict(os.environ, DATABASE_URL=url))
    finally:
        drop_database(url)
