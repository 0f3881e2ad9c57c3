"""The base task against a real worker: one transaction, send-after-commit, retries,
dead letters. Uses the test-only tasks in tests/worker_tasks.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from db import tenancy
from tasks.maintenance import ensure_partitions
from tests.helpers import WorkerProcess, wait_for
from tests.worker_tasks import broken, flaky, outage_then_flaky, write_then_send

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module", autouse=True)
def runs_table(engine: Engine) -> Iterator[None]:
    with engine.begin() as conn:
        # A schema of its own, so the drift check of the public schema ignores it.
        conn.execute(text("CREATE SCHEMA IF NOT EXISTS test_support"))
        conn.execute(text("CREATE TABLE IF NOT EXISTS test_support.task_runs "
                          "(key text NOT NULL, attempt int NOT NULL, at timestamptz DEFAULT now())"))
        # Task bodies run as the application role (db/tenancy.py).
        conn.execute(text(f"GRANT USAGE ON SCHEMA test_support TO {tenancy.APP_ROLE}"))
        conn.execute(text(f"GRANT SELECT, INSERT ON test_support.task_runs TO {tenancy.APP_ROLE}"))
    yield


def _runs(engine: Engine, key: str) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT attempt FROM test_support.task_runs WHERE key = :k "
                                      "ORDER BY attempt"), {"k": key}).scalars())


def _dead_letters(engine: Engine, needle: str) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT source, reason, error_type, raw_payload, payload "
                                 "FROM dead_letters WHERE position(CAST(:n AS bytea) IN raw_payload) > 0"),
                            {"n": needle}).mappings().all()
    return [dict(r) for r in rows]


def test_transient_failures_are_retried_and_roll_back(engine: Engine,
                                                      celery_worker: WorkerProcess) -> None:
    key = f"flaky-{uuid.uuid4()}"
    flaky.delay(key, 2)
    # Attempts 0 and 1 raised after writing: their rows rolled back; attempt 2 committed.
    assert wait_for(lambda: _runs(engine, key), message="flaky task to succeed") == [2]
    assert _dead_letters(engine, key) == []


def test_permanent_failure_is_dead_lettered_with_its_arguments(engine: Engine,
                                                               celery_worker: WorkerProcess) -> None:
    key = f"broken-{uuid.uuid4()}"
    broken.delay(key)
    [letter] = wait_for(lambda: _dead_letters(engine, key), message="dead letter")
    assert letter["source"] == "maintenance.test_broken"
    assert letter["error_type"] == "PermanentError"
    assert "broken on purpose" in letter["reason"]
    assert json.loads(bytes(letter["raw_payload"]))["args"] == [key]
    assert letter["payload"]["task"] == "maintenance.test_broken"
    assert _runs(engine, key) == []  # the task's own write rolled back


def test_transient_failures_past_the_bound_are_dead_lettered(engine: Engine,
                                                             celery_worker: WorkerProcess) -> None:
    key = f"hopeless-{uuid.uuid4()}"
    flaky.delay(key, 99)  # the test settings allow 3 retries
    [letter] = wait_for(lambda: _dead_letters(engine, key), message="dead letter")
    assert letter["reason"].startswith("gave up after 3 retries")
    assert _runs(engine, key) == []


def test_an_outage_ridden_out_does_not_spend_the_transient_bound(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    """Six outage retries, then two deadlock-like failures: retried, not dead-lettered (the
    test settings allow 3 transient retries; the message counts its outage retries apart)."""
    key = f"outage-{uuid.uuid4()}"
    outage_then_flaky.delay(key, 6, 2)
    assert wait_for(lambda: _runs(engine, key), timeout=60,
                    message="task to succeed after the outage") == [8]
    assert _dead_letters(engine, key) == []


def test_follow_up_is_sent_after_commit(engine: Engine, celery_worker: WorkerProcess) -> None:
    key = f"chain-{uuid.uuid4()}"
    write_then_send.delay(key)
    wait_for(lambda: _runs(engine, f"{key}:seen=1"), message="follow-up to see the row")


def test_partition_maintenance_task_recreates_a_missing_partition(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    import datetime as dt

    from db.partitions import existing_partitions, ranges_ahead

    last = ranges_ahead("trigger_executions", dt.datetime.now(dt.UTC).date(), 3)[-1].name
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {last}"))
    ensure_partitions.delay()

    def recreated() -> bool:
        with engine.connect() as conn:
            return last in existing_partitions(conn, "trigger_executions")

    wait_for(recreated, message=f"{last} to be recreated")


def test_worker_runs_tasks_in_forked_children_with_their_own_pool(
        celery_worker: WorkerProcess) -> None:
    # The worker's log is JSON lines with the task context bound.
    log = celery_worker.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line.get("task_name") == "maintenance.test_broken" for line in lines)


def test_a_message_that_kills_its_worker_every_time_ends_in_dead_letters(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    """OOM-like: the pool process dies each run; requeued, counted, then dead-lettered."""
    from tests.worker_tasks import kills_its_worker

    key = f"poison-{uuid.uuid4().hex[:8]}"
    kills_its_worker.delay(key)
    [letter] = wait_for(lambda: _dead_letters(engine, key), timeout=90,
                        message="the poison message to be dead-lettered")
    assert letter["error_type"] == "PoisonMessage" and "redelivered" in letter["reason"]
    runs = len(_runs(engine, key))
    assert runs == 4  # the first delivery and three redeliveries, then no more
    with engine.connect() as conn:
        assert conn.execute(text("SELECT redeliveries FROM task_redeliveries "
                                 "WHERE task_name = 'maintenance.test_kills_its_worker' "
                                 "ORDER BY last_seen DESC LIMIT 1")).scalar_one() == 4
    # The worker is still serving other work.
    flaky.delay(f"{key}-after", 0)
    wait_for(lambda: _runs(engine, f"{key}-after"), message="the worker to go on")
