"""The service's PostgreSQL advisory locks (the journal's fence, settlement's writers and
closes): the statements that take them, in one place.

Each lock is keyed by the schema the service runs in as well as by its own number
(`pg_advisory_xact_lock(int4, int4)`), so two deployments sharing one database in schemas of
their own (a staging copy beside production, or the test sessions of one CI run) never wait on
each other's locks: advisory locks belong to the database, not to a schema. Every process of
one deployment uses the same schema, so they share each lock as before. The statements are
constant texts (the numbers are written into them), so the driver prepares each once.
"""

from __future__ import annotations

# Fixed 32-bit numbers, the same in every process of the service.
JOURNAL_LOCK = 0x6D77_6A6F  # "mwjo": journal writes against a rebuild (journal_fence.py)
WRITERS_LOCK = 0x6D77_7772  # "mwwr": settled money's writes against a close (settlement_lock.py)
CLOSE_LOCK = 0x6D77_636C  # "mwcl": one month's close at a time (settlement_lock.py)

_SCHEMA = "hashtext(current_schema())"


def shared(lock: int) -> str:
    """The statement that takes `lock` shared until the transaction ends."""
    return f"SELECT pg_advisory_xact_lock_shared({_SCHEMA}, {lock:d})"


def exclusive(lock: int) -> str:
    """The statement that takes `lock` exclusively until the transaction ends."""
    return f"SELECT pg_advisory_xact_lock({_SCHEMA}, {lock:d})"
