"""TLS asked for by half (a helper's security audit, the test failing before): the server's key
set without its certificate (a misspelt MEDWALLET_TLS_CERT_FILE) served plaintext, every token
crossing the network in clear, with at most a warning; now `serve` exits, saying what is
missing, as it does for a client CA without the server's certificate."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz_server.runtime.certificates import issue, make_ca
from tests.operations.server_process import ServerProcess
from tests.operations.test_one_server import ON_SQLITE_ANYWAY, _refused


@ON_SQLITE_ANYWAY
@pytest.mark.parametrize("given", ["key", "certificate"])
def test_a_servers_key_or_certificate_alone_refuses_to_start(tmp_path: Path, given: str) -> None:
    server_pair = issue(make_ca(), "localhost", server_names=("localhost", "127.0.0.1"))
    certificate, key = server_pair.write(tmp_path, "server")
    variables = (
        {"MEDWALLET_TLS_KEY_FILE": str(key)}
        if given == "key"
        else {"MEDWALLET_TLS_CERT_FILE": str(certificate)}
    )
    server = ServerProcess(tmp_path, **variables)
    try:
        code, output = _refused(server)
        assert code != 0, output
        missing = "MEDWALLET_TLS_CERT_FILE" if given == "key" else "MEDWALLET_TLS_KEY_FILE"
        assert f"{missing} is not" in output, output
    finally:
        server.stop()
