"""Error classes and the one rule that says which failures are worth retrying."""

from __future__ import annotations

import httpx
import kombu.exceptions
import psycopg
import redis.exceptions
import sqlalchemy.exc


class TransientError(Exception):
    """A failure that may pass on its own (a dependency down, a lock conflict): retry."""


class PermanentError(Exception):
    """A failure that retrying cannot fix (bad input, broken definition): dead-letter."""


class PoisonMessage(PermanentError):
    """A message whose worker dies every time it runs; dead-lettered instead of run again."""


_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TransientError,
    ConnectionError,
    TimeoutError,
    sqlalchemy.exc.OperationalError,  # lost connection, serialization failure, deadlock
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # pool exhausted
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    psycopg.OperationalError,
    httpx.TransportError,  # webhook endpoint unreachable or slow
)


# A dependency is unreachable (not this message's fault): PostgreSQL or the broker down,
# restarting, refusing or dropping connections. SQLSTATE class 08 is "connection
# exception"; 57P01-57P03 an administrator's or a crash's shutdown and "cannot connect
# now" (starting up, in recovery); 53300 "too many connections"; 25006 a read-only
# transaction (a failover left us on a standby).
_OUTAGE_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # pool exhausted: every connection busy or failing
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,  # a full broker refuses writes until it drains
)
_OUTAGE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300", "25006")


def is_outage(exc: BaseException) -> bool:
    """True when the database or the broker is unreachable: retried while it lasts.

    Dead-lettering work because PostgreSQL restarted would turn an outage into
    manual replays. An error the driver raises without a SQLSTATE never came from
    the server (connection refused, reset, DNS, a socket timeout), so it is an
    outage too: psycopg's "connection failed: ... Connection refused" is one.
    """
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        sqlstate = getattr(orig, "sqlstate", None) or ""
        if sqlstate.startswith(_OUTAGE_SQLSTATES):
            return True
        if isinstance(orig, psycopg.OperationalError) and not sqlstate:
            return True
    if isinstance(exc, psycopg.OperationalError) and not getattr(exc, "sqlstate", None):
        return True
    return isinstance(exc, _OUTAGE_TYPES)


def is_transient(exc: BaseException) -> bool:
    """True for errors that a later attempt may not meet; every outage is one."""
    if isinstance(exc, PermanentError):
        return False
    return is_outage(exc) or isinstance(exc, _TRANSIENT_TYPES)
