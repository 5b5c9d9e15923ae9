"""Alembic environment: the URL is the configured one unless the caller set sqlalchemy.url."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from authz_server.settings import Settings
from authz_server.storage.sql import audit_table  # noqa: F401  (its table on Base.metadata)
from authz_server.storage.sql.tables import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or Settings.from_environment().effective_database_url


def run() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        context.configure(connection=connectable, target_metadata=Base.metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run()
