"""Goals reached, recorded by ingest in its transaction: once per execution, inside the window.

Ingest is called directly on a real session with a fixed clock (as in
test_ingest_service.py); each test's transaction is rolled back afterwards.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from workers.events import exits
from workers.events.ingest import IngestResult, ingest
from workers.rules.triggers import TriggerCache
from workers.sends.config import GoalDef, WorkflowSettings

pytestmark = pytest.mark.servers

NOW = dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture()
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
        session.rollback()


def _ingest(session: Session, raws: list[Any], triggers: TriggerCache | None = None,
            now: dt.datetime = NOW) -> IngestResult:
    # Definitions re-read on every call by default: the tests write them in the same transaction.
    return ingest(session, raws, source="test",
                  triggers=triggers or TriggerCache(refresh_seconds=0), now=now)


def _etype() -> str:
    return f"test.g{uuid.uuid4().hex[:12]}"


def _event(etype: str, user: str, occurred_at: dt.datetime = NOW, **fields: Any) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "event_type": etype, "user": user,
            "occurred_at": occurred_at.isoformat(), **fields}


def _user(session: Session, attributes: dict[str, Any] | None = None) -> tuple[uuid.UUID, str]:
    email = f"{uuid.uuid4().hex[:10]}@example.com"
    user_id = session.execute(text(
        "INSERT INTO users (email, current_lifecycle_stage, attributes) "
        "VALUES (:e, 'Activation', CAST(:a AS jsonb)) RETURNING id"),
        {"e": email, "a": json.dumps(attributes or {})}).scalar_one()
    return user_id, email


def _workflow(session: Session, goal: GoalDef | None) -> uuid.UUID:
    """A workflow with this goal, stored as `fleet apply` stores it."""
    settings = WorkflowSettings(goal=goal).model_dump(mode="json")
    return session.execute(text(
        "INSERT INTO workflows (name, bpmn_xml, settings) VALUES (:n, '<x/>', CAST(:s AS jsonb)) "
        "RETURNING id"), {"n": f"wf-goal-{uuid.uuid4().hex[:8]}",
                          "s": json.dumps(settings)}).scalar_one()


def _execution(session: Session, workflow: uuid.UUID, user: uuid.UUID, started: dt.datetime,
               status: str = "running") -> uuid.UUID:
    ended = started + dt.timedelta(hours=1) if status in ("completed", "failed") else None
    return session.execute(text(
        "INSERT INTO workflow_executions (workflow_id, user_id, status, started_at, completed_at) "
        "VALUES (:w, :u, :s, :st, :end) RETURNING id"),
        {"w": workflow, "u": user, "s": status, "st": started, "end": ended}).scalar_one()


def _goals(session: Session, **where: Any) -> list[Any]:
    clause = " AND ".join(f"{column} = :{column}" for column in where) or "true"
    return list(session.execute(text(f"SELECT * FROM execution_goals WHERE {clause}"),
                                where).mappings())


def test_a_goal_is_recorded_while_running_and_after_the_execution_ended(
        session: Session) -> None:
    etype = _etype()
    workflow = _workflow(session, GoalDef(event_type=etype, within="14d"))
    user, email = _user(session)
    running = _execution(session, workflow, user, NOW - 3 * DAY)
    ended = _execution(session, workflow, user, NOW - 10 * DAY, status="completed")
    goal_event = _event(etype, email, occurred_at=NOW - DAY)
    _ingest(session, [goal_event])
    rows = {r["execution_id"]: r for r in _goals(session, workflow_id=workflow)}
    assert rows.keys() == {running, ended}  # two executions of one user: both reached it
    for row in rows.values():
        assert (row["user_id"], str(row["event_id"]), row["event_type"], row["reached_at"]) == (
            user, goal_event["event_id"], etype, NOW - DAY)


def test_only_executions_whose_window_holds_the_event_reach_it(session: Session) -> None:
    etype = _etype()
    workflow = _workflow(session, GoalDef(event_type=etype, within="7d"))
    other_workflow = _workflow(session, None)
    user, email = _user(session)
    too_old = _execution(session, workflow, user, NOW - 8 * DAY)  # window closed a day ago
    later = _execution(session, workflow, user, NOW + DAY)  # started after the event
    just_in = _execution(session, workflow, user, NOW - 7 * DAY)  # the window's last instant
    no_goal = _execution(session, other_workflow, user, NOW - DAY)
    _ingest(session, [_event(etype, email)])
    recorded = {r["execution_id"] for r in _goals(session, user_id=user)}
    assert recorded == {just_in}
    assert not recorded & {too_old, later, no_goal}


def test_the_goal_condition_must_hold_for_the_event_and_the_user(session: Session) -> None:
    etype, segment = _etype(), f"big-{uuid.uuid4().hex[:8]}"
    session.execute(text(
        "INSERT INTO user_segments (name, conditions, ttl_seconds) VALUES (:n, CAST(:c AS jsonb), "
        "600)"), {"n": segment, "c": json.dumps({"field": "user.attributes.seats", "op": "gte",
                                                   "value": 10})})
    workflow = _workflow(session, GoalDef(event_type=etype, conditions={"all": [
        {"field": "event.data.plan", "op": "eq", "value": "pro"}, {"in_segment": segment}]}))
    big, big_email = _user(session, {"seats": 12})
    small, small_email = _user(session, {"seats": 2})
    big_run, small_run = (_execution(session, workflow, u, NOW - DAY) for u in (big, small))
    _ingest(session, [_event(etype, big_email, data={"plan": "free"}),  # the event fails
                      _event(etype, small_email, data={"plan": "pro"})])  # the user fails
    assert _goals(session, workflow_id=workflow) == []
    reached = _event(etype, big_email, data={"plan": "pro"})
    _ingest(session, [reached])
    [row] = _goals(session, workflow_id=workflow)
    assert (row["execution_id"], str(row["event_id"])) == (big_run, reached["event_id"])
    assert small_run != big_run


def test_a_goal_is_recorded_once_per_execution(session: Session) -> None:
    etype = _etype()
    workflow = _workflow(session, GoalDef(event_type=etype))
    user, email = _user(session)
    execution = _execution(session, workflow, user, NOW - DAY)
    first = _event(etype, email, occurred_at=NOW - dt.timedelta(hours=2))
    # Two goal events for one execution in one message: the earlier one is recorded.
    _ingest(session, [_event(etype, email), first])
    _ingest(session, [first])  # redelivered: a duplicate, nothing changes
    _ingest(session, [_event(etype, email, occurred_at=NOW + dt.timedelta(hours=1))])  # later
    [row] = _goals(session, execution_id=execution)
    assert str(row["event_id"]) == first["event_id"]
    assert row["reached_at"] == NOW - dt.timedelta(hours=2)


def test_goals_cost_no_query_unless_a_goal_has_the_batch_event_type(
        engine: Engine, session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch benchmark's path: with goals defined for other types, no extra statement;
    with a goal of the batch's type, one statement for the whole batch."""
    # The exit rules' cache, loaded once: its periodic fingerprint check is not a goal's cost.
    monkeypatch.setattr(exits, "_PROCESS_EXITS", exits.ExitCache(refresh_seconds=3600))
    exits.process_exits().get(session)
    plain, goal_type = _etype(), _etype()
    emails = [_user(session)[1] for _ in range(5)]
    without_goals = TriggerCache(refresh_seconds=3600)
    without_goals.get(session)  # loaded before any goal exists for these types
    workflow = _workflow(session, GoalDef(event_type=goal_type))
    with_goals = TriggerCache(refresh_seconds=3600)
    assert with_goals.get(session).goals_for(goal_type)
    for email in emails:
        _execution(session, workflow, session.execute(text(
            "SELECT id FROM users WHERE email = :e"), {"e": email}).scalar_one(), NOW - DAY)

    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    def run(etype: str, triggers: TriggerCache) -> list[str]:
        statements.clear()
        event.listen(engine, "before_cursor_execute", count)
        try:
            _ingest(session, [_event(etype, e) for e in emails], triggers)
        finally:
            event.remove(engine, "before_cursor_execute", count)
        return list(statements)

    baseline = run(plain, without_goals)
    others = run(plain, with_goals)
    assert len(others) == len(baseline)
    assert not [s for s in others if "execution_goals" in s]
    reached = run(goal_type, with_goals)
    assert len([s for s in reached if "execution_goals" in s]) == 1
    assert len(reached) == len(baseline) + 1
    assert len(_goals(session, workflow_id=workflow)) == 5


def test_a_goal_change_reaches_the_cache_without_a_restart(session: Session) -> None:
    etype = _etype()
    cache = TriggerCache(refresh_seconds=0)
    workflow = _workflow(session, None)
    assert not cache.get(session).goals_for(etype)
    settings = WorkflowSettings(goal=GoalDef(event_type=etype, within="2h"))
    session.execute(text("UPDATE workflows SET settings = CAST(:s AS jsonb) WHERE id = :w"),
                    {"s": json.dumps(settings.model_dump(mode="json")), "w": workflow})
    [goal] = cache.get(session).goals_for(etype)
    assert (goal.workflow_id, goal.window) == (workflow, dt.timedelta(hours=2))


def test_the_window_is_on_the_fleets_clock_not_the_producers(session: Session) -> None:
    """An event stamped before the start by a producer's late clock still converts."""
    etype = _etype()
    workflow = _workflow(session, GoalDef(event_type=etype, within="1h"))
    user, email = _user(session)
    execution = _execution(session, workflow, user, NOW - dt.timedelta(minutes=1))
    late_clock = _event(etype, email, occurred_at=NOW - dt.timedelta(minutes=5))
    _ingest(session, [late_clock], now=NOW)
    [row] = _goals(session, workflow_id=workflow)
    assert (row["execution_id"], row["reached_at"]) == (execution, NOW - dt.timedelta(minutes=5))
    before = _execution(session, workflow, user, NOW + dt.timedelta(minutes=1))
    _ingest(session, [_event(etype, email)], now=NOW)  # recorded before that one started
    assert not _goals(session, execution_id=before)
