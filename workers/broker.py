"""Broker housekeeping that Celery does not do for us."""

from __future__ import annotations

import kombu.transport.redis
import redis
import redis.exceptions


def delete_prefixed_keys(broker_url: str, prefix: str) -> int:
    """Delete a key prefix's queues and bindings from a Redis broker (others: no-op).

    Test sessions and benchmarks each use a prefix of their own on a shared Redis;
    this leaves nothing behind when they end.
    """
    if not prefix or not broker_url.startswith(("redis://", "rediss://")):
        return 0
    client = redis.Redis.from_url(broker_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


class RedisTransport(kombu.transport.redis.Transport):
    """kombu's Redis transport, treating a full Redis as a broker that is unavailable.

    With `maxmemory` reached and the `noeviction` policy Redis refuses writes with an
    OOM error, a `ResponseError` that kombu counts as a channel error, and Celery's
    consumer stops for good on one ("Unrecoverable error"). As a connection error it
    reconnects with backoff instead, and carries on once Redis has room again. A
    message popped just before the refusal of its unacked copy is the one loss this
    cannot prevent: producers that must never lose an event use the outbox
    (RELIABILITY.md).
    """

    # kombu reads these from the class (Connection.connection_errors).
    connection_errors = (*kombu.transport.redis.Transport.connection_errors,
                         redis.exceptions.OutOfMemoryError)


def transport_for(broker_url: str) -> str | None:
    """The kombu transport class for `broker_url` when the fleet replaces kombu's own."""
    return "workers.broker:RedisTransport" if broker_url.startswith("redis://") else None
