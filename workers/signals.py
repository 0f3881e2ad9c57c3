"""Celery signal handlers: logging setup, the database's configuration and fork safety of its
pool, metrics, and task events for micro-batched tasks (so Flower sees them too).

Loaded by the worker, beat and Flower at start (`imports` in workers/celery_app.py), not
by a process that only publishes."""

from __future__ import annotations

import time
from typing import Any

from celery import states
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    task_received,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)
from celery.utils.saferepr import saferepr
from celery_batches import Batches

from db.config import configure
from db.session import dispose_engine, reset_engine
from workers import metrics
from workers.log import configure_logging, get_logger
from workers.settings import get_settings

log = get_logger(__name__)


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    """Connected, so Celery leaves logging to us: JSON lines with bound context."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


@worker_init.connect
def _database_from_settings(**_: Any) -> None:
    """db/ reads DATABASE_URL on its own; a worker takes the fleet's settings instead, so one
    started beside `fleet services start` without DATABASE_URL finds the embedded server."""
    configure(lambda: get_settings().database)


@worker_init.connect
def _enable_metrics(**_: Any) -> None:
    """Worker processes (not beat, Flower or the CLI) count into the metrics folder."""
    metrics.enable_worker_metrics(get_settings())


@worker_process_init.connect
def _fresh_pool_after_fork(**_: Any) -> None:
    """A pool must not cross fork: each pool child builds its own engine."""
    dispose_engine()


@worker_process_shutdown.connect
def _close_pool(**kwargs: Any) -> None:
    reset_engine()
    metrics.on_process_exit(**kwargs)


task_prerun.connect(metrics.on_task_prerun, weak=False)
task_postrun.connect(metrics.on_task_postrun, weak=False)


# celery-batches buffers a message and later runs the buffer as one call, without the
# task-received / task-succeeded events Celery sends for every other task. These two
# handlers send them for each buffered message, so Flower shows its state and args.
_batch_started: dict[str, float] = {}


@task_received.connect
def _batched_task_received(request: Any = None, **_: Any) -> None:
    """Consumer side: the event Celery's own strategy would have sent."""
    if request is None or not isinstance(request.task, Batches):
        return
    request.send_event(
        "task-received", name=request.name, args=request.argsrepr, kwargs=request.kwargsrepr,
        root_id=request.root_id, parent_id=request.parent_id,
        retries=request.request_dict.get("retries", 0),
        eta=request.eta and request.eta.isoformat(),
        expires=request.expires and request.expires.isoformat())


@task_prerun.connect
def _batch_started_at(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id and isinstance(task, Batches):
        _batch_started[task_id] = time.monotonic()


@task_postrun.connect
def _batched_tasks_done(task_id: str | None = None, task: Any = None, args: Any = None,
                        retval: Any = None, state: str | None = None, **_: Any) -> None:
    """Pool side: one task-succeeded (or task-failed) event per message of the buffer."""
    if not isinstance(task, Batches):
        return
    started = _batch_started.pop(task_id or "", None)
    requests = [r for r in (args[0] if args else []) if getattr(r, "id", None)]
    if not requests or not task.send_events:
        return
    runtime = time.monotonic() - started if started is not None else 0.0
    try:
        with task.app.events.default_dispatcher(hostname=requests[0].hostname) as dispatcher:
            for request in requests:
                if state == states.SUCCESS:
                    dispatcher.send("task-succeeded", uuid=request.id, runtime=runtime,
                                    result=saferepr(retval, 256))
                else:
                    dispatcher.send("task-failed", uuid=request.id, exception="batch failed",
                                    traceback="")
    except Exception as exc:  # events are for watching; never fail the batch over them
        log.warning("task_events.batch_send_failed", error=repr(exc), messages=len(requests))
