"""`fleet bench events`: ingest throughput against raw Celery, measured in one run.

Everything runs against the same broker, the same PostgreSQL server (a scratch
database of its own) and one worker started with the same settings:

(a) raw Celery no-op tasks/s, (b) end-to-end events/s with one event per message,
(c) events/s with batches of 100 per message — each the drain rate of a queue
filled while the worker's consumer is paused, ending when the queue is empty (a)
or every audit row is committed (b, c). 10 enabled triggers watch the event types,
half of them with `in_segment`. Then (d) a paced stream at half of (b)'s rate
gives p50/p99 enqueue-to-commit latency of single events.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, text

from workers.queues import EVENTS, TaskNames
from workers.tools.bench.harness import BenchEnvironment

EVENT_TYPES = ("bench.page_viewed", "bench.signed_up", "bench.order_completed",
               "bench.feature_used", "bench.invited")


@dataclass
class EventsBenchResult:
    noop_tasks_per_s: float
    events_per_s_single: float
    events_per_s_batch100: float
    ratio_single_to_noop: float
    latency_p50_ms: float
    latency_p99_ms: float
    worker_concurrency: int
    noops: int
    single_events: int
    batch_events: int


def seed_definitions(engine: Engine, users: int) -> None:
    """Users, two segments, one active workflow and 10 triggers (5 with in_segment)."""
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage, attributes) "
            "SELECT 'bench' || i || '@example.com', 'Activation', "
            "jsonb_build_object('plan', CASE WHEN i % 3 = 0 THEN 'pro' ELSE 'free' END, 'score', i % 100) "
            "FROM generate_series(1, :n) AS i"
        ), {"n": users})
        workflow = conn.execute(text(
            "INSERT INTO workflows (name, bpmn_xml, status) VALUES "
            "('bench-workflow', '<definitions/>', 'active') RETURNING id"
        )).scalar_one()
        for name, segment in (
            ("bench-pro", {"field": "user.attributes.plan", "op": "eq", "value": "pro"}),
            ("bench-engaged", {"field": "user.attributes.score", "op": "gte", "value": 50}),
        ):
            conn.execute(text(
                "INSERT INTO user_segments (name, conditions) VALUES (:n, CAST(:c AS jsonb))"
            ), {"n": name, "c": json.dumps(segment)})
        for i in range(10):
            event_type = EVENT_TYPES[i % len(EVENT_TYPES)]
            if i % 2:
                condition: dict[str, Any] = {"all": [
                    {"in_segment": "bench-pro" if i % 4 == 1 else "bench-engaged"},
                    {"field": "event.data.value", "op": "gt", "value": 900},
                ]}
            else:
                condition = {"field": "event.data.value", "op": "gte", "value": 990}
            conn.execute(text(
                "INSERT INTO triggers (name, event_type, conditions, workflow_id, reentry) "
                "VALUES (:n, :t, CAST(:c AS jsonb), :w, 'allow')"
            ), {"n": f"bench-trigger-{i}", "t": event_type, "c": json.dumps(condition),
                "w": workflow})


def make_events(count: int, users: int, run: str,
                workspaces: Sequence[str | None] = ()) -> list[dict[str, Any]]:
    """`count` events over `users` users; with `workspaces`, round-robin over them (an
    envelope `workspace` field, None: none), each workspace getting the sequence a lone one
    would (its users, types and values in the same order)."""
    spread = max(1, len(workspaces))
    events: list[dict[str, Any]] = []
    for i in range(count):
        j = i // spread  # the event's place in its workspace's sequence
        event: dict[str, Any] = {
            "event_id": str(uuid.uuid4()), "event_type": EVENT_TYPES[j % len(EVENT_TYPES)],
            "user": f"bench{j % users + 1}@example.com",
            "data": {"value": j % 1000, "run": run, "sent_at": 0.0}}
        if workspaces and (name := workspaces[i % spread]) is not None:
            event["workspace"] = name
        events.append(event)
    return events


def drain_rate(env: BenchEnvironment, fill: Callable[[], int], done: Callable[[], bool],
               timeout: float = 3600) -> float:
    """Fill the queue with the consumer paused, resume it, return items/s until `done`
    (raises if the worker exits or `timeout` passes)."""
    env.pause_consumer(EVENTS)
    items = fill()
    if env.queue_empty(EVENTS):
        raise RuntimeError("the paused worker consumed the queue: the measurement would be void")
    started = time.perf_counter()
    env.resume_consumer(EVENTS)
    env.wait(lambda: env.queue_empty(EVENTS), timeout)  # a cheap LLEN while it drains
    env.wait(done, timeout)  # then the (costlier) check that every row is committed
    return items / (time.perf_counter() - started)


def run(users: int = 2000, noops: int = 5000, single: int = 5000, batched: int = 50_000,
        latency_samples: int = 1000, concurrency: int = 2) -> EventsBenchResult:
    with BenchEnvironment(queues=EVENTS, concurrency=concurrency) as env:
        seed_definitions(env.engine, users)
        env.start_worker()
        app = env.app

        def audit_count(run_id: str) -> Callable[[], bool]:
            target = {"single": single, "batch": batched, "latency": latency_samples}[run_id]
            sql = text("SELECT count(*) >= :n FROM lifecycle_events WHERE event_data->>'run' = :r")
            return lambda: bool(env.scalar(sql, {"n": target, "r": run_id}))

        # Warm up: trigger cache, memberships for every user, connection pools.
        warm = make_events(users, users, "warmup")
        for i in range(0, len(warm), 100):
            app.send_task(TaskNames.INGEST_BATCH, args=[warm[i:i + 100]], queue=EVENTS)
        env.wait(lambda: bool(env.scalar(text(
            "SELECT count(*) >= :n FROM lifecycle_events WHERE event_data->>'run' = 'warmup'"),
            {"n": users})), 300)

        def fill_noops() -> int:
            for _ in range(noops):
                app.send_task(TaskNames.BENCH_NOOP, queue=EVENTS)
            return noops

        noop_rate = drain_rate(env, fill_noops, lambda: env.queue_empty(EVENTS))

        def fill_single() -> int:
            for event in make_events(single, users, "single"):
                app.send_task(TaskNames.INGEST, args=[event], queue=EVENTS)
            return single

        single_rate = drain_rate(env, fill_single, audit_count("single"))

        def fill_batches() -> int:
            events = make_events(batched, users, "batch")
            for i in range(0, batched, 100):
                app.send_task(TaskNames.INGEST_BATCH, args=[events[i:i + 100]], queue=EVENTS)
            return batched

        batch_rate = drain_rate(env, fill_batches, audit_count("batch"))

        # Latency: a paced stream at half the single-event rate, no backlog.
        interval = 2.0 / single_rate
        for event in make_events(latency_samples, users, "latency"):
            event["data"]["sent_at"] = time.time()
            app.send_task(TaskNames.INGEST, args=[event], queue=EVENTS)
            time.sleep(interval)
        env.wait(audit_count("latency"), 120)
        latencies = [
            float(v) * 1000 for v in env.scalars(text(
                "SELECT extract(epoch FROM created_at) - (event_data->>'sent_at')::float8 "
                "FROM lifecycle_events WHERE event_data->>'run' = 'latency'"))
        ]
    quantiles = statistics.quantiles(latencies, n=100)
    return EventsBenchResult(
        noop_tasks_per_s=round(noop_rate, 1),
        events_per_s_single=round(single_rate, 1),
        events_per_s_batch100=round(batch_rate, 1),
        ratio_single_to_noop=round(single_rate / noop_rate, 3),
        latency_p50_ms=round(quantiles[49], 2),
        latency_p99_ms=round(quantiles[98], 2),
        worker_concurrency=concurrency,
        noops=noops,
        single_events=single,
        batch_events=batched,
    )


def as_dict(result: EventsBenchResult) -> dict[str, Any]:
    return asdict(result)
