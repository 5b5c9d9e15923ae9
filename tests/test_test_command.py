"""The test command installs nothing outside the project's virtualenv unless asked (a flag, or
CI=true), and says which deploy checks it skipped and how to get them. apt-get and sudo are
outside the system: fakes on PATH record whether they were run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.backend_neutral

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TOOLS = ROOT / "deploy" / "install-tools.sh"


def _bin_without_promtool(tmp_path: Path) -> tuple[Path, Path]:
    """A PATH of the few commands the script needs, fake apt-get and sudo that log their
    arguments, and no promtool."""
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "system-commands.log"
    for name in ("dirname", "id", "head", "bash"):
        real = subprocess.run(["which", name], capture_output=True, text=True, check=True)
        (folder / name).symlink_to(real.stdout.strip())
    for fake in ("apt-get", "sudo"):
        script = folder / fake
        runs = 'exec "$@"' if fake == "sudo" else "exit 0"
        script.write_text(f'#!/bin/bash\necho "{fake} $*" >> {log}\n{runs}\n')
        script.chmod(0o755)
    return folder, log


def _install_tools(tmp_path: Path, *arguments: str, ci: str | None) -> tuple[int, str, str]:
    folder, log = _bin_without_promtool(tmp_path)
    environment = {"PATH": str(folder), "PYTHON": sys.executable, "HOME": str(tmp_path)}
    if ci is not None:
        environment["CI"] = ci
    done = subprocess.run(
        ["/bin/bash", str(INSTALL_TOOLS), *arguments],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    ran = log.read_text() if log.exists() else ""
    return done.returncode, done.stderr, ran


def test_without_the_flag_nothing_is_installed_with_apt(tmp_path: Path) -> None:
    code, said, ran = _install_tools(tmp_path, ci=None)
    assert ran == ""  # neither apt-get nor sudo
    assert code == 3
    assert "promtool missing; NOT installing it" in said
    assert "deploy/install-tools.sh --system" in said
    assert "tests/run.py --install-system-tools" in said


def test_with_the_flag_or_on_ci_promtool_comes_from_apt(tmp_path: Path) -> None:
    for arguments, ci in ((("--system",), None), ((), "true")):
        folder = tmp_path / (ci or "flag")
        folder.mkdir()
        _, _, ran = _install_tools(folder, *arguments, ci=ci)
        assert "apt-get install -y -qq --no-install-recommends prometheus" in ran


def _run_py() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_py", ROOT / "tests" / "run.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("arguments", "environ", "expected"),
    [
        ([], {}, False),
        (["-q", "-x"], {"CI": "false"}, False),
        (["--install-system-tools", "-q"], {}, True),
        (["-q"], {"CI": "true"}, True),
    ],
)
def test_run_py_asks_for_system_tools_only_when_told(
    arguments: list[str], environ: dict[str, str], expected: bool
) -> None:
    assert _run_py().install_system_tools(arguments, environ) is expected


def test_run_py_names_the_skipped_checks_and_the_tests_skip_them(tmp_path: Path) -> None:
    folder, _ = _bin_without_promtool(tmp_path)
    notice = _run_py().skipped_notice(str(folder))
    assert notice and "promtool deploy checks" in notice and "--install-system-tools" in notice
    environment = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{folder}",
        "MEDWALLET_SKIP_MISSING_PROMTOOL": "1",
        "HOME": str(tmp_path),
    }
    deploy_tests = ROOT / "tests" / "deploy" / "test_deploy_configs.py"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k",
         "promtool_check_config", str(deploy_tests)],
        cwd=ROOT, env=environment, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "1 skipped" in done.stdout, done.stdout
    assert "promtool not installed: python3 tests/run.py --install-system-tools" in done.stdout


def test_run_py_installs_again_only_when_pyproject_or_the_interpreter_changed(
    tmp_path: Path,
) -> None:
    run_py = _run_py()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n')
    stamp_file = tmp_path / run_py.STAMP_NAME
    python = tmp_path / "bin" / "python"
    stamp = run_py.install_stamp(python, pyproject)
    assert run_py.needs_install(stamp_file, stamp)  # a new environment: nothing recorded
    stamp_file.write_text(stamp)
    assert not run_py.needs_install(stamp_file, run_py.install_stamp(python, pyproject))
    other = tmp_path / "other" / "python"
    assert run_py.needs_install(stamp_file, run_py.install_stamp(other, pyproject))
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["y"]\n')
    assert run_py.needs_install(stamp_file, run_py.install_stamp(python, pyproject))
