"""Faults injected into whole scratch fleets (`fleet chaos`), and the soak, on a small scale.

Each scenario starts its own fleet (a worker per busy queue, maintenance, a beat) on
a database and broker prefix of its own, streams events while the fault is
injected, waits for the fleet to settle and checks every invariant of
`workers.tools.chaos.invariants`. The last test proves the checker can fail.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

from db.migrate import upgrade
from workers.tools.chaos import scenarios
from workers.tools.chaos.invariants import check
from workers.tools.chaos.program import SentLog
from workers.tools.chaos.receiver import webhook_server

# Above each scenario's own deadline (scenarios.finish: TIMEOUT, plus the outage, plus
# per journey), so a fleet that does not settle fails with its report, not a bare timeout.
pytestmark = [pytest.mark.servers, pytest.mark.chaos, pytest.mark.timeout(600)]

SMALL = {"events": 600, "rate": 60.0, "users": 100}


def _assert_clean(result: scenarios.ChaosResult) -> None:
    inv = result.invariants
    assert result.ok, f"{result.scenario}: {inv.violations} ({result.as_dict()})"
    assert inv.sent >= SMALL["events"] and inv.lost == 0 and inv.duplicated == 0
    assert inv.accepted + inv.rejected == inv.sent and inv.rejected > 0
    assert inv.executions.get("completed", 0) >= 50


def test_workers_killed_in_a_loop_lose_and_double_nothing() -> None:
    result = scenarios.kill_workers(**SMALL, every=2.0)
    _assert_clean(result)
    assert any(k.endswith("main") for k in result.injected)
    assert any(k.endswith("child") for k in result.injected)
    # Every journey called its webhook once, though workers died mid-call.
    assert result.invariants.webhook_effects == result.invariants.executions["completed"]


def test_broker_restarts_lose_nothing_and_run_no_task_twice_at_once() -> None:
    result = scenarios.redis_restart(**SMALL, restarts=2)
    _assert_clean(result)
    assert len(result.injected) == 2
    assert result.figures["publish_failures"] == 0  # producers rode out the restarts


def test_connections_terminated_every_50ms_lose_and_double_nothing() -> None:
    result = scenarios.pg_terminate(**SMALL)
    _assert_clean(result)
    assert "backends terminated" in result.injected[0]
    assert int(result.injected[0].split()[0]) > 0


def test_postgres_stopped_for_60s_loses_nothing() -> None:
    """The server itself stopped (connections refused), single and batch producers."""
    result = scenarios.pg_stop(events=900, rate=10.0, users=100, down=60.0)
    _assert_clean(result)
    assert "PostgreSQL stopped" in result.injected[0]
    published_meanwhile = int(result.injected[0].split("; ")[1].split()[0])
    assert published_meanwhile > 300  # the outage really met traffic


def test_postgres_out_of_connection_slots_loses_nothing() -> None:
    result = scenarios.pg_slots(**SMALL, hold=20.0)
    _assert_clean(result)
    assert "connections held" in result.injected[0]


def test_a_full_redis_keeps_workers_up_and_loses_nothing() -> None:
    result = scenarios.redis_full(**SMALL, hold=10.0)
    _assert_clean(result)
    assert result.figures["direct_publishes_refused"] > 0  # PublishError, not another error


def test_poison_messages_of_every_kind_end_in_one_dead_letter_each() -> None:
    result = scenarios.poison(**SMALL)
    _assert_clean(result)
    assert len([line for line in result.injected if line.endswith("1 dead letter(s)")]) == \
        len(scenarios.POISON)


def test_retention_drops_a_partition_while_events_flow() -> None:
    result = scenarios.retention(**SMALL, old_rows=2000)
    _assert_clean(result)
    assert result.figures["old_rows_left"] == 0 and result.figures["archived"]


def test_a_new_version_leaves_1000_waiting_executions_on_the_old_one() -> None:
    result = scenarios.version_deploy(executions=1000, wait_seconds=45, newer=50)
    assert result.ok, result.invariants.violations
    assert result.figures["old_ran"] == ["('1.0.0', 'v1')"]
    assert result.figures["new_ran"] == ["('2.0.0', 'v2')"]
    assert result.invariants.executions == {"completed": 1050}


def test_a_short_soak_reports_its_figures_and_keeps_the_invariants() -> None:
    from workers.tools.bench.soak import run

    result = run(minutes=0.5, rate=40, sample_seconds=5, calibration_events=400)
    assert result.invariants.ok, result.invariants.violations
    assert len(result.samples) >= 5
    # The calibration waits for its journeys' 6 s timers: a small burst measures little.
    assert result.measured_max_per_s > 5 and result.rate_per_s == 40
    assert all(s.rss_mb.get("worker-events", 0) > 50 for s in result.samples)
    assert result.sent >= 400 + 0.5 * 60 * 40 - 25
    assert result.p99_latency_ms_worst is not None


# --------------------------------------------------------------------------- the checker


@pytest.fixture()
def migrated(fresh_database: str) -> Iterator[Engine]:
    upgrade(fresh_database)
    engine = create_engine(fresh_database)
    yield engine
    engine.dispose()


def test_the_invariant_checker_reports_each_kind_of_violation(migrated: Engine) -> None:
    once, twice, lost, wrongly_rejected, bad = (str(uuid.uuid4()) for _ in range(5))
    with migrated.begin() as conn:
        user = conn.execute(text("INSERT INTO users (email, current_lifecycle_stage) "
                                 "VALUES ('c@example.com', 'Acquisition') RETURNING id")).scalar_one()
        for event_id in (once, twice, twice):
            conn.execute(text("INSERT INTO lifecycle_events (event_type, user_id, event_data, "
                              "event_id) VALUES ('t.x', :u, '{}', :e)"), {"u": user, "e": event_id})
        for event_id in (wrongly_rejected, bad):
            conn.execute(text("INSERT INTO dead_letters (source, reason, raw_payload, event_id) "
                              "VALUES ('test', 'r', '\\x00', :e)"), {"e": event_id})
        workflow = conn.execute(text("INSERT INTO workflows (name, bpmn_xml) VALUES ('w', '<x/>') "
                                     "RETURNING id")).scalar_one()
        execution = conn.execute(text(
            "INSERT INTO workflow_executions (workflow_id, user_id, status) "
            "VALUES (:w, :u, 'running') RETURNING id"), {"w": workflow, "u": user}).scalar_one()
        for seq in (1, 3):
            conn.execute(text("INSERT INTO execution_steps (execution_id, seq, node_id, node_type, "
                              "outcome) VALUES (:e, :s, 'n', 'Task', 'completed')"),
                         {"e": execution, "s": seq})
        # A message the gateway held out, and a 'sent' decision whose message is missing.
        for key, outcome in (("k-held", "held_out"), ("k-lost", "sent")):
            conn.execute(text("INSERT INTO sends (key, execution_id, workflow_id, user_id, channel, "
                              "outcome) VALUES (:k, :e, :w, :u, 'email', :o)"),
                         {"k": key, "e": execution, "w": workflow, "u": user, "o": outcome})
        conn.execute(text("INSERT INTO message_log (idempotency_key, execution_id, user_id, "
                          "channel, recipient) VALUES ('k-held', :e, :u, 'email', 'c@example.com')"),
                     {"e": execution, "u": user})
    sent = SentLog(good=[once, twice, lost, wrongly_rejected], bad=[bad])
    with webhook_server() as receiver:
        report = check(migrated, sent, receiver)
    assert (report.sent, report.accepted, report.rejected, report.lost, report.duplicated) == \
        (5, 2, 1, 2, 1)
    text_of = " | ".join(report.violations)
    for expected in ("neither in lifecycle_events", "more than once", "good events were "
                     "dead-lettered", "wait for no timer", "gaps or repeats",
                     "1 messages in message_log have no 'sent' decision",
                     "1 sends decided 'sent' never reached message_log"):
        assert expected in text_of, text_of
