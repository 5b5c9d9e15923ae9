#!/usr/bin/env python3
"""The test command: installs what the tests need into .venv, then runs pytest.

    python3 tests/run.py                 # everything, on SQLite and a private redis-server
    python3 tests/run.py -m "not slow"   # any pytest arguments pass through
    python3 tests/run.py --install-system-tools   # also apt-get install promtool (root/sudo)

Needs only Python 3.11+. pip installs into .venv when it is new or pyproject.toml has changed
since the last install that succeeded (a stamp in .venv records it; delete .venv to start
afresh); a rerun goes straight to pytest. Installs nothing outside .venv unless asked: promtool
(for the deploy checks) comes from apt only with --install-system-tools or when CI=true (as
.ci/run runs); otherwise its checks are skipped and the run says so, and how to get them.

Set TEST_DATABASE_URL=postgresql+psycopg://... to run against PostgreSQL instead of SQLite (each
run uses a private schema), as .ci/run does.
TEST_REDIS_CLUSTER=1 runs the session's service on a real 3-primary/3-replica Redis Cluster on
loopback (tests/harness.py); tests marked single_redis skip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
# Records what the environment's last successful install was made from (install_stamp).
STAMP_NAME = ".medwallet-installed"


def python_of(environment: Path) -> Path:
    return environment / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


INSTALL_FLAG = "--install-system-tools"
PROMTOOL_CHECKS = "the promtool deploy checks (Prometheus config, alert rules and their unit tests)"


def install_system_tools(arguments: list[str], environ: dict[str, str]) -> bool:
    """Whether this run may install outside .venv: asked for, or on CI (CI=true)."""
    return INSTALL_FLAG in arguments or environ.get("CI", "").lower() == "true"


def skipped_notice(path: str) -> str | None:
    """What this run skips for want of promtool on path, and how to get it; None: nothing."""
    if shutil.which("promtool", path=path):
        return None
    return (
        f"SKIPPED: {PROMTOOL_CHECKS}: promtool is not installed. To run them: "
        f"python3 tests/run.py {INSTALL_FLAG} (apt-get install prometheus, as root or with "
        "sudo), or install Prometheus' promtool (>= 2.37) on PATH yourself."
    )


def install_stamp(python: Path, pyproject: Path) -> str:
    """What an install is made from: the interpreter (its path) and pyproject.toml's bytes."""
    digest = hashlib.sha256(pyproject.read_bytes()).hexdigest()
    return f"{python}\n{digest}\n"


def needs_install(stamp_file: Path, stamp: str) -> bool:
    """Whether pip must run: no install recorded, or one made from something else."""
    try:
        return stamp_file.read_text() != stamp
    except OSError:
        return True


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
    stamp_file = Path(sys.prefix if in_venv else VENV) / STAMP_NAME
    stamp = install_stamp(python, ROOT / "pyproject.toml")
    if needs_install(stamp_file, stamp):
        stamp_file.unlink(missing_ok=True)
        command = [python, "-m", "pip", "install", *quiet, "-e", f"{ROOT}[test]"]
        subprocess.run(command, check=True)
        stamp_file.write_text(stamp)
    arguments = sys.argv[1:]
    system = install_system_tools(arguments, dict(os.environ))
    arguments = [argument for argument in arguments if argument != INSTALL_FLAG]
    environment = dict(os.environ, PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}")
    install_tools = ROOT / "deploy" / "install-tools.sh"
    if install_tools.exists() and shutil.which("bash"):
        # hadolint, kubernetes-validate into .venv; promtool (apt) only when asked or on CI
        tools = ["bash", str(install_tools), *(["--system"] if system else [])]
        subprocess.run(tools, check=False, env=dict(environment, PYTHON=str(python)))
    notice = skipped_notice(environment["PATH"])
    if notice:
        environment["MEDWALLET_SKIP_MISSING_PROMTOOL"] = "1"
        print(notice, flush=True)
    command = [str(python), "-m", "pytest", *arguments]
    return subprocess.run(command, cwd=ROOT, env=environment).returncode


if __name__ == "__main__":
    raise SystemExit(main())
