"""The fleet's one Celery app, configured from the settings object.

Delivery is at-least-once (acks_late, reject on worker loss, prefetch 1): every
task must be safe to run twice, and PostgreSQL, not the broker, is the record of
what is due (docs/architecture.md, decisions 1-3).

Importing the app is all a producer needs to publish. The worker, beat and Flower
load the rest when they start, through Celery's loader: the signal handlers
(WORKER_MODULES, `imports`) and the tasks (TASK_MODULES, `include`). So publishing
loads neither the database layer nor the metrics.
"""

from __future__ import annotations

import os
import sys

from celery import Celery
from celery.signals import before_task_publish

import beat_schedule
from workers.boundary import Router, is_amqp
from workers.broker import transport_for
from workers.heartbeat import HeartbeatStep
from workers.queues import EVENTS, TASK_QUEUES
from workers.settings import Settings, get_settings

# Signal handlers (logging, fork safety of the pool, metrics): before any task module.
WORKER_MODULES: tuple[str, ...] = ("workers.signals",)
# `tasks.bench` is not here: bench workers load it with `--include tasks.bench`, so a
# normal worker refuses (dead-letters) a `bench.*` message as an unknown task.
TASK_MODULES: tuple[str, ...] = ("tasks.events", "tasks.workflows", "tasks.actions",
                                 "tasks.segments", "tasks.maintenance", "tasks.schedules")


def celery_config(settings: Settings) -> dict[str, object]:
    """Celery settings derived from the fleet's settings (kept apart so tests can read them)."""
    transport_options: dict[str, object] = {
        # Must exceed the longest task and the longest retry countdown, or Redis
        # redelivers a message that is still being worked on.
        "visibility_timeout": settings.visibility_timeout,
        # Scan for messages of dead workers past their visibility timeout every 10 s,
        # not every ~100 s (kombu's default: a 10 s timer that scans on every 10th tick).
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    }
    if settings.broker_key_prefix:
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    if is_amqp(settings.broker_url):
        # Wait for RabbitMQ's confirm: a publish it refuses (no permission, no such
        # exchange) raises instead of vanishing after the call returned.
        transport_options["confirm_publish"] = True
    return {
        "broker_url": settings.broker_url,
        **_pinned_broker(settings.broker_url),
        "broker_transport": transport_for(settings.broker_url or ""),  # a full Redis: back off
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_heartbeat": 30,  # RabbitMQ: notice a dead connection
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_acks_on_failure_or_timeout": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_queues": TASK_QUEUES,
        "task_default_queue": EVENTS,
        "task_routes": (Router(settings.broker_url),),  # workers/boundary.py
        "task_create_missing_queues": False,
        "task_soft_time_limit": 300,
        "task_time_limit": 360,
        "worker_send_task_events": True,  # Flower sees every task
        "task_send_sent_event": True,
        "task_track_started": True,
        "worker_hijack_root_logger": False,
        # Dead-letters undecodable messages instead of only logging them.
        "worker_consumer": "workers.rejected:FleetConsumer",
        "imports": WORKER_MODULES,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule": beat_schedule.beat_schedule(settings),
        "beat_scheduler": "workers.beat:LockedScheduler",  # exactly one beat acts
    }


def _pinned_broker(broker_url: str | None) -> dict[str, object]:
    """`broker_read_url`/`broker_write_url`, only for an app made for another broker than
    the CELERY_BROKER_URL variable (chaos runs, tests).

    Celery prefers that variable over `broker_url` but not over these two, so such an app
    really uses its own broker. Celery 5.6's `celery report` and `inspect conf` (Flower's
    config page) censor `broker_url` but print these two with the password, so they are
    set only when they change which broker is used.
    """
    variable = os.environ.get("CELERY_BROKER_URL")
    if not variable or variable == broker_url:
        return {}
    return {"broker_read_url": broker_url, "broker_write_url": broker_url}


def create_app(settings: Settings | None = None) -> Celery:
    app = Celery("lifecycle_fleet", include=list(TASK_MODULES))
    app.conf.update(celery_config(settings or get_settings()))
    app.steps["worker"].add(HeartbeatStep)  # liveness file, when FLEET_HEARTBEAT_FILE is set
    return app


app = create_app()


@before_task_publish.connect
def _tag_workspace(headers: dict[str, object] | None = None, **_: object) -> None:
    """A task published inside a workspace carries it (`fleet_workspace`), so the work it
    starts runs there too (db/tenancy.py); one that already names one keeps it.

    A process that never imported db.tenancy (a producer) never set a workspace: looking
    it up in sys.modules keeps producers free of the database layer."""
    tenancy = sys.modules.get("db.tenancy")
    if tenancy is None:
        return
    workspace_id = tenancy.current_or_none()
    if workspace_id is not None and headers is not None:
        headers.setdefault(tenancy.HEADER, str(workspace_id))
