"""`medwallet-authz tokens add|revoke|list`, `make-certs`, `audit` and `purge-audit`."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from authz_server.runtime.certificates import make_local_set
from authz_server.server import tokens
from authz_server.settings import Settings


def add_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser(
        "tokens", help="add, revoke or list bearer tokens (stored as SHA-256 digests)"
    )
    actions = token.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="make a token; it is printed once and never stored")
    add.add_argument("kind", choices=["admin", "channel", "merchant"])
    add.add_argument("--channel", choices=["APP", "PROVINCIAL_PLATFORM", "SERVICE_WINDOW"])
    add.add_argument("--merchant-id")
    revoke = actions.add_parser("revoke", help="remove a token by its id (servers: within 1 s)")
    revoke.add_argument("token_id")
    actions.add_parser("list", help="token ids and principals (never the tokens)")
    certs = commands.add_parser(
        "make-certs", help="a private CA and server/client certificates for trying mutual TLS"
    )
    certs.add_argument("directory", type=Path)
    certs.add_argument("--merchant", action="append", default=[], help="a merchant id (repeat)")


def run(arguments: argparse.Namespace, settings: Settings) -> int:
    if arguments.command == "make-certs":
        for path in make_local_set(arguments.directory, arguments.merchant):
            print(f"wrote {path}")
        return 0
    path = settings.effective_tokens_file
    if arguments.action == "add":
        if (arguments.kind == "channel") != (arguments.channel is not None):
            print("--channel is needed for (and only for) a channel token", file=sys.stderr)
            return 2
        if (arguments.kind == "merchant") != (arguments.merchant_id is not None):
            print("--merchant-id is needed for (and only for) a merchant token", file=sys.stderr)
            return 2
        path.parent.mkdir(parents=True, exist_ok=True)
        token_id, token = tokens.add(path, arguments.kind, arguments.channel, arguments.merchant_id)
        print(f"token id: {token_id}\ntoken (shown once, not stored): {token}")
        return 0
    if arguments.action == "revoke":
        if tokens.revoke(path, arguments.token_id):
            print(f"revoked {arguments.token_id}")
            return 0
        print(f"no token {arguments.token_id} in {path}", file=sys.stderr)
        return 1
    for entry in tokens.read(path).values():
        print(entry.token_id, entry.kind, entry.channel or entry.merchant_id or "")
    return 0


def add_audit_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser("audit", help="who accessed a person's data between two dates")
    audit.add_argument("person_id")
    audit.add_argument("--from", dest="start", required=True, help="ISO date or time, UTC")
    audit.add_argument("--to", dest="end", required=True, help="ISO date or time (excluded)")
    audit.add_argument("--page-size", type=int, default=100)
    commands.add_parser(
        "purge-audit", help="delete audit records older than MEDWALLET_AUDIT_RETENTION_DAYS"
    )


def _instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def run_audit(arguments: argparse.Namespace, settings: Settings) -> int:
    from authz_server.runtime.wiring import open_database
    from authz_server.service import audit_trail

    database = open_database(settings)
    try:
        if arguments.command == "purge-audit":
            days = settings.audit_retention_days
            purged = database.transaction(lambda s: audit_trail.purge(s, days))
            print(f"deleted {purged} audit records older than {days} days")
            return 0
        start, end = _instant(arguments.start), _instant(arguments.end)
        token, shown = "", 0
        print("occurred_at\tprincipal\tcredential\trpc\trelationship\tauthorization\toutcome")
        while True:
            page, token = database.transaction(
                partial(
                    audit_trail.person_access,
                    person_id=arguments.person_id,
                    start=start,
                    end=end,
                    page_size=arguments.page_size,
                    page_token=token,
                )
            )
            for stored in page:
                r = stored.record
                who = f"{r.principal_kind}:{r.principal_id}" if r.principal_id else r.principal_kind
                print(
                    f"{r.occurred_at.isoformat()}\t{who}\t{r.credential}\t{r.rpc}\t"
                    f"{r.relationship_id}\t{r.authorization_id}\t{r.outcome}"
                )
            shown += len(page)
            if not token:
                break
        print(f"{shown} records", file=sys.stderr)
        return 0
    finally:
        database.close()
