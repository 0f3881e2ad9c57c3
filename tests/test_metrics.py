"""Nightly metrics on generated data: the figures, and reruns that change nothing."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text

from db.session import session_scope
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
