"""Broker housekeeping that Celery does not do for us: probes, queue depths, key cleanup."""

from __future__ import annotations

from collections.abc import Sequence

import kombu.transport.redis
import redis
import redis.exceptions
from kombu import Connection as BrokerConnection
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel

from workers.queues import QUEUE_NAMES

TIMEOUT = 3.0  # seconds for one connection attempt: a probe answers even when the broker is down
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _is_redis(broker_url: str) -> bool:
    return broker_url.startswith(REDIS_SCHEMES)


def _redis(broker_url: str) -> redis.Redis:
    return redis.Redis.from_url(broker_url, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT)


def ping_broker(broker_url: str) -> str:
    """Connect to the broker once (raises when it cannot); returns what answered."""
    if _is_redis(broker_url):
        client = _redis(broker_url)
        try:
            client.ping()
            version = client.info("server").get("redis_version", "?")
        finally:
            client.close()
        return f"redis {version}"
    with BrokerConnection(broker_url, connect_timeout=TIMEOUT) as conn:
        conn.ensure_connection(max_retries=1, timeout=TIMEOUT)
        return str(conn.transport.driver_name)


def redis_queue_keys(queue: str, prefix: str = "") -> list[str]:
    """The Redis lists holding a queue's messages: one per priority step, as kombu names them."""
    return [prefix + (f"{queue}{RedisChannel.sep}{step}" if step else queue)
            for step in PRIORITY_STEPS]


def queue_depths(broker_url: str, prefix: str = "",
                 queues: Sequence[str] = QUEUE_NAMES) -> dict[str, int]:
    """Messages waiting in each queue (not counting the ones workers hold unacked).

    Redis: LLEN of the prefixed queue lists. Other brokers (RabbitMQ): a passive
    queue_declare, which reports the count without creating anything.
    """
    if _is_redis(broker_url):
        keys = [redis_queue_keys(queue, prefix) for queue in queues]
        client = _redis(broker_url)
        try:
            with client.pipeline(transaction=False) as pipe:
                for key in (k for group in keys for k in group):
                    pipe.llen(key)
                sizes = iter(pipe.execute())
        finally:
            client.close()
        return {queue: sum(next(sizes) for _ in group) for queue, group in zip(queues, keys,
                                                                               strict=True)}
    depths: dict[str, int] = {}
    with BrokerConnection(broker_url, connect_timeout=TIMEOUT) as conn:
        conn.ensure_connection(max_retries=1, timeout=TIMEOUT)
        for queue in queues:
            channel = conn.channel()
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except conn.channel_errors:
                depths[queue] = 0  # not declared yet: no worker ever consumed it, nothing sent
            finally:
                try:
                    channel.close()
                except Exception:  # closed by the broker after the error
                    pass
    return depths


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
