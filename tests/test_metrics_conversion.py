"""Nightly goal conversion and send figures on a small hand-made data set, and how
`fleet metrics show` reports them (treated vs held out, the lift with its 95% CI).

The figures are computed in a transaction that is rolled back (nothing stays), except
for the CLI test, which commits metrics rows of its own and deletes them after.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from tests.helpers import ROOT
from workers.reports.lift import lift
from workers.reports.metrics import aggregate_day, conversions, sends_by_outcome
from workers.sends.config import GoalDef, HoldoutDef, MessagingDef, WorkflowSettings
from workers.sends.holdout import in_holdout
from workers.sends.policy import load

pytestmark = pytest.mark.servers

D = dt.date(2021, 5, 10)  # a day no other test writes figures for
DAY = dt.timedelta(days=1)


def at(day: dt.date, hour: int = 12) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hour), dt.UTC)


@pytest.fixture()
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
        session.rollback()


def _workflow(session: Session, name: str, settings: WorkflowSettings) -> uuid.UUID:
    return session.execute(text(
        "INSERT INTO workflows (name, bpmn_xml, settings) VALUES (:n, '<x/>', CAST(:s AS jsonb)) "
        "RETURNING id"), {"n": name, "s": json.dumps(settings.model_dump(mode="json"))}
    ).scalar_one()


def _execution(session: Session, workflow: uuid.UUID, user: uuid.UUID, started: dt.datetime,
               reached: dt.datetime | None = None) -> uuid.UUID:
    execution = session.execute(text(
        "INSERT INTO workflow_executions (workflow_id, user_id, status, started_at) "
        "VALUES (:w, :u, 'running', :s) RETURNING id"),
        {"w": workflow, "u": user, "s": started}).scalar_one()
    if reached is not None:
        _reach(session, execution, workflow, user, reached)
    return execution


def _reach(session: Session, execution: uuid.UUID, workflow: uuid.UUID, user: uuid.UUID,
           reached: dt.datetime) -> None:
    session.execute(text(
        "INSERT INTO execution_goals (execution_id, workflow_id, user_id, event_id, event_type, "
        "reached_at) VALUES (:x, :w, :u, gen_random_uuid(), 'x.goal', :r)"),
        {"x": execution, "w": workflow, "u": user, "r": reached})


def _send(session: Session, execution: uuid.UUID, workflow: uuid.UUID, user: uuid.UUID,
          channel: str, outcome: str, decided: dt.datetime) -> None:
    session.execute(text(
        "INSERT INTO sends (key, execution_id, workflow_id, user_id, channel, outcome, "
        "decided_at) VALUES (:k, :x, :w, :u, :c, :o, :d)"),
        {"k": uuid.uuid4().hex, "x": execution, "w": workflow, "u": user, "c": channel,
         "o": outcome, "d": decided})


def _figures(session: Session, day: dt.date) -> dict[tuple[str, str], Decimal]:
    """{(metric, dimensions as sorted JSON): value} of the goal and send figures of a day."""
    return {(r.metric_name, json.dumps(r.dimensions, sort_keys=True)): r.metric_value
            for r in session.execute(text(
                "SELECT metric_name, dimensions, metric_value FROM metrics_daily "
                "WHERE metric_date = :d AND lifecycle_stage = 'All' "
                "AND metric_name IN ('goal_executions', 'goal_conversions', 'sends')"),
                {"d": day})}


def _key(metric: str, **dimensions: str) -> tuple[str, str]:
    return metric, json.dumps(dimensions, sort_keys=True)


class Data:
    """Two workflows with a goal (one with a holdout of its own), one without; users chosen
    by the hash so that each group is known: 2 in the program's control group, 1 in the
    first workflow's only, 5 treated everywhere."""

    def __init__(self, session: Session) -> None:
        tag = uuid.uuid4().hex[:8]
        self.program = HoldoutDef(percent=30, salt=f"conv-{tag}")
        session.execute(text(
            "INSERT INTO program_settings (name, value) VALUES ('messaging', CAST(:v AS jsonb)) "
            "ON CONFLICT (workspace_id, name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"),
            {"v": json.dumps(MessagingDef(holdout=self.program).model_dump(mode="json"))})
        goal = GoalDef(event_type="x.goal", within="7d")
        self.names = {k: f"conv-{k}-{tag}" for k in ("a", "b", "c")}
        self.a = _workflow(session, self.names["a"], WorkflowSettings(goal=goal, holdout=25))
        # b's window is longer: a's closed window must stay closed while b's is open.
        self.b = _workflow(session, self.names["b"], WorkflowSettings(
            goal=goal.model_copy(update={"within": "30d"})))
        self.c = _workflow(session, self.names["c"], WorkflowSettings())
        program, own, treated = [], [], []
        for i in range(10_000):
            user = uuid.uuid5(uuid.NAMESPACE_URL, f"conv/{tag}/{i}")
            if in_holdout(self.program.salt, user, self.program.percent):
                program.append(user)
            elif in_holdout(f"{self.program.salt}:{self.names['a']}", user, 25):
                own.append(user)
            else:
                treated.append(user)
            if len(program) >= 2 and len(own) >= 1 and len(treated) >= 5:
                break
        self.program_held, self.own_held, self.treated = program[:2], own[:1], treated[:5]
        for user in (*self.program_held, *self.own_held, *self.treated):
            session.execute(text("INSERT INTO users (id, email, current_lifecycle_stage) "
                                 "VALUES (:i, :e, 'Activation')"),
                            {"i": user, "e": f"{user}@conv.example.com"})
        p1, p2 = self.program_held
        [h] = self.own_held
        t1, t2, t3, t4, t5 = self.treated
        a, b = self.a, self.b
        # Workflow a, started on D: treated 5 (t1, t2 converted), held out 3 (h converted).
        self.runs = {user: _execution(session, a, user, at(D), reached) for user, reached in (
            (t1, at(D, 18)), (t2, at(D + 2 * DAY)), (t3, None), (t4, None), (t5, None),
            (p1, None), (p2, None), (h, at(D + DAY)))}
        _execution(session, a, t1, at(D - DAY), at(D))  # another day's start
        _execution(session, a, t2, at(D + DAY), at(D + DAY, 13))
        # Workflow b has no holdout of its own: h is treated there. Treated 2 (h converted),
        # held out 1.
        for user, reached in ((p1, None), (h, at(D, 20)), (t1, None)):
            _execution(session, b, user, at(D, 9), reached)
        _execution(session, self.c, t1, at(D), None)  # no goal: no goal figures
        x = self.runs[t1]
        for channel, outcome in (("email", "sent"), ("email", "sent"), ("email", "held_out"),
                                 ("sms", "capped")):
            _send(session, x, a, t1, channel, outcome, at(D, 10))
        _send(session, x, a, t1, "email", "sent", at(D + DAY, 10))  # decided the next day


def test_goal_and_send_figures_of_a_day(session: Session) -> None:
    data = Data(session)
    policy = load(session)
    for user in (*data.program_held, *data.own_held, *data.treated):  # the gateway's rule
        assert policy.held_out(policy.workflow(data.a), user) == (user not in data.treated)
        assert policy.held_out(policy.workflow(data.b), user) == (user in data.program_held)
    aggregate_day(session, D)
    a, b, c = (data.names[k] for k in "abc")
    figures = _figures(session, D)
    assert figures == {
        _key("goal_executions", workflow=a, group="treated"): 5,
        _key("goal_conversions", workflow=a, group="treated"): 2,
        _key("goal_executions", workflow=a, group="held_out"): 3,
        _key("goal_conversions", workflow=a, group="held_out"): 1,
        _key("goal_executions", workflow=b, group="treated"): 2,
        _key("goal_conversions", workflow=b, group="treated"): 1,
        _key("goal_executions", workflow=b, group="held_out"): 1,
        _key("goal_conversions", workflow=b, group="held_out"): 0,
        _key("sends", workflow=a, channel="email", outcome="sent"): 2,
        _key("sends", workflow=a, channel="email", outcome="held_out"): 1,
        _key("sends", workflow=a, channel="sms", outcome="capped"): 1,
    }
    assert not [k for k in figures if c in k[1]]
    # Day D refreshed the start days of the week before it: D - 1's cohort is there.
    assert _figures(session, D - DAY)[_key("goal_conversions", workflow=a, group="treated")] == 1
    again = aggregate_day(session, D)
    assert again.written == 0 and again.removed == 0
    assert _figures(session, D) == figures

    [ca, cb] = [r for r in conversions(session, D) if r.workflow in (a, b)]
    assert (ca.workflow, ca.treated, ca.treated_converted, ca.held_out,
            ca.held_out_converted) == (a, 5, 2, 3, 1)
    assert ca.lift == lift(5, 2, 3, 1) and cb.held_out_converted == 0
    assert sends_by_outcome(session, D)[(a, "email")] == {
        "sent": 2, "suppressed": 0, "capped": 0, "deferred": 0, "held_out": 1,
        "dropped": 0}


def test_late_conversions_update_their_start_day_while_its_window_is_open(
        session: Session) -> None:
    data = Data(session)
    a = data.names["a"]
    treated = _key("goal_conversions", workflow=a, group="treated")
    aggregate_day(session, D)
    assert _figures(session, D)[treated] == 2
    t3, t4 = data.treated[2], data.treated[3]
    _reach(session, data.runs[t3], data.a, t3, at(D + 3 * DAY))
    aggregate_day(session, D + 3 * DAY)  # the nightly run of a later day refreshes D
    assert _figures(session, D)[treated] == 3
    assert _figures(session, D + DAY)[_key("goal_executions", workflow=a, group="treated")] == 1
    _reach(session, data.runs[t4], data.a, t4, at(D + 6 * DAY))
    aggregate_day(session, D + 8 * DAY)  # a's 7-day window of D closed (b's is open): left alone
    assert _figures(session, D)[treated] == 3
    aggregate_day(session, D)  # a backfill of D brings it up to date
    assert _figures(session, D)[treated] == 4


# ------------------------------------------------------------------ fleet metrics show


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli.main", *args], cwd=ROOT,
                          env=dict(os.environ, COLUMNS="200"), capture_output=True, text=True,
                          timeout=120)


@pytest.fixture()
def shown_figures(engine: Engine) -> Iterator[str]:
    """Yesterday's figures of a workflow: 50 of 200 treated converted, 15 of 100 held out."""
    workflow = f"cli-lift-{uuid.uuid4().hex[:8]}"
    rows: list[dict[str, Any]] = [
        {"m": metric, "v": value, "d": json.dumps(dimensions)}
        for metric, value, dimensions in (
            ("goal_executions", 200, {"workflow": workflow, "group": "treated"}),
            ("goal_conversions", 50, {"workflow": workflow, "group": "treated"}),
            ("goal_executions", 100, {"workflow": workflow, "group": "held_out"}),
            ("goal_conversions", 15, {"workflow": workflow, "group": "held_out"}),
            ("sends", 7, {"workflow": workflow, "channel": "email", "outcome": "sent"}),
            ("sends", 2, {"workflow": workflow, "channel": "email", "outcome": "capped"}))]
    yesterday = dt.datetime.now(dt.UTC).date() - DAY
    with engine.begin() as conn:
        for row in rows:
            conn.execute(text(
                "INSERT INTO metrics_daily (metric_date, lifecycle_stage, metric_name, "
                "metric_value, dimensions) VALUES (:day, 'All', :m, :v, CAST(:d AS jsonb))"),
                {"day": yesterday, **row})
    try:
        yield workflow
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM metrics_daily WHERE dimensions->>'workflow' = :w"),
                         {"w": workflow})


def test_metrics_show_reports_the_lift_with_its_interval(shown_figures: str) -> None:
    expected = lift(200, 50, 100, 15)
    assert expected.low is not None and expected.high is not None
    assert expected.difference == pytest.approx(0.1) and expected.low < 0.1 < expected.high

    human = _fleet("metrics", "show", "--days", "3")
    assert human.returncode == 0, human.stderr
    [line] = [li for li in human.stdout.splitlines() if shown_figures in li and "25.0%" in li]
    interval = f"[{expected.low * 100:+.1f}, {expected.high * 100:+.1f}]"
    assert "15.0%" in line and "+10.0" in line and interval in line
    assert f"{expected.relative:+.0%}" in line  # +67%: the rate two thirds higher
    [sends] = [li for li in human.stdout.splitlines() if shown_figures in li and "email" in li]
    cells = [cell.strip() for cell in sends.strip("│┃ ").split("│")]
    assert cells == [shown_figures, "email", "7", "0", "2", "0", "0", "0"]  # sent ... dropped

    shown = json.loads(_fleet("metrics", "show", "--days", "3", "--json").stdout)
    [c] = [c for c in shown["conversions"] if c["workflow"] == shown_figures]
    assert c["treated"] == {"executions": 200, "converted": 50, "rate": 0.25}
    assert c["held_out"] == {"executions": 100, "converted": 15, "rate": 0.15}
    assert c["lift"]["low"] == pytest.approx(expected.low)
    assert c["lift"]["high"] == pytest.approx(expected.high)
    assert c["lift"]["relative"] == pytest.approx(expected.relative)
    [s] = [s for s in shown["sends"] if s["workflow"] == shown_figures]
    assert (s["channel"], s["sent"], s["capped"], s["held_out"]) == ("email", 7, 2, 0)
    assert isinstance(shown["days"], list)
