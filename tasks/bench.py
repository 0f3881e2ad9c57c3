"""A no-op task: the raw Celery baseline that the benchmarks divide by."""

from __future__ import annotations

from celery import Task

from workers.celery_app import app
from workers.queues import TaskNames


@app.task(bind=True, name=TaskNames.BENCH_NOOP, ignore_result=True)
def noop(self: Task, marker: str = "") -> None:
    """Does nothing, on whichever queue it is sent to."""
