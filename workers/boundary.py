"""The boundary between producers and the fleet's internal tasks.

Producers may publish ingest tasks to the `events` queue and nothing else. Three
walls hold that, each where it can be enforced:

- the broker: a producer credential may write only to the `events` queue
  (deploy/broker/: a Redis ACL, RabbitMQ permissions); `Router` makes sure
  publishing an event needs no more than that;
- every worker: a task runs only if its message came from the task's own queue
  (`misrouted`; `workers.rejected` dead-letters the others with the reason);
- the task registry: `bench.*` tasks are loaded only by bench workers
  (`--include tasks.bench`), so a normal worker refuses them as unknown.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from workers.queues import EVENTS, route_for_task

AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})


def misrouted(task_name: str, delivery_info: Mapping[str, Any] | None,
              consuming: Collection[str] | None = None) -> str | None:
    """Why a message for `task_name` must not run here, or None if it came from the task's queue.

    Every queue is bound to an exchange of its own name with its name as the routing
    key, and the default exchange routes by queue name, so the routing key names the
    queue a message was delivered to. RabbitMQ sets it; on Redis the publisher writes
    it, so `consuming` (the queues this worker consumes: `consumed_queues`) is
    checked too: a worker of the `events` queue runs no maintenance task, whatever
    its message claims. Tasks without a queue of their own (none in production) are
    not judged.
    """
    route = route_for_task(task_name)
    if route is None:
        return None
    queue = route["queue"]
    info = delivery_info or {}
    arrived = info.get("routing_key")
    if arrived != queue:
        return (f"{task_name} runs on the {queue!r} queue, but this message came with routing "
                f"key {arrived!r} (exchange {info.get('exchange')!r}): internal tasks are not "
                f"accepted from other queues")
    if consuming is not None and queue not in consuming:
        return (f"{task_name} runs on the {queue!r} queue, but this worker consumes only "
                f"{', '.join(sorted(consuming)) or 'nothing'}: internal tasks are not "
                f"accepted from other queues")
    return None


def consumed_queues(consumer: Any) -> frozenset[str] | None:
    """The queues a worker's consumer takes messages from now; None before it has started.

    Read from kombu's task consumer, not `app.amqp.queues.consume_from`: Celery
    removes a queue from that on `cancel_consumer` but does not put it back on
    `add_consumer`.
    """
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is None:
        return None
    return frozenset(queue.name for queue in task_consumer.queues)


def is_amqp(broker_url: str | None) -> bool:
    return urlsplit(broker_url or "").scheme in AMQP_SCHEMES


class Router:
    """Celery router: the queue by task-name prefix, and how the `events` queue is published to.

    Messages to `events` declare nothing: the workers declare their queues, and
    declaring needs RabbitMQ's configure permission, which would also let a producer
    delete the queue (or, on Redis, write `_kombu.binding.*`). On RabbitMQ they go
    through the queue's own exchange, because write permission on the default
    exchange reaches every queue; a producer then needs write on `events` (and on
    `celeryev` for task-sent events) alone. On Redis the default exchange is an
    LPUSH onto the queue's list, which the ACL limits by key, and needs no binding
    to exist yet.
    """

    def __init__(self, broker_url: str | None) -> None:
        self.named_exchange = is_amqp(broker_url)

    def __call__(self, name: str, args: Any = None, kwargs: Any = None, options: Any = None,
                 task: Any = None, **kw: Any) -> dict[str, Any] | None:
        route: dict[str, Any] | None = route_for_task(name)
        if route is not None and route["queue"] == EVENTS:
            route["declare"] = []
            if self.named_exchange:
                route["exchange"] = EVENTS
        return route
