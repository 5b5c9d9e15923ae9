"""`medwallet-authz`: serve, migrate, reconcile, and a generic `call` to try any RPC."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from dataclasses import replace

from authz_server.bulk import command as bulk_command
from authz_server.runtime import demo
from authz_server.runtime.embedded_redis import EmbeddedRedis
from authz_server.server.app import Application
from authz_server.settings import Settings
from authz_server.storage.sql.migrate import upgrade_to_head

log = logging.getLogger("authz_server")


def _prepare(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.effective_database_url)


async def _serve(settings: Settings) -> int:
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(settings.data_dir / "redis")
        redis_url = embedded.start()
    if settings.demo_data:
        demo.write_tokens(settings.effective_tokens_file)
    app = Application(settings, redis_url)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        port = await app.start()
        if settings.demo_data:
            relationship_id = await demo.load(app.registry, app.relationships)
            _print_demo(port, relationship_id)
        log.info("serving on port %d", port)
        await stopping.wait()
        await app.stop(settings.shutdown_grace_seconds)
    finally:
        if embedded:
            embedded.stop()
    return 0


def _print_demo(port: int, relationship_id: str) -> None:
    basket = json.dumps(
        {
            "idempotency_key": "till-0001",
            "beneficiary_id": demo.RELATIVE,
            "purpose": "PURPOSE_PHARMACY",
            "amount_fen": 3500,
            "allow_partial": True,
            "lines": [
                {"item_code": "drug-amoxicillin", "quantity": 1, "amount_fen": 2500},
                {"item_code": "cosmetic-face-cream", "quantity": 1, "amount_fen": 1000},
            ],
        },
        ensure_ascii=False,
    )
    print(
        f"""
MedWallet AuthZ is serving on localhost:{port} with demo data: holder {demo.HOLDER} (Beijing)
shares 2,000.00 yuan of quota with {demo.RELATIVE} (Shenzhen), relationship {relationship_id}.
Tokens: demo-admin, demo-app, demo-hospital, demo-pharmacy, demo-collector. In another terminal:

  # a pharmacy basket with an ineligible item: the drug is approved, the face cream is not
  medwallet-authz call AuthorizationService/Authorize '{basket}' \
      --token demo-pharmacy --port {port}
  # then capture it with the authorization_id it answered:
  medwallet-authz call AuthorizationService/Capture \
      '{{"authorization_id": "<id>", "idempotency_key": "till-0001-capture"}}' \
      --token demo-pharmacy --port {port}
  medwallet-authz call RelationshipService/GetRelationship \
      '{{"relationship_id": "{relationship_id}"}}' --token demo-app --port {port}
""",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medwallet-authz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--port", type=int, help="gRPC port (MEDWALLET_GRPC_PORT)")
    serve.add_argument("--demo", action="store_true", help="load demo data (MEDWALLET_DEMO_DATA)")
    commands.add_parser("migrate", help="bring the database to the newest schema")
    commands.add_parser("reconcile", help="rebuild the Redis quotas from the SQL ledger")
    bulk_command.add_arguments(commands.add_parser("load-csv", help=bulk_command.HELP))
    call = commands.add_parser("call", help="call an RPC with a JSON request and print the answer")
    call.add_argument("method", help="e.g. RelationshipService/GetRelationship")
    call.add_argument("request", nargs="?", default="{}", help="the request as JSON")
    call.add_argument("--token", required=True, help="bearer token")
    call.add_argument("--host", default="localhost")
    call.add_argument("--port", type=int, default=50051)
    arguments = parser.parse_args(argv)

    settings = Settings.from_environment()
    logging.basicConfig(level=settings.log_level, stream=sys.stderr)
    if arguments.command == "call":
        from authz_server.runtime.call import call_json

        return call_json(
            arguments.host, arguments.port, arguments.method, arguments.request, arguments.token
        )
    if arguments.command == "serve":
        if arguments.port is not None:
            settings = replace(settings, grpc_port=arguments.port)
        if arguments.demo:
            settings = replace(settings, demo_data=True)
        _prepare(settings)
        return asyncio.run(_serve(settings))
    if arguments.command == "migrate":
        _prepare(settings)
        return 0
    if arguments.command == "reconcile":
        _prepare(settings)
        return asyncio.run(_reconcile(settings))
    if arguments.command == "load-csv":
        _prepare(settings)
        return bulk_command.run(arguments, settings)
    return 2


async def _reconcile(settings: Settings) -> int:
    from redis.asyncio import Redis

    from authz_server.runtime.reconcile import reconcile
    from authz_server.storage.redis.hold_store import HoldStore
    from authz_server.storage.redis.quota_cache import RedisQuotaCache
    from authz_server.storage.sql.database import Database

    if not settings.redis_url:
        print("reconcile needs REDIS_URL (the private Redis is rebuilt at every start)")
        return 2
    database = Database(settings.effective_database_url)
    client = Redis.from_url(settings.redis_url)
    report = await reconcile(database, RedisQuotaCache(client), HoldStore(client))
    print(f"reconciled {report.quotas} quotas; {report.drifted} drifted by {report.drift_fen} fen")
    await client.aclose()
    database.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
