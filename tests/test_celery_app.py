"""The Celery app's configuration: delivery guarantees, routes and settings checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from db.config import to_sqlalchemy_url
from workers.boundary import Router
from workers.celery_app import app, celery_config
from workers.errors import PermanentError, TransientError, is_outage, is_transient
from workers.queues import QUEUE_NAMES, route_for_task
from workers.retry_policy import backoff_delay
from workers.settings import Settings


def test_delivery_is_at_least_once_with_small_prefetch() -> None:
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_ignore_result is True
    assert conf.worker_send_task_events is True and conf.task_send_sent_event is True
    assert conf.broker_transport_options["visibility_timeout"] == 3600 or (
        conf.broker_transport_options["visibility_timeout"] > 0
    )


def test_every_queue_is_declared_and_routed_by_prefix() -> None:
    assert [q.name for q in app.conf.task_queues] == list(QUEUE_NAMES)
    for queue in QUEUE_NAMES:
        assert route_for_task(f"{queue}.anything") == {"queue": queue, "routing_key": queue}
    assert route_for_task("bench.noop") is None


def test_routes_come_from_the_boundary_router() -> None:
    """The events queue is published to without declaring (workers/boundary.py)."""
    [router] = app.conf.task_routes
    assert isinstance(router, Router)
    assert app.amqp.router.route({}, "events.ingest")["declare"] == []


def test_rabbitmq_publishes_wait_for_the_brokers_confirm() -> None:
    """Without confirms a publish RabbitMQ refuses (no permission) vanishes after returning."""
    rabbitmq = celery_config(Settings(CELERY_BROKER_URL="amqp://u:p@h:5672/v"))
    assert rabbitmq["broker_transport_options"]["confirm_publish"] is True
    redis = celery_config(Settings(CELERY_BROKER_URL="redis://x"))
    assert "confirm_publish" not in redis["broker_transport_options"]


def test_key_prefix_reaches_the_transport() -> None:
    settings = Settings(CELERY_BROKER_URL="redis://x", broker_key_prefix="tenant-a:")
    assert celery_config(settings)["broker_transport_options"] == {
        "visibility_timeout": 3600, "global_keyprefix": "tenant-a:",
        "unacked_restore_interval": 10, "unacked_restore_throttle": 1,
    }


def test_retry_backoff_must_stay_below_visibility_timeout() -> None:
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT"):
        Settings(visibility_timeout=60, retry_backoff_max=60)


def test_backoff_is_bounded_and_jittered() -> None:
    delays = [backoff_delay(10, 1.0, 30.0) for _ in range(200)]
    assert all(0 <= d <= 30.0 for d in delays)
    assert len(set(delays)) > 150
    assert all(d <= 2.0 for d in (backoff_delay(1, 1.0, 30.0) for _ in range(100)))


def test_error_classification() -> None:
    import sqlalchemy.exc

    assert is_transient(TransientError("x"))
    assert is_transient(ConnectionResetError())
    assert is_transient(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("gone")))
    assert not is_transient(PermanentError("x"))
    assert not is_transient(ValueError("bad input"))


def test_outages_are_told_from_other_transient_errors() -> None:
    """A database or broker outage gets FLEET_OUTAGE_MAX_RETRIES; a deadlock the usual bound."""
    import psycopg.errors
    import sqlalchemy.exc

    def wrapped(error: Exception) -> sqlalchemy.exc.OperationalError:
        return sqlalchemy.exc.OperationalError("SELECT 1", {}, error)

    assert is_outage(wrapped(psycopg.errors.AdminShutdown("terminating connection")))
    assert is_outage(wrapped(psycopg.errors.CannotConnectNow("starting up")))
    assert is_outage(wrapped(psycopg.errors.ConnectionFailure("lost")))
    assert is_outage(ConnectionRefusedError())
    deadlock = wrapped(psycopg.errors.DeadlockDetected("deadlock"))
    assert is_transient(deadlock) and not is_outage(deadlock)
    assert not is_outage(TransientError("x")) and not is_outage(ValueError("x"))


def test_sqlalchemy_url() -> None:
    assert to_sqlalchemy_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert to_sqlalchemy_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert to_sqlalchemy_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_readme_configuration_table_is_generated_from_the_settings() -> None:
    from pathlib import Path

    from workers.settings import reference_markdown

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert reference_markdown() in readme, "run `python -m workers.settings` into the README"
