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


def is_transient(exc: BaseException) -> bool:
    """True for errors that a later attempt may not meet."""
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, _TRANSIENT_TYPES)
