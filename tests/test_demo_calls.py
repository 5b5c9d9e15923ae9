"""The README's copy-paste calls against `medwallet-authz serve --demo` run as a new user would
(a real process, the real command line): twice in a row and again after a restart, each does
what the README says. The demo lists every demo token, and the CLIs name themselves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz_server.runtime import demo
from tests.operations.server_process import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.backend_neutral]


def readme_calls() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("The server prints copy-paste calls") :]
    start = section.index("```sh\n") + 6
    block = section[start : section.index("\n```", start)]
    return [line for line in block.splitlines() if line.startswith("medwallet-authz call")]


class DemoServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.environment = dict(
            os.environ,
            PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
            MEDWALLET_DATA_DIR=str(directory / "data"),
            MEDWALLET_GRPC_HOST="127.0.0.1",
            MEDWALLET_METRICS_PORT=str(free_port()),
            MEDWALLET_WORKERS="1",
        )
        for name in ("DATABASE_URL", "REDIS_URL", "MEDWALLET_TOKENS_FILE"):
            self.environment.pop(name, None)
        self.process: subprocess.Popen[str] | None = None
        self.printed = ""

    def start(self) -> None:
        command = [str(BIN / "medwallet-authz"), "serve", "--demo", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command,
            env=self.environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        lines = []
        for line in self.process.stdout:  # until the printed calls are complete
            lines.append(line)
            if "call --list" in line:
                break
        self.printed = "".join(lines)
        assert "call --list" in self.printed, self.printed

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.communicate(timeout=30)
            self.process = None

    def paste(self, line: str, authorization_id: str = "") -> tuple[int, Any, Any]:
        """Runs a pasted line with bash; (exit code, stdout JSON, stderr JSON or text)."""
        line = line.replace("AUTHORIZATION_ID", authorization_id)
        if "--port" not in line:
            line += f" --port {self.port}"
        done = subprocess.run(
            ["bash", "-c", line],
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        err: Any = done.stderr
        if "{" in done.stderr:  # the error as JSON, after the line naming the key sent
            err = {"said": done.stderr, **json.loads(done.stderr[done.stderr.index("{") :])}
        return done.returncode, json.loads(done.stdout) if done.stdout else None, err


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DemoServer]:
    running = DemoServer(tmp_path)
    running.start()
    yield running
    running.stop()


def _paste_the_readme(server: DemoServer) -> str:
    authorize, get, capture = readme_calls()
    code, answer, err = server.paste(authorize)
    assert code == 0, err
    assert answer["decision"] == "DECISION_PARTIALLY_APPROVED"
    assert answer["status"] == "AUTHORIZATION_STATUS_PENDING"
    assert answer["approved_amount_fen"] == 2500
    declined = [line for line in answer["line_results"] if not line["approved"]]
    assert [line["decline_reason"] for line in declined] == ["DECLINE_REASON_ITEM_NOT_ELIGIBLE"]
    assert "idempotency_key: call-" in err  # --fresh-key says which key it sent
    authorization_id: str = answer["authorization_id"]
    code, shown, err = server.paste(get, authorization_id)
    assert (code, shown["authorization"]["status"]) == (0, "AUTHORIZATION_STATUS_PENDING"), err
    code, captured, err = server.paste(capture, authorization_id)
    assert (code, captured["authorization"]["status"]) == (0, "AUTHORIZATION_STATUS_CAPTURED")
    code, _, err = server.paste(capture, authorization_id)
    assert (code, err["code"], err["reason"]) == (6, "FAILED_PRECONDITION", "ALREADY_CAPTURED")
    return authorization_id


def test_the_readme_calls_twice_in_a_row_and_after_a_restart(server: DemoServer) -> None:
    assert len(readme_calls()) == 3
    first = _paste_the_readme(server)
    second = _paste_the_readme(server)
    server.stop()
    server.start()
    third = _paste_the_readme(server)
    assert len({first, second, third}) == 3  # three payments, no replay


def test_the_printed_calls_work_as_pasted_and_every_token_is_listed(server: DemoServer) -> None:
    for token in demo.DEMO_TOKENS:
        assert re.search(rf"^  {token} +\S", server.printed, re.MULTILINE), token
    calls = server.printed[server.printed.index("In another terminal") :]
    joined = re.sub(r"\\\n\s*", "", calls)
    pasted = [line.strip() for line in joined.splitlines() if " call " in line]
    authorize = next(line for line in pasted if "Authorize" in line)
    ids = set()
    for _ in range(2):
        code, answer, err = server.paste(authorize)
        assert code == 0 and answer["decision"] == "DECISION_PARTIALLY_APPROVED", err
        ids.add(answer["authorization_id"])
    assert len(ids) == 2
    relationship = next(line for line in pasted if "GetRelationship" in line)
    code, answer, err = server.paste(relationship)
    assert code == 0 and answer["relationship"]["status"] == "RELATIONSHIP_STATUS_ACTIVE", err


@pytest.mark.parametrize("command", ["medwallet", "medwallet-authz"])
def test_the_clis_name_themselves(command: str) -> None:
    shown = subprocess.run(
        [str(BIN / command), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert shown.startswith(f"usage: {command} ")
    assert "python -m" not in shown
