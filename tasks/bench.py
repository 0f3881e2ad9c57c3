"""Benchmark tasks: the raw Celery baselines that the benchmarks divide by.

Only bench workers load them (`--include tasks.bench`, workers/tools/bench/harness.py):
a fleet worker refuses a `bench.*` message as an unknown task, so nobody can make
the fleet run chains of no-ops.
"""

from __future__ import annotations

from celery import Task

from workers.celery_app import app
from workers.queues import TaskNames


@app.task(bind=True, name=TaskNames.BENCH_NOOP, ignore_result=True)
def noop(self: Task, marker: str = "") -> None:
    """Does nothing, on whichever queue it is sent to."""


@app.task(bind=True, name=TaskNames.BENCH_HOP, ignore_result=True)
def hop(self: Task, remaining: int, queue: str, done_queue: str) -> None:
    """One link of a chain of no-op tasks, each sending the next (as workflow steps do).

    `bench.*` has no queue of its own, so the queue is an argument; the last link
    leaves one `bench.noop` on `done_queue` (which nothing consumes) for the
    benchmark to count finished chains.
    """
    if remaining > 0:
        self.app.send_task(TaskNames.BENCH_HOP, args=[remaining - 1, queue, done_queue],
                           queue=queue)
    else:
        self.app.send_task(TaskNames.BENCH_NOOP, args=["done"], queue=done_queue)
