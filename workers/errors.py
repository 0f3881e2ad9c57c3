"""Error classes and the one rule that says which failures are worth retrying."""

from __future__ import annotations

import httpx
import kombu.exceptions
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
    httpx.TransportError,  # webhook endpoint unreachable or slow
)


# A dependency is unreachable (not this message's fault): PostgreSQL or the broker down,
# restarting or dropping connections. SQLSTATE class 08 is "connection exception";
# 57P01-57P03 are an administrator's or a crash's shutdown and "cannot connect now".
_OUTAGE_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
_OUTAGE_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def is_outage(exc: BaseException) -> bool:
    """True when the database or the broker is unreachable: retried past the usual bound.

    Dead-lettering work because PostgreSQL restarted would turn an outage into
    manual replays, so these retries are bounded by FLEET_OUTAGE_MAX_RETRIES instead.
    """
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        if sqlstate.startswith(_OUTAGE_SQLSTATES):
            return True
    return isinstance(exc, _OUTAGE_TYPES)


def is_transient(exc: BaseException) -> bool:
    """True for errors that a later attempt may not meet."""
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, _TRANSIENT_TYPES)
