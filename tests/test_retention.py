"""Retention on generated data in a database of its own: archive, drop, batch delete."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from db.migrate import upgrade
from db.partitions import existing_partitions, range_containing, split_default
from workers.retention import RetentionReport, run_retention

pytestmark = pytest.mark.servers


def test_retention_follows_the_seed_policy(fresh_database: str, tmp_path: Path) -> None:
    upgrade(fresh_database)
    engine = create_engine(fresh_database)
    today = dt.datetime.now(dt.UTC).date()
    old_event = dt.datetime.combine(today - dt.timedelta(days=770), dt.time(12), dt.UTC)
    old_trigger = dt.datetime.combine(today - dt.timedelta(days=125), dt.time(12), dt.UTC)
    old_metric = today - dt.timedelta(days=4 * 365)
    year_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    with engine.begin() as conn:
        user = conn.execute(text("INSERT INTO users (email, current_lifecycle_stage) "
                                 "VALUES ('r@x.io', 'Activation') RETURNING id")).scalar()
        wf = conn.execute(text("INSERT INTO workflows (name, bpmn_xml) VALUES ('w', '<x/>') "
                               "RETURNING id")).scalar()
        trigger = conn.execute(text("INSERT INTO triggers (name, event_type, conditions) "
                                    "VALUES ('t', 'a.b', '{}') RETURNING id")).scalar()
        executions = {}
        for name, status, started in (("old_done", "completed", year_ago),
                                      ("old_running", "running", year_ago),
                                      ("new_done", "completed", dt.datetime.now(dt.UTC))):
            executions[name] = conn.execute(text(
                "INSERT INTO workflow_executions (workflow_id, user_id, status, started_at, "
                "completed_at) VALUES (:w, :u, :s, :t, :end) RETURNING id"),
                {"w": wf, "u": user, "s": status, "t": started,
                 "end": started if status == "completed" else None}).scalar()
        for i in range(25):
            conn.execute(text("INSERT INTO lifecycle_events (event_type, user_id, event_data, "
                              "created_at) VALUES ('old.event', :u, CAST(:d AS jsonb), :c)"),
                         {"u": user, "d": json.dumps({"i": i, "text": "a,b \"quoted\"\nline"}),
                          "c": old_event})
        conn.execute(text("INSERT INTO lifecycle_events (event_type, user_id, "
                          "workflow_execution_id) VALUES ('new.event', :u, :x)"),
                     {"u": user, "x": executions["old_done"]})
        conn.execute(text("INSERT INTO trigger_executions (trigger_id, condition_met, executed_at) "
                          "VALUES (:t, true, :c)"), {"t": trigger, "c": old_trigger})
        conn.execute(text("INSERT INTO metrics_daily (metric_date, lifecycle_stage, metric_name, "
                          "metric_value) VALUES (:d, 'All', 'm', 1)"), {"d": old_metric})
        for table in ("lifecycle_events", "trigger_executions", "metrics_daily"):
            split_default(conn, table)
    events_partition = range_containing("lifecycle_events", old_event.date()).name
    trigger_partition = range_containing("trigger_executions", old_trigger.date()).name
    metrics_partition = range_containing("metrics_daily", old_metric).name

    dry = run_retention(engine, tmp_path, dry_run=True)
    assert dry.archived == (events_partition,)
    assert set(dry.dropped) == {trigger_partition, metrics_partition}
    assert dry.deleted["workflow_executions"] == 1
    with engine.connect() as conn:
        assert events_partition in existing_partitions(conn, "lifecycle_events")
    assert not list(tmp_path.iterdir())

    with engine.begin() as conn:  # a run that died between DETACH and DROP left a plain table
        conn.execute(text(f"ALTER TABLE lifecycle_events DETACH PARTITION {events_partition}"))
    report = run_retention(engine, tmp_path)
    assert report.archived == (events_partition,)
    assert set(report.dropped) == {events_partition, trigger_partition, metrics_partition}
    assert report.deleted["workflow_executions"] == 1
    manifest = json.loads((tmp_path / f"{events_partition}.manifest.json").read_text())
    assert manifest["rows"] == 25 and manifest["table"] == "lifecycle_events"
    with gzip.open(tmp_path / f"{events_partition}.csv.gz", "rt", newline="") as archive:
        rows = list(csv.DictReader(archive))
    assert len(rows) == 25
    assert sorted(json.loads(r["event_data"])["i"] for r in rows) == list(range(25))
    assert json.loads(rows[0]["event_data"])["text"] == "a,b \"quoted\"\nline"

    with engine.begin() as conn:
        for table, name in (("lifecycle_events", events_partition),
                            ("trigger_executions", trigger_partition),
                            ("metrics_daily", metrics_partition)):
            assert name not in existing_partitions(conn, table)
            assert not conn.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar()
        assert conn.execute(text("SELECT count(*) FROM lifecycle_events "
                                 "WHERE event_type = 'old.event'")).scalar() == 0
        kept = set(conn.execute(text("SELECT id FROM workflow_executions")).scalars())
        assert kept == {executions["old_running"], executions["new_done"]}
        # The newer audit row that pointed at the deleted execution stays, unlinked.
        assert conn.execute(text("SELECT workflow_execution_id FROM lifecycle_events "
                                 "WHERE event_type = 'new.event'")).one() == (None,)
        # A late row for the dropped range is not refused: it lands in the default partition.
        conn.execute(text("INSERT INTO lifecycle_events (event_type, created_at) "
                          "VALUES ('late.event', :c)"), {"c": old_event})
    again = run_retention(engine, tmp_path)
    assert again.dropped == () and again.deleted["workflow_executions"] == 0
    engine.dispose()


def test_detach_waits_for_a_writer_instead_of_deadlocking_with_it(fresh_database: str,
                                                                  tmp_path: Path) -> None:
    """A writer that holds its user row and then inserts an audit event (set_lifecycle_stage,
    ingest) must not deadlock with DETACH, which also locks `users` (for the foreign key)."""
    report, old = _retention_meets_a_writer(
        fresh_database, tmp_path, "UPDATE users SET updated_at = now() WHERE id = :u",
        "INSERT INTO lifecycle_events (event_type, user_id) VALUES ('new.event', :u)")
    assert report.archived == (old,)


def test_dropping_the_partition_waits_for_a_writer_instead_of_deadlocking_with_it(
        fresh_database: str, tmp_path: Path) -> None:
    """Dropping a foreign key locks both tables ACCESS EXCLUSIVE. A writer holding `users`
    (an ingest's FOR KEY SHARE) that then wants `workflow_executions` deadlocked with a
    DROP TABLE holding `workflow_executions` and waiting for `users`."""
    report, old = _retention_meets_a_writer(
        fresh_database, tmp_path, "SELECT 1 FROM users WHERE id = :u FOR KEY SHARE",
        "LOCK TABLE workflow_executions IN ROW SHARE MODE")
    assert old in report.dropped


def _retention_meets_a_writer(fresh_database: str, tmp_path: Path, hold: str,
                              then: str) -> tuple[RetentionReport, str]:
    """Retention of an expired partition while a writer holds its user (`hold`), waits until
    retention waits for it, then runs `then`; (the report, the expired partition)."""
    upgrade(fresh_database)
    engine = create_engine(fresh_database)
    today = dt.datetime.now(dt.UTC).date()
    old = dt.datetime.combine(today - dt.timedelta(days=800), dt.time(12), dt.UTC)
    with engine.begin() as conn:
        user = conn.execute(text("INSERT INTO users (email, current_lifecycle_stage) "
                                 "VALUES ('d@x.io', 'Activation') RETURNING id")).scalar()
        conn.execute(text("INSERT INTO lifecycle_events (event_type, user_id, created_at) "
                          "VALUES ('old.event', :u, :c)"), {"u": user, "c": old})
        split_default(conn, "lifecycle_events")
    outcome: dict[str, object] = {}
    with engine.connect() as writer:
        writer.execute(text(hold), {"u": user})
        retention = threading.Thread(
            target=lambda: outcome.update(report=_capture(run_retention, engine, tmp_path)))
        retention.start()
        deadline = time.monotonic() + 10
        while not _lock_waits(engine):
            assert time.monotonic() < deadline, "retention never waited for the writer"
            time.sleep(0.05)
        time.sleep(0.2)
        writer.execute(text(then), {"u": user} if ":u" in then else {})
        writer.commit()
        retention.join(timeout=30)
    engine.dispose()
    report = outcome["report"]
    assert isinstance(report, RetentionReport), report
    return report, range_containing("lifecycle_events", old.date()).name


def _capture(fn: Callable[..., object], *args: object) -> object:
    try:
        return fn(*args)
    except Exception as exc:  # handed to the test thread, which reports it
        return exc


def _lock_waits(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()")).scalar_one())
