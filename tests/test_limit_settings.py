"""The per-principal limits are read strictly (MEDWALLET_MERCHANT_LIMIT, MEDWALLET_CHANNEL_LIMIT,
MEDWALLET_LIMITS_FILE): a misspelt field ("inflight"), a rate that is not a finite number, or a
limits file key that names no principal was taken silently before, and the bound it meant was
never applied (no calls-in-flight bound at all; a NaN rate that refuses nothing). Now the
variable stops the start with a SettingError naming it, and a bad file with its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authz_server.server.limits import Limits, parse_limit
from authz_server.settings import SettingError, Settings
from authz_server.storage.redis.rate_limiter import Limit

pytestmark = pytest.mark.backend_neutral

GOOD = "rate=50,burst=100,in_flight=20"


@pytest.mark.parametrize(
    "text",
    [
        "rate=1000,burst=2000,inflight=500",  # misspelt: no in-flight bound at all
        "rate=1000,burst=2000,in-flight=500",
        "rate=nan,burst=2000,in_flight=500",  # a NaN rate: no refusal, ever
        "rate=inf,burst=2000,in_flight=500",
        "rate=1000,burst=2000,in_flight=500,rate=1",  # which rate?
        "rate=1000,in_flight=500",
        "rate=1000,burst=2000,in_flight",
    ],
)
def test_a_limit_that_would_not_be_applied_as_written_stops_the_start(text: str) -> None:
    for name in ("MEDWALLET_MERCHANT_LIMIT", "MEDWALLET_CHANNEL_LIMIT"):
        with pytest.raises(SettingError, match=name):
            Settings.from_environment({name: text})
    with pytest.raises(ValueError):
        parse_limit(text)


def test_good_limits_are_read_as_written() -> None:
    settings = Settings.from_environment(
        {"MEDWALLET_MERCHANT_LIMIT": GOOD, "MEDWALLET_CHANNEL_LIMIT": " rate=0.5 , burst=1 "}
    )
    assert parse_limit(settings.merchant_limit) == Limit(50.0, 100, 20)
    assert parse_limit(settings.channel_limit) == Limit(0.5, 1, 0)
    defaults = Settings()
    assert parse_limit(defaults.merchant_limit) == Limit(1000.0, 2000, 500)
    assert parse_limit(defaults.channel_limit) == Limit(5000.0, 10000, 2000)


@pytest.mark.parametrize(
    "document",
    [
        {"merchants:M1": GOOD},  # matches no principal: M1 keeps the default
        {"channel:app": GOOD},  # channels are APP, PROVINCIAL_PLATFORM, SERVICE_WINDOW
        {"M1": GOOD},
        {"merchant:M1": "rate=50,burst=100,inflight=20"},
        {"merchant:M1": 50},
    ],
)
def test_a_limits_file_entry_that_would_not_apply_is_refused(
    tmp_path: Path, document: dict[str, object]
) -> None:
    file = tmp_path / "limits.json"
    file.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="limits file"):
        Limits.from_settings(GOOD, GOOD, str(file))


def test_a_good_limits_file_is_read(tmp_path: Path) -> None:
    file = tmp_path / "limits.json"
    file.write_text(json.dumps({"merchant:M1": "rate=5,burst=5", "channel:APP": GOOD}))
    limits = Limits.from_settings(GOOD, GOOD, str(file))
    assert limits.principals == {
        "merchant:M1": Limit(5.0, 5, 0),
        "channel:APP": Limit(50.0, 100, 20),
    }
