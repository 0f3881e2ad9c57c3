"""`fleet health` and `fleet status`: healthy on the test session, non-zero when something is off.

The strict checks run on a scratch database of their own (migrated, then given dead
letters, an overdue timer and a missing partition), so what other tests leave behind
in the session's database cannot make them pass or fail.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from click.testing import Result
from sqlalchemy import Engine, create_engine, text
from typer.testing import CliRunner

from db.admin import create_database, drop_database
from db.config import to_sqlalchemy_url
from db.migrate import upgrade
from db.partitions import MONTHS_AHEAD, ranges_ahead
from tests.helpers import ROOT, SERVERS, WorkerProcess
from workers.dev.ports import free_port
from workers.settings import get_settings

pytestmark = pytest.mark.servers


def fleet(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli.main", *args], cwd=ROOT,
                          env=dict(os.environ, COLUMNS="250", **env), capture_output=True,
                          text=True, timeout=120)


def health(*args: str, **env: str) -> Result:
    """`fleet health` in this process (faster than a subprocess; same code path)."""
    from workers.cli.main import app

    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, ["health", *args], env=env)
    finally:
        get_settings.cache_clear()


def lines(result: subprocess.CompletedProcess[str] | Result) -> dict[str, str]:
    """`fleet health` output as {check name: "ok"/"FAIL"/"skip"}."""
    checks = {}
    for line in result.stdout.splitlines():
        label, rest = line[:5].strip(), line[6:]
        checks[rest[:13].strip()] = label
    return checks


@pytest.fixture()
def scratch() -> Iterator[tuple[str, Engine]]:
    """A migrated database of its own: (DATABASE_URL, engine)."""
    name = f"fleet_health_{uuid.uuid4().hex[:10]}"
    url = create_database(SERVERS.admin_url, name)
    upgrade(to_sqlalchemy_url(url))
    engine = create_engine(to_sqlalchemy_url(url))
    try:
        yield url, engine
    finally:
        engine.dispose()
        drop_database(SERVERS.admin_url, name)


def _stalled_gauge(engine: Engine) -> float:
    """`fleet_executions_stalled` as the exporter computes it on a scrape of this database."""
    from workers.metrics import FleetCollector

    collector = FleetCollector(get_settings(), engine)
    [family] = [f for f in collector.collect() if f.name == "fleet_executions_stalled"]
    return float(family.samples[0].value)


def test_healthy_on_the_test_session(celery_worker: WorkerProcess) -> None:
    # Other tests leave dead letters, (paused) timers and stalled executions behind: only
    # the limits are wide.
    result = fleet("health", "--workers", "--max-dead-letters", "1000000",
                   "--max-timer-lag", "1e12", "--max-stalled", "1000000")
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result) == {name: "ok" for name in ("database", "broker", "workers",
                                                      "partitions", "timer lag", "dead letters",
                                                      "stalled")}


def test_each_check_fails_on_its_own(scratch: tuple[str, Engine],
                                     celery_worker: WorkerProcess) -> None:
    url, engine = scratch
    healthy = health("--workers", "--queue", "events", DATABASE_URL=url)
    assert healthy.exit_code == 0, healthy.output
    assert set(lines(healthy).values()) == {"ok"}

    with engine.begin() as conn:
        conn.execute(text("INSERT INTO dead_letters (source, reason, raw_payload) "
                          "VALUES ('test', 'bad', '\\x00'::bytea), ('test', 'bad', '\\x01'::bytea)"))
    result = health("--max-dead-letters", "1", DATABASE_URL=url)
    assert result.exit_code == 1
    assert lines(result)["dead letters"] == "FAIL" and "2 pending (max 1)" in result.stdout
    assert health("--max-dead-letters", "2", DATABASE_URL=url).exit_code == 0

    with engine.begin() as conn:
        user = conn.execute(text("INSERT INTO users (email, current_lifecycle_stage) "
                                 "VALUES (:e, 'Acquisition') RETURNING id"),
                            {"e": f"health-{uuid.uuid4().hex[:8]}@example.com"}).scalar_one()
        workflow = conn.execute(text("INSERT INTO workflows (name, bpmn_xml) VALUES "
                                     "('health', '<x/>') RETURNING id")).scalar_one()
        conn.execute(text("INSERT INTO workflow_executions (workflow_id, user_id, status, "
                          "wake_at) VALUES (:w, :u, 'running', now() - interval '10 minutes')"),
                     {"w": workflow, "u": user})
    result = health("--max-timer-lag", "60", DATABASE_URL=url)
    assert result.exit_code == 1
    assert lines(result)["timer lag"] == "FAIL", result.stdout
    assert lines(result)["dead letters"] == "ok"
    status = fleet("status", DATABASE_URL=url)
    assert status.returncode == 0, status.stderr
    assert "oldest due timer:" in status.stdout and "s late" in status.stdout
    assert "executions: running 1" in status.stdout
    with engine.begin() as conn:
        conn.execute(text("UPDATE workflow_executions SET wake_at = NULL"))
    assert lines(health(DATABASE_URL=url))["stalled"] == "ok"

    with engine.begin() as conn:  # as the stepper marks one that can never go on by itself
        conn.execute(text("UPDATE workflow_executions SET stalled_at = now(), "
                          "error_message = 'stalled: nothing ready, due, awaited or in flight'"))
    result = health(DATABASE_URL=url)
    assert result.exit_code == 1
    assert lines(result)["stalled"] == "FAIL" and "1 executions (max 0)" in result.stdout
    assert health("--max-stalled", "1", DATABASE_URL=url).exit_code == 0
    status = fleet("status", DATABASE_URL=url)
    assert status.returncode == 0 and "stalled executions: 1" in status.stdout, status.stderr
    assert _stalled_gauge(engine) == 1
    with engine.begin() as conn:  # ended (e.g. cancelled): no longer counted
        conn.execute(text("UPDATE workflow_executions SET status = 'cancelled'"))
    assert lines(health(DATABASE_URL=url))["stalled"] == "ok"
    assert _stalled_gauge(engine) == 0

    partition = ranges_ahead("lifecycle_events", dt.datetime.now(dt.UTC).date(),
                             MONTHS_AHEAD)[-1].name
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {partition}"))
    result = health(DATABASE_URL=url)
    assert result.exit_code == 1
    assert lines(result)["partitions"] == "FAIL" and partition in result.stdout
    assert fleet("status", DATABASE_URL=url).returncode == 1


def test_unreachable_servers_fail(scratch: tuple[str, Engine]) -> None:
    url, _ = scratch
    no_broker = f"redis://127.0.0.1:{free_port()}/0"
    result = health("--workers", DATABASE_URL=url, CELERY_BROKER_URL=no_broker)
    assert result.exit_code == 1
    assert lines(result)["broker"] == "FAIL"
    assert lines(result)["workers"] == "skip"
    assert lines(result)["database"] == "ok"

    no_database = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    result = health(DATABASE_URL=no_database)
    assert result.exit_code == 1
    assert lines(result) == {"database": "FAIL", "broker": "ok", "partitions": "skip",
                             "timer lag": "skip", "dead letters": "skip", "stalled": "skip"}


def test_status_shows_queues_and_workers(scratch: tuple[str, Engine],
                                         celery_worker: WorkerProcess) -> None:
    url, _ = scratch
    result = fleet("status", DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for queue in ("events", "workflows", "actions", "segments", "maintenance"):
        assert queue in out
    assert celery_worker.hostname in out
    assert "workers answering:" in out and "dead letters pending: 0" in out
    assert "oldest due timer: none due" in out and "outbox backlog: 0" in out
