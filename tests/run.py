#!/usr/bin/env python3
"""The test command: installs what the tests need into .venv, then runs pytest.

    python3 tests/run.py                 # everything, on SQLite and a private redis-server
    python3 tests/run.py -m "not slow"   # any pytest arguments pass through

Needs only Python 3.11+. Set TEST_DATABASE_URL=postgresql+psycopg://... to run against
PostgreSQL instead of SQLite (each run uses a private schema), as .ci/run does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def python_of(environment: Path) -> Path:
    return environment / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def main() -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - this runs on whatever python3 is first
        print("Python 3.11 or newer is needed", file=sys.stderr)
        return 2
    in_venv = sys.prefix != sys.base_prefix
    python = Path(sys.executable) if in_venv else python_of(VENV)
    if not in_venv and not python.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    quiet = ["--quiet", "--disable-pip-version-check"]
    subprocess.run([python, "-m", "pip", "install", *quiet, "-e", f"{ROOT}[test]"], check=True)
    install_tools = ROOT / "deploy" / "install-tools.sh"
    if install_tools.exists() and shutil.which("bash"):
        # promtool for the deploy/ checks (Debian package); skipped where apt is not ours to use
        subprocess.run(["bash", str(install_tools)], check=False)
    environment = dict(os.environ, PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}")
    command = [str(python), "-m", "pytest", *sys.argv[1:]]
    return subprocess.run(command, cwd=ROOT, env=environment).returncode


if __name__ == "__main__":
    raise SystemExit(main())
