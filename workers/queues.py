"""Queues and task names, declared in code: the one place that says what runs where.

Task names are stable strings (in-flight messages name them); a route is decided
by the name's prefix, so `events.*` tasks always land on the `events` queue.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

EVENTS = "events"
WORKFLOWS = "workflows"
ACTIONS = "actions"
SEGMENTS = "segments"
MAINTENANCE = "maintenance"

QUEUE_NAMES: tuple[str, ...] = (EVENTS, WORKFLOWS, ACTIONS, SEGMENTS, MAINTENANCE)

# One direct exchange per queue name keeps routing explicit on Redis and RabbitMQ alike.
TASK_QUEUES: tuple[Queue, ...] = tuple(
    Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUE_NAMES
)


class TaskNames:
    """Explicit task names; never rename one that may be in flight."""

    INGEST = "events.ingest"
    INGEST_BATCH = "events.ingest_batch"
    STEP = "workflows.step"
    WAKE_DUE_TIMERS = "workflows.wake_due_timers"
    REAP_STUCK = "workflows.reap_stuck"
    RUN_ACTION = "actions.run"
    REFRESH_SEGMENT = "segments.refresh"
    REFRESH_EXPIRED_SEGMENTS = "segments.refresh_expired"
    START_DUE_SCHEDULES = "segments.start_due_schedules"
    RUN_SCHEDULE = "segments.run_schedule"
    RELAY_OUTBOX = "maintenance.relay_outbox"
    ENSURE_PARTITIONS = "maintenance.ensure_partitions"
    METRICS_DAILY = "maintenance.metrics_daily"
    RETENTION = "maintenance.retention"
    BENCH_NOOP = "bench.noop"
    BENCH_HOP = "bench.hop"


# Beat-driven sweeps of the workflows tables that run on the maintenance queue.
SWEEPS = frozenset({TaskNames.WAKE_DUE_TIMERS, TaskNames.REAP_STUCK})

# Messages a worker of the queue may hold unacknowledged, per pool process. The
# events worker buffers single-event messages into micro-batches of up to 100
# (workers/events/micro_batch.py), the workflows worker step messages into batches
# of up to FLEET_STEP_BATCH_SIZE (workers/engine/batch.py): each must be allowed to
# hold that many.
PREFETCH_MULTIPLIER: dict[str, int] = {EVENTS: 100, WORKFLOWS: 50}


def worker_options(queues: str) -> list[str]:
    """Extra `celery worker` options for a worker consuming `queues` (comma-separated).

    The workflows worker's prefetch follows FLEET_STEP_BATCH_SIZE when it is set larger.
    """
    from workers.settings import get_settings  # lazy: a producer imports queues, not settings

    wanted = dict(PREFETCH_MULTIPLIER)
    wanted[WORKFLOWS] = max(wanted[WORKFLOWS], get_settings().step_batch_size)
    multiplier = max((wanted.get(q, 1) for q in queues.split(",")), default=1)
    return ["--prefetch-multiplier", str(multiplier)] if multiplier > 1 else []


def route_for_task(name: str, args: Any = None, kwargs: Any = None, options: Any = None,
                   task: Any = None, **kw: Any) -> dict[str, str] | None:
    """Celery router: the queue is the task name's prefix, when it is a known queue.

    The workflow sweeps are the exception: they run on `maintenance`, so that a
    backlog of steps cannot delay the timers and re-sends that drain it.
    """
    if name in SWEEPS:
        return {"queue": MAINTENANCE, "routing_key": MAINTENANCE}
    prefix = name.split(".", 1)[0]
    if prefix in QUEUE_NAMES:
        return {"queue": prefix, "routing_key": prefix}
    return None
