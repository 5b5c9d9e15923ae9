"""Each Lua script has one typed call in storage/redis/script_io.py or quota_io.py: its header
points there, and the call packs as many arguments and keys as the script reads."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from importlib import resources

import pytest

from authz_server.domain.hot_state import OpenHold
from authz_server.service.ports import AuthorizeCall, Finish, HoldStatus, QuotaRestore
from authz_server.storage.redis import keys
from authz_server.storage.redis.quota_io import (
    Limit,
    QuotaCredit,
    QuotaDebit,
    QuotaDissolve,
    QuotaRestoreCall,
    RateLimit,
)
from authz_server.storage.redis.script_io import (
    Authorize,
    AuthorizeForget,
    AuthorizeUndo,
    CaptureBegin,
    CaptureClear,
    CaptureFinish,
    Expire,
    HoldRestore,
    ScriptCall,
    Void,
    hold_fields,
    hold_record,
)
from authz_server.storage.redis.scripts import ALL_SCRIPTS, NOT_HOT_STATE, source

pytestmark = pytest.mark.backend_neutral

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CALL = AuthorizeCall(
    keys.new_authorization_id("b"), "m", "b", "k", "PHARMACY", "digest", 100, False, "",
    1, "", False, False, "", 100,
)  # fmt: skip
AUTHORIZATION = CALL.authorization_id
CALLS: list[ScriptCall[object]] = [
    Authorize(CALL, 1),
    AuthorizeUndo.of(CALL, AUTHORIZATION),
    AuthorizeForget(CALL, AUTHORIZATION),
    HoldRestore(OpenHold(AUTHORIZATION, "m", "b", "PHARMACY", "APPROVED", 1, (), NOW, NOW), 1),
    CaptureBegin(AUTHORIZATION, "m", "c", 0, 1),
    CaptureFinish(AUTHORIZATION, "", Finish.CAPTURED, ""),
    CaptureClear(AUTHORIZATION),
    Void(AUTHORIZATION, "m", 1),
    Expire(keys.prefix("b"), 1, 50),
    QuotaCredit("b", "r", 1, "", ""),
    QuotaDebit("b", "r", 1),
    QuotaDissolve("b", "r"),
    QuotaRestoreCall(QuotaRestore("r", "b", "h", True, 1, 1, "EMPLOYEE", 0), "epoch", 0),
    RateLimit("principal", Limit(1.0, 1, 0), "call", 1000),
]


def _source(name: str) -> str:
    return resources.files("authz_server.storage.redis").joinpath("lua", f"{name}.lua").read_text()


def _highest(pattern: str, text: str) -> int:
    return max((int(number) for number in re.findall(pattern, text)), default=0)


def test_every_script_has_one_call() -> None:
    names = sorted(call.SCRIPT.name for call in CALLS)
    assert names == sorted((*ALL_SCRIPTS, *NOT_HOT_STATE))


@pytest.mark.parametrize("call", CALLS, ids=lambda call: call.SCRIPT.name)
def test_a_call_packs_what_its_script_reads(call: ScriptCall[object]) -> None:
    header = _source(call.SCRIPT.name).split("\nlocal ")[0]
    assert type(call).__name__ in header  # the header points to the call
    text = source(call.SCRIPT.name)  # as Redis runs it: _generation.lua reads KEYS[1]
    assert len(call.arguments()) == _highest(r"ARGV\[(\d+)\]", text)
    assert len(call.keys()) == _highest(r"KEYS\[(\d+)\]", text)
    command = call.command()
    assert command[:3] == ("EVALSHA", call.SCRIPT.sha, len(call.keys()))
    script_keys = call.keys()
    assert len({key.split("}")[0] for key in script_keys}) == 1  # every key in one slot


def test_a_hold_put_back_from_sql_reads_back_as_it_was() -> None:
    hold = OpenHold(AUTHORIZATION, "m", "b", "PHARMACY", "APPROVED", 700, (("r", 700),), NOW, NOW)
    fields = hold_fields(hold, 1)
    record = hold_record([str(field).encode() for field in fields])
    assert record is not None
    assert (record.merchant_id, record.beneficiary_id, record.purpose, record.status) == (
        "m", "b", "PHARMACY", HoldStatus.PENDING,
    )  # fmt: skip
    assert (record.approved_fen, record.funding, record.one_step) == (700, (("r", 700),), False)
    assert record.put_back
    assert record.expires_ms == record.created_ms == int(NOW.timestamp() * 1000)
    assert hold_record([]) is None
