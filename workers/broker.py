"""Broker housekeeping that Celery does not do for us."""

from __future__ import annotations

import redis


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
