"""The README documents every setting the server reads and both of its commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme_table() -> None:
    source = (ROOT / "authz_server" / "settings.py").read_text()
    variables = set(re.findall(r'"((?:MEDWALLET_[A-Z_]+)|DATABASE_URL|REDIS_URL)"', source))
    assert len(variables) > 10
    readme = (ROOT / "README.md").read_text()
    missing = sorted(v for v in variables if f"`{v}`" not in readme)
    assert not missing, f"settings missing from the README table: {missing}"


def test_the_two_commands_are_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "medwallet-authz serve --demo" in readme
    assert "python3 tests/run.py" in readme
    assert "tests/run.py" in (ROOT / ".ci" / "run").read_text()
