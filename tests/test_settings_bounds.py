"""Every numeric setting is read within its bounds (authz_server/settings.py NUMBER_BOUNDS): a
value outside them, or not a number, is refused with a SettingError naming the variable, and
every command stops at once on it (exit 2, one line, no traceback). Before, a negative hold
(MEDWALLET_PHARMACY_HOLD_SECONDS=-5) started a server that answered every capture
AUTHORIZATION_EXPIRED, a negative prepaid safety percent closed months with funds the SQL
ceiling rounds the wrong way, and a word where a number goes ended in a traceback about int()."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from authz_server.settings import NUMBER_BOUNDS, SettingError, Settings

pytestmark = pytest.mark.backend_neutral


def test_the_defaults_are_within_their_bounds() -> None:
    """Every bounded variable's default parses, and the table names no variable the settings
    do not read (each is refused out of bounds below)."""
    settings = Settings.from_environment({})
    assert settings == Settings()
    fields = {field.name for field in dataclasses.fields(Settings)}
    for name in NUMBER_BOUNDS:
        assert name.removeprefix("MEDWALLET_").lower() in fields, name


@pytest.mark.parametrize("name", sorted(NUMBER_BOUNDS))
def test_a_number_outside_its_bounds_is_refused_by_name(name: str) -> None:
    low, high = NUMBER_BOUNDS[name]
    step = 1 if low == int(low) and high == int(high) else 0.0005
    for accepted in (low, high):
        text = str(int(accepted)) if step == 1 else str(accepted)
        Settings.from_environment({name: text})
    for refused in (low - step, high + step, "ten", "", "nan", "1e999"):
        text = refused if isinstance(refused, str) else f"{refused:g}"
        with pytest.raises(SettingError) as caught:
            Settings.from_environment({name: text})
        assert str(caught.value).startswith(f"{name} must be "), caught.value
        assert repr(text) in str(caught.value)


def test_a_command_stops_on_it_with_one_line(tmp_path: Path) -> None:
    environment = dict(
        os.environ, MEDWALLET_DATA_DIR=str(tmp_path / "data"), MEDWALLET_PHARMACY_HOLD_SECONDS="-5"
    )
    environment.pop("DATABASE_URL", None)
    stopped = subprocess.run(
        [sys.executable, "-m", "authz_server.cli", "migrate"],
        env=environment, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert stopped.returncode == 2
    assert stopped.stderr.strip().splitlines() == [
        "medwallet-authz: MEDWALLET_PHARMACY_HOLD_SECONDS must be an integer from 60 to "
        "604,800, not '-5'"
    ]
    assert not (tmp_path / "data").exists()  # nothing was made
