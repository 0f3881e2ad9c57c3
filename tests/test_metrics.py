"""Metrics: the nightly figures on generated data (reruns change nothing), and the
Prometheus metrics `fleet exporter` serves (workers' counters, gauges from the database
and the broker)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import httpx
import pytest
import typer
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, text

from db.admin import create_database, drop_database
from db.config import to_sqlalchemy_url
from db.migrate import upgrade
from db.partitions import MONTHS_AHEAD, ranges_ahead
from db.session import session_scope
from tests.helpers import ROOT, SERVERS, TRIGGER_CACHE_SECONDS, WorkerProcess, wait_for, worker_env
from workers.broker import delete_prefixed_keys
from workers.dev.ports import free_port
from workers.reports.metrics import aggregate_day

pytestmark = pytest.mark.servers
DAY = dt.date(2020, 3, 10)


def at(day: int, hour: int = 12) -> dt.datetime:
    return dt.datetime(2020, 3, day, hour, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def generated(engine: Engine) -> dict[str, uuid.UUID]:
    ids = {name: uuid.uuid4() for name in "ABCDE"}
    with engine.begin() as conn:
        for name, stage in zip("ABCDE", ["Activation", "Revenue", "Retention", "Activation",
                                         "Acquisition"], strict=True):
            conn.execute(text("INSERT INTO users (id, email, current_lifecycle_stage, created_at) "
                              "VALUES (:i, :e, :s, :c)"),
                         {"i": ids[name], "e": f"{name}-{ids[name]}@x.io", "s": stage, "c": at(1)})
        history = [("A", "Acquisition", "Activation", at(10, 10)),
                   ("B", "Acquisition", "Activation", at(5)), ("B", "Activation", "Revenue", at(12)),
                   ("D", None, "Acquisition", at(3, 1)), ("D", "Acquisition", "Activation", at(6)),
                   ("E", None, "Acquisition", at(3, 2))]
        for user, old, new, when in history:
            conn.execute(text("INSERT INTO user_lifecycle_history (user_id, from_stage, to_stage, "
                              "transitioned_at) VALUES (:u, :f, :t, :w)"),
                         {"u": ids[user], "f": old, "t": new, "w": when})
        for etype, stage in (("x.a", "Activation"), ("x.a", "Activation"), ("x.b", None)):
            conn.execute(text("INSERT INTO lifecycle_events (event_type, user_id, lifecycle_stage, "
                              "created_at) VALUES (:t, :u, :s, :c)"),
                         {"t": etype, "u": ids["A"], "s": stage, "c": at(10)})
        workflow = conn.execute(text("INSERT INTO workflows (name, bpmn_xml) VALUES (:n, '<x/>') "
                                     "RETURNING id"), {"n": f"wf-metrics-{ids['A']}"}).scalar()
        trigger = conn.execute(text("INSERT INTO triggers (name, event_type, conditions) "
                                    "VALUES (:n, 'x.a', '{}') RETURNING id"),
                               {"n": f"t-metrics-{ids['A']}"}).scalar()
        for met in (True, False, False):
            conn.execute(text("INSERT INTO trigger_executions (trigger_id, user_id, condition_met, "
                              "executed_at) VALUES (:t, :u, :m, :at)"),
                         {"t": trigger, "u": ids["A"], "m": met, "at": at(10)})
        for status, seconds in (("completed", 60), ("failed", 5)):
            conn.execute(text("INSERT INTO workflow_executions (workflow_id, user_id, status, "
                              "started_at, completed_at) VALUES (:w, :u, :s, :st, :end)"),
                         {"w": workflow, "u": ids["A"], "s": status, "st": at(10),
                          "end": at(10) + dt.timedelta(seconds=seconds)})
    return {"workflow": workflow, "trigger": trigger, **ids}


def _figures(engine: Engine) -> dict[tuple[str, str, str], tuple[int, Decimal]]:
    with engine.connect() as conn:
        return {(r.lifecycle_stage, r.metric_name, str(sorted(r.dimensions.items()))):
                (r.id, r.metric_value) for r in conn.execute(text(
                    "SELECT * FROM metrics_daily WHERE metric_date = :d"), {"d": DAY})}


def test_figures_of_a_day(engine: Engine, generated: dict[str, uuid.UUID]) -> None:
    with session_scope() as session:
        aggregate_day(session, DAY)
    values = {k: v for k, (_, v) in _figures(engine).items()}
    wf = f"wf-metrics-{generated['A']}"
    trig = f"t-metrics-{generated['A']}"
    assert values[("Activation", "users_in_stage", "[]")] == 3  # A, B and D
    assert values[("Acquisition", "users_in_stage", "[]")] == 1  # E
    assert values[("Retention", "users_in_stage", "[]")] == 1  # C, no history
    assert values[("Activation", "stage_entries", "[]")] == 1
    assert values[("Acquisition", "stage_exits", "[]")] == 1
    assert values[("Activation", "events", "[('event_type', 'x.a')]")] == 2
    assert values[("Unknown", "events", "[('event_type', 'x.b')]")] == 1
    assert values[("All", "triggers_evaluated", f"[('trigger', '{trig}')]")] == 3
    assert values[("All", "triggers_matched", f"[('trigger', '{trig}')]")] == 1
    assert values[("All", "executions_started", f"[('workflow', '{wf}')]")] == 2
    assert values[("All", "executions_completed", f"[('workflow', '{wf}')]")] == 1
    assert values[("All", "executions_failed", f"[('workflow', '{wf}')]")] == 1
    assert values[("All", "execution_median_seconds", f"[('workflow', '{wf}')]")] == 60
    assert values[("Acquisition", "conversion_7d", "[('to', 'Activation')]")] == Decimal("0.5")


def test_a_rerun_changes_nothing_and_removes_what_is_gone(
        engine: Engine, generated: dict[str, uuid.UUID]) -> None:
    with session_scope() as session:
        aggregate_day(session, DAY)
    before = _figures(engine)
    with session_scope() as session:
        again = aggregate_day(session, DAY)
    assert again.written == 0 and again.removed == 0
    assert _figures(engine) == before  # same ids, same values
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM lifecycle_events WHERE event_type = 'x.b' "
                          "AND user_id = :u"), {"u": generated["A"]})
    with session_scope() as session:
        third = aggregate_day(session, DAY)
    assert third.removed == 1
    after = _figures(engine)
    assert ("Unknown", "events", "[('event_type', 'x.b')]") not in after
    assert {k: v for k, v in after.items()} == {
        k: v for k, v in before.items() if k != ("Unknown", "events", "[('event_type', 'x.b')]")}


# --------------------------------------------------------------- Prometheus: fleet exporter


@pytest.fixture()
def scratch_database() -> Iterator[tuple[str, Engine]]:
    """A migrated database of its own, so gauges can be checked for exact values."""
    name = f"fleet_exporter_{uuid.uuid4().hex[:10]}"
    url = create_database(SERVERS.admin_url, name)
    upgrade(to_sqlalchemy_url(url))
    scratch = create_engine(to_sqlalchemy_url(url))
    try:
        yield url, scratch
    finally:
        scratch.dispose()
        drop_database(SERVERS.admin_url, name)


@contextmanager
def exporter(**env: str) -> Iterator[str]:
    """`fleet exporter` on a free port with the session's env (plus `env`); yields its URL."""
    port = free_port()
    log_path = SERVERS.home / f"exporter-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli.main", "exporter", "--port", str(port),
             "--address", "127.0.0.1"], env=worker_env(**env), cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/metrics"

    def serving() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"exporter exited: {log_path.read_text()[-3000:]}")
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(serving, timeout=60, interval=0.25, message="the exporter to serve /metrics")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    """A labelled metric summed over its labels."""
    return sum(v for (n, _), v in samples.items() if n == name)


def test_exporter_serves_what_the_workers_counted(engine: Engine,
                                                  celery_worker: WorkerProcess) -> None:
    from tests.workflow_helpers import deploy
    from workers.producer import send_event, send_events

    workflow = deploy("minimal.bpmn")
    etype = f"metrics.e{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        workflow_id = conn.execute(text("SELECT id FROM workflows WHERE name = :n"),
                                   {"n": workflow}).scalar_one()
        for name, conditions in (("always", {}), ("pro-only", {
                "field": "user.attributes.plan", "op": "eq", "value": "pro"})):
            conn.execute(text("INSERT INTO triggers (name, event_type, conditions, workflow_id, "
                              "reentry) VALUES (:n, :t, CAST(:c AS jsonb), :w, 'allow')"),
                         {"n": f"{name}-{etype}", "t": etype, "c": json.dumps(conditions),
                          "w": workflow_id})
    time.sleep(TRIGGER_CACHE_SECONDS + 0.2)  # workers notice definition changes this late

    with exporter() as url:
        before = scrape(url)
        for i in range(3):
            send_event(etype, user=f"metrics-{uuid.uuid4().hex[:8]}-{i}@example.com")
        send_events([{"event_type": "Not A Type", "user": "metrics-bad@example.com"}],
                    validate=False)

        def executions_done() -> bool:
            with engine.connect() as conn:
                return conn.execute(text(
                    "SELECT count(*) FROM workflow_executions WHERE workflow_id = :w "
                    "AND status = 'completed'"), {"w": workflow_id}).scalar_one() == 3

        wait_for(executions_done, timeout=60, message="the three executions to complete")

        def delta(samples: Samples, name: str) -> float:
            return value(samples, name) - value(before, name)

        def counted() -> Samples | None:
            after = scrape(url)
            steps = total(after, "fleet_workflow_steps_total") - total(
                before, "fleet_workflow_steps_total")
            ok = (delta(after, "fleet_events_ingested_total") >= 3
                  and delta(after, "fleet_events_dead_lettered_total") >= 1
                  and delta(after, "fleet_trigger_evaluations_total") >= 6
                  and delta(after, "fleet_trigger_matches_total") >= 3
                  and steps >= 3)
            return after if ok else None

        after = wait_for(counted, timeout=30, interval=0.5, message="the counters to move")
    assert value(after, "fleet_workflow_steps_total", outcome="completed") >= 3
    assert total(after, "fleet_workflow_step_seconds_count") == total(
        after, "fleet_workflow_steps_total")
    assert value(after, "fleet_workflow_step_seconds_bucket", le="+Inf",
                 outcome="completed") == value(after, "fleet_workflow_steps_total",
                                               outcome="completed")
    assert value(after, "fleet_workflow_step_seconds_sum", outcome="completed") > 0
    assert value(after, "fleet_database_up") == 1 and value(after, "fleet_broker_up") == 1


def test_exporter_gauges_read_the_database_and_the_broker(
        scratch_database: tuple[str, Engine]) -> None:
    from workers.celery_app import app, create_app
    from workers.settings import Settings

    url, scratch = scratch_database
    with scratch.begin() as conn:
        user = conn.execute(text("INSERT INTO users (email, current_lifecycle_stage) VALUES "
                                 "('gauges@example.com', 'Acquisition') RETURNING id")).scalar()
        workflow = conn.execute(text("INSERT INTO workflows (name, bpmn_xml) VALUES "
                                     "('gauges', '<x/>') RETURNING id")).scalar()
        for status, wake in (("pending", None), ("running", "1 hour"), ("running", None),
                             ("cancelled", None)):
            conn.execute(text("INSERT INTO workflow_executions (workflow_id, user_id, status, "
                              "wake_at) VALUES (:w, :u, :s, now() - CAST(:wake AS interval))"),
                         {"w": workflow, "u": user, "s": status, "wake": wake})
        for status in ("pending", "pending", "pending", "replayed"):
            conn.execute(text("INSERT INTO dead_letters (source, reason, raw_payload, status) "
                              "VALUES ('test', 'bad', '\\x00'::bytea, :s)"), {"s": status})
        for status in ("PENDING", "PENDING", "PUBLISHED"):
            conn.execute(text("INSERT INTO event_outbox (event_id, topic, headers, payload, "
                              "status, created_at) VALUES (gen_random_uuid(), 'events', '{}', "
                              "'{}', :s, now() - interval '90 seconds')"), {"s": status})
        partition = ranges_ahead("trigger_executions", dt.datetime.now(dt.UTC).date(),
                                 MONTHS_AHEAD)[-1].name
        conn.execute(text(f"DROP TABLE {partition}"))

    # Messages nobody consumes: a key prefix of its own, three in `events`, one in `segments`.
    prefix = f"fleet-test-gauges-{uuid.uuid4().hex[:8]}:"
    other = create_app(Settings(broker_key_prefix=prefix))
    try:
        for queue in ("events", "events", "events", "segments"):
            other.send_task("bench.noop", queue=queue)
        with exporter(DATABASE_URL=url, FLEET_BROKER_KEY_PREFIX=prefix) as metrics_url:
            samples = scrape(metrics_url)
    finally:
        other.close()
        app.set_current()
        delete_prefixed_keys(SERVERS.broker_url, prefix)

    assert value(samples, "fleet_database_up") == 1 and value(samples, "fleet_broker_up") == 1
    assert {status: value(samples, "fleet_executions", status=status)
            for status in ("pending", "running", "completed", "failed", "cancelled")} == {
        "pending": 1, "running": 2, "completed": 0, "failed": 0, "cancelled": 1}
    assert 3600 <= value(samples, "fleet_timer_lag_seconds") < 3700
    assert value(samples, "fleet_dead_letters_pending") == 3
    assert value(samples, "fleet_outbox_backlog") == 2
    assert 90 <= value(samples, "fleet_outbox_oldest_age_seconds") < 200
    assert value(samples, "fleet_partitions_missing", table="trigger_executions") == 1
    assert value(samples, "fleet_partitions_missing", table="lifecycle_events") == 0
    assert {queue: value(samples, "fleet_queue_depth", queue=queue)
            for queue in ("events", "workflows", "actions", "segments", "maintenance")} == {
        "events": 3, "workflows": 0, "actions": 0, "segments": 1, "maintenance": 0}


def test_exporter_reports_a_down_database_and_keeps_serving() -> None:
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with exporter(DATABASE_URL=down) as url:
        samples = scrape(url)
        assert value(samples, "fleet_database_up") == 0
        assert value(samples, "fleet_broker_up") == 1
        assert ("fleet_executions", (("status", "pending"),)) not in samples
        assert scrape(url)  # and the next scrape is served too


def test_task_results_map_to_counters() -> None:
    """What task_postrun reports, turned into counters (here in a private registry)."""
    from celery import states
    from prometheus_client import CollectorRegistry

    from workers.metrics import WorkerMetrics

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    ingest = {"accepted": 5, "duplicates": 2, "rejected": 1, "evaluated": 7, "matched": 3}
    metrics.record("events.ingest", states.SUCCESS, ingest, 0.01)
    metrics.record("events.ingest_batch", states.SUCCESS, {"accepted": 1, "rejected": 0}, 0.01)
    batch = {"messages": 3, "outcomes": {"waiting": 1, "completed": 2}, "split": False,
             "republished": 1, "dead_lettered": 1}
    metrics.record("workflows.step", states.SUCCESS, batch, 0.3)  # 0.1 s a step
    metrics.record("actions.run", states.RETRY, None, 0.1)
    metrics.record("bench.noop", states.FAILURE, None, 0.1, fleet_task=False)
    get = registry.get_sample_value
    assert get("fleet_events_ingested_total") == 6
    assert get("fleet_events_duplicate_total") == 2
    assert get("fleet_events_dead_lettered_total") == 1
    assert get("fleet_trigger_evaluations_total") == 7
    assert get("fleet_trigger_matches_total") == 3
    assert get("fleet_workflow_steps_total", {"outcome": "waiting"}) == 1
    assert get("fleet_workflow_steps_total", {"outcome": "completed"}) == 2
    assert get("fleet_workflow_step_seconds_count", {"outcome": "completed"}) == 2
    assert get("fleet_workflow_step_seconds_bucket", {"outcome": "waiting", "le": "0.05"}) == 0
    assert get("fleet_workflow_step_seconds_bucket", {"outcome": "waiting", "le": "0.1"}) == 1
    assert get("fleet_workflow_step_batch_size_count") == 1
    assert get("fleet_workflow_step_batch_size_sum") == 3
    assert get("fleet_task_retries_total", {"task": "workflows.step"}) == 1
    assert get("fleet_task_retries_total", {"task": "actions.run"}) == 1
    assert get("fleet_tasks_dead_lettered_total", {"task": "workflows.step"}) == 1
    assert get("fleet_tasks_dead_lettered_total", {"task": "bench.noop"}) is None


def test_new_users_enter_the_stage_they_were_created_in(engine: Engine) -> None:
    """A signup writes no history row, yet it is an entry into Acquisition."""
    day = dt.date(2020, 4, 20)
    noon = dt.datetime(2020, 4, 20, 12, tzinfo=dt.UTC)
    tag = uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        def user(name: str, stage: str, created: dt.datetime) -> uuid.UUID:
            return conn.execute(text(
                "INSERT INTO users (email, current_lifecycle_stage, created_at) "
                "VALUES (:e, :s, :c) RETURNING id"),
                {"e": f"{name}-{tag}@x.io", "s": stage, "c": created}).scalar_one()

        user("stays", "Acquisition", noon)
        moved = user("moved", "Activation", noon)  # entered Acquisition, then Activation
        user("yesterday", "Acquisition", noon - dt.timedelta(days=1))  # not this day's entry
        conn.execute(text("INSERT INTO user_lifecycle_history (user_id, from_stage, to_stage, "
                          "transitioned_at) VALUES (:u, 'Acquisition', 'Activation', :w)"),
                     {"u": moved, "w": noon + dt.timedelta(hours=1)})
    with session_scope() as session:
        aggregate_day(session, day)
    with engine.connect() as conn:
        entries = {stage: value for stage, value in conn.execute(text(
            "SELECT lifecycle_stage, metric_value FROM metrics_daily WHERE metric_date = :d "
            "AND metric_name = 'stage_entries'"), {"d": day})}
    assert entries == {"Acquisition": 2, "Activation": 1}


def test_metric_days_read_words_and_offsets() -> None:
    from workers.cli.metrics import parse_day

    today = dt.date(2026, 11, 22)
    assert parse_day("today", today) == today
    assert parse_day("yesterday", today) == dt.date(2026, 11, 21)
    assert parse_day("-7d", today) == dt.date(2026, 11, 15)
    assert parse_day("2026-01-02", today) == dt.date(2026, 1, 2)
    with pytest.raises(typer.BadParameter, match="today, yesterday or -Nd"):
        parse_day("last week", today)
