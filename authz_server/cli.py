"""`medwallet-authz`: serve, migrate, reconcile, and a generic `call` to try any RPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path

from authz_server.bulk import command as bulk_command
from authz_server.runtime import security_commands, serving
from authz_server.settings import SettingError, Settings
from authz_server.storage.sql.migrate import upgrade_to_head

log = logging.getLogger("authz_server")


def _prepare(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.effective_database_url)


def call_doc() -> str:
    from authz_server.runtime import call as caller

    return (
        "Calls any RPC of the contract (`--list` shows them all).\n"
        + (caller.__doc__ or "").split("\n", 1)[1]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medwallet-authz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--port", type=int, help="gRPC port (MEDWALLET_GRPC_PORT)")
    serve.add_argument("--demo", action="store_true", help="load demo data (MEDWALLET_DEMO_DATA)")
    serve.add_argument("--workers", type=int, help="server processes; 0: one per core")
    commands.add_parser("migrate", help="bring the database to the newest schema")
    commands.add_parser("reconcile", help="rebuild the Redis quotas from the SQL ledger")
    bulk_command.add_arguments(commands.add_parser("load-csv", help=bulk_command.HELP))
    close = commands.add_parser("close-month", help="close a month's settlement (YYYY-MM)")
    close.add_argument("month")
    close.add_argument("--export", type=Path, help="also write the tables to this folder")
    close.add_argument("--format", choices=["csv", "json"], default="csv")
    export = commands.add_parser("settlement-export", help="write a closed month's tables")
    export.add_argument("month")
    export.add_argument("--to", type=Path, default=Path("settlement"))
    export.add_argument("--format", choices=["csv", "json"], default="csv")
    commands.add_parser(
        "purge-idempotency",
        help="drop the engine's idempotency records of closed months (needs REDIS_URL)",
    )
    call = commands.add_parser(
        "call",
        help="call any RPC with a JSON request and print the answer",
        description=call_doc(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    call.add_argument("method", nargs="?", help="e.g. RelationshipService/GetRelationship")
    call.add_argument("request", nargs="?", default="{}", help="the request as JSON")
    call.add_argument("--token", help="bearer token (required for a call)")
    call.add_argument("--list", action="store_true", help="list every RPC and exit")
    call.add_argument(
        "--fresh-key",
        action="store_true",
        help="send a new idempotency_key (printed), so the same line can be pasted again",
    )
    call.add_argument("--host", default="localhost")
    call.add_argument("--port", type=int, default=50051)
    security_commands.add_arguments(commands)
    security_commands.add_audit_arguments(commands)
    arguments = parser.parse_args(argv)

    try:
        settings = Settings.from_environment()
    except SettingError as error:
        parser.exit(2, f"{parser.prog}: {error}\n")
    logging.basicConfig(level=settings.log_level, stream=sys.stderr)
    if arguments.command == "call":
        from authz_server.runtime import call as caller

        if arguments.list:
            return caller.list_methods()
        if arguments.method is None or arguments.token is None:
            call.error("give METHOD and --token (or --list)")
        return caller.call_json(
            arguments.host,
            arguments.port,
            arguments.method,
            arguments.request,
            arguments.token,
            fresh_key=arguments.fresh_key,
        )
    if arguments.command == "serve":
        if arguments.port is not None:
            settings = replace(settings, grpc_port=arguments.port)
        if arguments.demo:
            settings = replace(settings, demo_data=True)
        if arguments.workers is not None:
            settings = replace(settings, workers=arguments.workers)
        return serving.serve(settings)
    if arguments.command == "migrate":
        _prepare(settings)
        return 0
    if arguments.command == "reconcile":
        _prepare(settings)
        return asyncio.run(_reconcile(settings))
    if arguments.command in ("close-month", "settlement-export"):
        _prepare(settings)
        return _settle(settings, arguments)
    if arguments.command == "purge-idempotency":
        _prepare(settings)
        return asyncio.run(_purge(settings))
    if arguments.command in ("tokens", "make-certs"):
        return security_commands.run(arguments, settings)
    if arguments.command in ("audit", "purge-audit"):
        _prepare(settings)
        return security_commands.run_audit(arguments, settings)
    if arguments.command == "load-csv":
        _prepare(settings)
        return bulk_command.run(arguments, settings)
    return 2


def _settle(settings: Settings, arguments: argparse.Namespace) -> int:
    """Closes (or exports) a month through the same service the gRPC call uses."""
    from authz_server.domain.errors import DomainError
    from authz_server.domain.settlement import Month
    from authz_server.runtime import settlement_export
    from authz_server.runtime.progress import Progress
    from authz_server.runtime.wiring import open_database
    from authz_server.service.settlement import SettlementService

    folder = arguments.export if arguments.command == "close-month" else arguments.to
    if folder is not None and folder.exists() and not folder.is_dir():
        # Refused before the close: after it, the month would be closed without its files.
        print(f"refused: {folder} is not a folder", file=sys.stderr)
        return 2
    database = open_database(settings)
    service = SettlementService(database, settings.prepaid_safety_percent)
    try:
        month = Month.parse("month", arguments.month)
        started = settlement_export.timed()
        with Progress(1, f"closing {month}") as progress:
            if arguments.command == "close-month":
                writers_done_at = database.transaction(service.wait_for_writers)
                report, already = database.transaction(
                    lambda s: service.close_in(s, month, writers_done_at)
                )
            else:
                report, already = asyncio.run(service.report(month)), True
            progress.advance(1)
        print(settlement_export.summary(report, already, settlement_export.timed() - started))
        if folder is not None:
            try:
                written = settlement_export.export(report, folder, arguments.format)
            except OSError as error:
                print(
                    f"{month} is closed, but its files were not written ({error}): run "
                    f"`medwallet-authz settlement-export {month} --to <folder>`",
                    file=sys.stderr,
                )
                return 1
            for path in written:
                print(f"wrote {path}")
        return 0
    except DomainError as error:
        print(f"refused: {error.reason}: {error}", file=sys.stderr)
        return 1
    finally:
        database.close()


async def _purge(settings: Settings) -> int:
    from authz_server.runtime.progress import Progress
    from authz_server.runtime.wiring import close_storage, open_storage
    from authz_server.service.retention import purge_closed_months

    if not settings.redis_url:
        print("purge-idempotency needs REDIS_URL")
        return 2
    storage = open_storage(settings, settings.redis_url)  # one node or a cluster, by the URL
    try:
        # Three scans of the keyspace (records, claims, authorizations): the count is of the
        # keys they looked at, with no total known beforehand.
        with Progress(None, "purge-idempotency: Redis keys", unit="keys") as progress:
            purged = await purge_closed_months(storage.database, storage.redis, progress.advance)
    finally:
        await close_storage(storage)
    print(
        f"through {purged.through_month or 'no closed month'}: dropped "
        f"{purged.sql_records} SQL and {purged.redis_records} Redis idempotency records, "
        f"{purged.redis_authorizations} settled authorizations from Redis"
    )
    return 0


async def _reconcile(settings: Settings) -> int:
    from authz_server.runtime.hot_state import trusted_and_reconciled

    if not settings.redis_url:
        print("reconcile needs REDIS_URL (the private Redis is rebuilt at every start)")
        return 2
    report, _ = await trusted_and_reconciled(settings, settings.redis_url)
    print(
        f"reconciled {report.quotas} quotas; {report.drifted} drifted by {report.drift_fen} fen"
        f" ({report.overstated} overstated by Redis); {report.busy} left as they were (a capture"
        " between its phases, or money moving as they were set; run it again); holds Redis had"
        f" wrong: {report.holds_put_back} put back, {report.holds_voided} voided"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
