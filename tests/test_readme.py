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


# The programs the README's commands may start: Python and what this project installs.
INSTALLED_HERE = {"python3", "python", "pip", "medwallet-authz", "medwallet"}


def test_the_readme_reaches_the_service_only_with_tools_one_can_install_here() -> None:
    """grpcurl is not packaged in Debian 12: the README's commands use Python and the project's
    own programs (medwallet-authz call, medwallet), and it names no grpcurl invocation."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.DOTALL)
    # A line ending in a backslash goes on on the next; leading VAR=value words set the
    # environment of the program that follows them.
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [part.strip() for line in lines for part in line.split("&&") if part.strip()]
    programs = {
        Path(next(word for word in command.split() if "=" not in word)).name for command in commands
    }
    assert programs <= INSTALLED_HERE, programs
    assert not re.search(r"`grpcurl [^`]*`", readme)
