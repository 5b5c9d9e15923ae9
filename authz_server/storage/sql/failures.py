"""A database error a caller answers UNAVAILABLE (retryable: the till tries again with its key,
or the work is run again), counted by its kind (`medwallet_sql_unavailable_total`), so an SRE
can tell a lock-order regression (deadlocks: README "One lock order for quotas") from a database
that is down or overloaded."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from authz_server.domain.errors import Unavailable
from authz_server.observability import metrics

# PostgreSQL's SQLSTATE codes (Appendix A of its manual) by kind; a code of class 08 (connection
# exception) counts as a connection failure too.
_KINDS_BY_SQLSTATE = {
    "40P01": "deadlock",  # deadlock_detected
    "55P03": "lock_timeout",  # lock_not_available (lock_timeout, NOWAIT)
    "57014": "statement_timeout",  # query_canceled
    "57P01": "connection",  # admin_shutdown
    "57P02": "connection",  # crash_shutdown
    "57P03": "connection",  # cannot_connect_now
}


def failure_kind(error: OperationalError) -> str:
    """One of metrics.SQL_FAILURE_KINDS."""
    sqlstate = getattr(error.orig, "sqlstate", None)  # psycopg's errors carry it
    if isinstance(sqlstate, str):
        if sqlstate.startswith("08"):
            return "connection"
        return _KINDS_BY_SQLSTATE.get(sqlstate, "other")
    text = str(error.orig).lower()
    if "database is locked" in text or "database is busy" in text:  # SQLite's busy timeout
        return "busy"
    if "connection" in text or "server closed" in text:  # psycopg, no SQLSTATE: the socket
        return "connection"
    return "other"


def unavailable(error: OperationalError) -> Unavailable:
    """The caller's Unavailable for `error`, counted by kind."""
    metrics.sql_unavailable.labels(failure_kind(error)).inc()
    return Unavailable(f"the database did not answer: {error.orig}")
