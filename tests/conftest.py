"""Test session setup: real servers, a fresh database per session, a real worker.

Servers: DATABASE_URL / CELERY_BROKER_URL when set; otherwise embedded PostgreSQL
and Valkey are started in a temporary folder and stopped at the end. Either way
the session gets a database of its own (created, migrated by Alembic, dropped)
and a broker namespace of its own (a key prefix on Redis, a vhost on RabbitMQ), so
concurrent sessions never meet.

This runs in `pytest_configure`, before test modules are imported, because the
Celery app reads the settings when it is first imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.parse
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import Engine, create_engine

from db.admin import create_database, drop_database
from db.config import to_sqlalchemy_url
from tests.helpers import SERVERS, TRIGGER_CACHE_SECONDS, Servers, WorkerProcess
from workers.broker import delete_prefixed_keys


def _sqlalchemy(url: str) -> str:
    return to_sqlalchemy_url(url)


_SESSION_VHOSTS: list[str] = []  # the RabbitMQ vhost pytest_configure made, to delete at the end


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def _session_vhost(broker_url: str, tag: str) -> str:
    """On RabbitMQ, the URL of a vhost of the session's own (other brokers: unchanged).

    Queue names are fixed (workers/queues.py), so two sessions on one vhost would
    consume each other's messages; a vhost keeps them apart as the key prefix does on
    Redis. Made with `rabbitmqctl` (the broker's machine); without it the URL's vhost
    is used as is and the session must be alone on it.
    """
    parts = urllib.parse.urlsplit(broker_url)
    if parts.scheme not in ("amqp", "amqps", "pyamqp"):
        return broker_url
    if shutil.which("rabbitmqctl") is None:
        warnings.warn("rabbitmqctl not found: the tests share the broker URL's vhost",
                      stacklevel=1)
        return broker_url
    vhost = f"fleet-test-{tag}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, urllib.parse.unquote(parts.username or "guest"),
                 ".*", ".*", ".*")
    _SESSION_VHOSTS.append(vhost)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # pragma: no cover - not used with xdist
        return
    SERVERS.home = Path(tempfile.mkdtemp(prefix="fleet-test-"))
    database_url = os.environ.get("DATABASE_URL")
    broker_url = os.environ.get("CELERY_BROKER_URL")
    if not (database_url and broker_url):
        from workers.dev.embedded import EmbeddedServices

        embedded = EmbeddedServices(SERVERS.home / "servers")
        state = embedded.start()
        SERVERS.embedded = embedded
        database_url = database_url or state.database_url
        broker_url = broker_url or state.broker_url
    tag = uuid.uuid4().hex[:10]
    SERVERS.admin_url = database_url
    SERVERS.database = f"fleet_test_{tag}"
    SERVERS.database_url = create_database(database_url, SERVERS.database)
    broker_url = _session_vhost(broker_url, tag)
    SERVERS.broker_url = broker_url

    os.environ["DATABASE_URL"] = SERVERS.database_url
    os.environ["CELERY_BROKER_URL"] = broker_url
    os.environ["FLEET_BROKER_KEY_PREFIX"] = f"fleet-test-{tag}:"
    os.environ["FLEET_HOME"] = str(SERVERS.home / "fleet")
    os.environ["FLEET_LOG_JSON"] = "true"
    # Short retries so the retry path is exercised in seconds, not minutes.
    os.environ["FLEET_RETRY_BACKOFF_BASE"] = "0.05"
    os.environ["FLEET_RETRY_BACKOFF_MAX"] = "0.5"
    os.environ["FLEET_TASK_MAX_RETRIES"] = "3"
    os.environ["FLEET_TRIGGER_CACHE_SECONDS"] = str(TRIGGER_CACHE_SECONDS)

    from db.migrate import upgrade

    upgrade(_sqlalchemy(SERVERS.database_url))
    from db import tenancy
    from db.models import DEFAULT_WORKSPACE_ID

    # The test process's own transactions (fixtures, checks through db.session) work in
    # the default workspace unless a test says otherwise; workers and the CLI set theirs.
    tenancy.set_fallback(DEFAULT_WORKSPACE_ID)


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(SERVERS, "database"):
        return
    from db.session import reset_engine

    reset_engine()
    delete_prefixed_keys(SERVERS.broker_url, os.environ["FLEET_BROKER_KEY_PREFIX"])
    try:
        drop_database(SERVERS.admin_url, SERVERS.database)
    finally:
        for vhost in _SESSION_VHOSTS:
            _rabbitmqctl("delete_vhost", vhost)
        if SERVERS.embedded is not None:
            SERVERS.embedded.discard()  # type: ignore[attr-defined]
        if os.environ.get("FLEET_TEST_KEEP_LOGS"):
            print(f"\ntest logs kept in {SERVERS.home}")
        else:
            shutil.rmtree(SERVERS.home, ignore_errors=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def servers() -> Servers:
    return SERVERS


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """An engine on the session's freshly migrated database."""
    eng = create_engine(_sqlalchemy(SERVERS.database_url), pool_pre_ping=True)
    yield eng
    eng.dispose()


@pytest.fixture()
def fresh_database() -> Iterator[str]:
    """An empty database of its own (not migrated), dropped after the test; yields its URL."""
    name = f"fleet_scratch_{uuid.uuid4().hex[:10]}"
    url = create_database(SERVERS.admin_url, name)
    yield _sqlalchemy(url)
    drop_database(SERVERS.admin_url, name)


@pytest.fixture(scope="session")
def celery_worker() -> Iterator[WorkerProcess]:
    """One real prefork worker consuming every queue, for the whole session."""
    from workers.queues import QUEUE_NAMES

    worker = WorkerProcess(",".join(QUEUE_NAMES))
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture()
def private_app() -> Iterator[Celery]:
    """A Celery app on a broker key prefix of its own: only a worker the test starts on that
    prefix consumes what it publishes."""
    from workers.celery_app import app, create_app  # after pytest_configure set the URLs
    from workers.settings import Settings

    prefix = f"fleet-test-private-{uuid.uuid4().hex[:8]}:"
    other = create_app(Settings(broker_key_prefix=prefix))
    try:
        yield other
    finally:
        other.close()
        app.set_current()
        delete_prefixed_keys(SERVERS.broker_url, prefix)
