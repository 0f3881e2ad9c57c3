"""Segment entry and exit triggers on real PostgreSQL: every cause, once each, and the lock.

A user enters a watched segment when a membership row is inserted and exits when it
is deleted, whoever writes it: identify, the refresh sweep, a cold cache's first
evaluation, a static add or remove, a stage change. Each writer puts one
`segment.entered` / `segment.exited` event in the outbox in its own transaction;
ingesting those events starts the triggers' workflows under the usual re-entry
rules. The interleaving tests hold one transaction open and run the other side in
a thread: a refresh meeting an identify in flight. Run without the write lock, the
refresh records a spurious entry: the lock is what the test proves.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.session import session_scope
from tests.workflow_helpers import deploy, new_user
from workers import definitions
from workers.events.ingest import IngestResult, ingest
from workers.events.outbox import add_segment_transitions
from workers.operators.context import OperatorContext
from workers.operators.users import set_lifecycle_stage
from workers.rules import membership as membership_module
from workers.rules import segments as segments_module
from workers.rules.segments import refresh_segment, set_static_members
from workers.rules.triggers import TriggerCache

pytestmark = pytest.mark.servers

PLAN_PRO = {"field": "user.attributes.plan", "op": "eq", "value": "pro"}


@pytest.fixture(autouse=True)
def _disable_triggers_afterwards() -> Iterator[None]:
    """A test's triggers are disabled after it: later tests' users match its segments too."""
    with session_scope() as session:
        before = session.execute(text("SELECT max(created_at) FROM triggers")).scalar_one()
    yield
    with session_scope() as session:
        session.execute(text("UPDATE triggers SET enabled = false WHERE created_at > "
                             "coalesce(CAST(:t AS timestamptz), '-infinity')"), {"t": before})


@pytest.fixture()
def cache() -> TriggerCache:
    return TriggerCache(refresh_seconds=0)


@pytest.fixture()
def workflow() -> str:
    return deploy("minimal.bpmn")


def _segment(conditions: dict[str, Any], kind: str = "dynamic") -> uuid.UUID:
    with session_scope() as session:
        return session.execute(text(
            "INSERT INTO user_segments (name, conditions, kind) VALUES (:n, CAST(:c AS jsonb), :k) "
            "RETURNING id"), {"n": f"seg-{uuid.uuid4().hex[:8]}", "c": json.dumps(conditions),
                               "k": kind}).scalar_one()


def _watch(segment_id: uuid.UUID, event_type: str, workflow: str | None = None,
           **rules: Any) -> uuid.UUID:
    """An enabled trigger on `event_type` (segment.entered/exited) of the segment."""
    with session_scope() as session:
        return session.execute(text(
            "INSERT INTO triggers (name, event_type, conditions, workflow_id, segment_id, reentry, "
            "max_runs_per_user) SELECT :n, :t, '{}', (SELECT id FROM workflows WHERE name = :w), "
            ":s, :r, :m RETURNING id"),
            {"n": f"trig-{uuid.uuid4().hex[:8]}", "t": event_type, "w": workflow,
             "s": segment_id, "r": rules.get("reentry", "no_concurrent"),
             "m": rules.get("max_runs_per_user")}).scalar_one()


def _outbox(user_id: uuid.UUID) -> list[dict[str, Any]]:
    """The user's segment events in the outbox, oldest first."""
    with session_scope() as session:
        return [r.payload for r in session.execute(text(
            "SELECT payload FROM event_outbox WHERE partition_key = :u "
            "AND payload->>'event_type' LIKE 'segment.%' ORDER BY created_at, id"),
            {"u": str(user_id)})]


def _kinds(user_id: uuid.UUID, *segments: uuid.UUID) -> list[tuple[str, uuid.UUID]]:
    """The user's transitions of these segments (earlier tests' segments may match too)."""
    found = [(p["event_type"], uuid.UUID(p["data"]["segment_id"])) for p in _outbox(user_id)]
    return [k for k in found if k[1] in segments]


def _identify(cache: TriggerCache, user_id: uuid.UUID, traits: dict[str, Any],
              session: Session | None = None) -> IngestResult:
    event = {"event_id": str(uuid.uuid4()), "event_type": "user.identify", "user": str(user_id),
             "data": traits}
    if session is not None:
        return ingest(session, [event], source="test", triggers=cache)
    with session_scope() as own:
        return ingest(own, [event], source="test", triggers=cache)


def _member(user_id: uuid.UUID, segment_id: uuid.UUID) -> bool:
    with session_scope() as session:
        return session.execute(text(
            "SELECT EXISTS (SELECT 1 FROM user_segment_memberships WHERE user_id = :u "
            "AND segment_id = :s)"), {"u": user_id, "s": segment_id}).scalar_one()


def _refresh(segment_id: uuid.UUID, session: Session | None = None) -> int:
    """What tasks.segments.refresh does in its transaction; returns the transitions."""
    def run(s: Session) -> int:
        result = refresh_segment(s, segment_id)
        if result is None:  # another refresh holds the segment (SKIP LOCKED)
            return 0
        return add_segment_transitions(s, result.transitions)
    if session is not None:
        return run(session)
    with session_scope() as own:
        return run(own)


def _executions(trigger_id: uuid.UUID) -> int:
    with session_scope() as session:
        return session.execute(text("SELECT count(*) FROM workflow_executions "
                                    "WHERE trigger_id = :t"), {"t": trigger_id}).scalar_one()


# --------------------------------------------------------------------------- each cause


def test_identify_into_and_out_of_a_watched_segment_writes_one_event_each(
        cache: TriggerCache) -> None:
    segment = _segment(PLAN_PRO)
    _watch(segment, "segment.entered")
    _watch(segment, "segment.exited")
    user = new_user({"plan": "free"})
    _identify(cache, user, {"plan": "pro"})
    _identify(cache, user, {"plan": "pro", "seats": 3})  # still a member: no transition
    _identify(cache, user, {"plan": "free"})
    assert _kinds(user, segment) == [("segment.entered", segment), ("segment.exited", segment)]
    payload = next(p for p in _outbox(user) if p["data"]["segment_id"] == str(segment))
    assert payload["user"] == str(user)
    assert payload["data"]["segment"].startswith("seg-")


def test_only_the_watched_kind_is_written_and_unwatched_segments_write_nothing(
        cache: TriggerCache) -> None:
    entered_only, unwatched = _segment(PLAN_PRO), _segment(PLAN_PRO)
    _watch(entered_only, "segment.entered")
    user = new_user({"plan": "free"})
    _identify(cache, user, {"plan": "pro"})
    _identify(cache, user, {"plan": "free"})
    assert _kinds(user, entered_only, unwatched) == [("segment.entered", entered_only)]
    assert not _member(user, unwatched)  # evaluated (and left) all the same


def test_the_refresh_sweep_reports_who_entered_and_who_left() -> None:
    segment = _segment(PLAN_PRO)
    _watch(segment, "segment.entered")
    _watch(segment, "segment.exited")
    stays, leaves, joins = new_user({"plan": "pro"}), new_user({"plan": "pro"}), new_user({})
    assert _refresh(segment) >= 2
    assert _kinds(stays, segment) == _kinds(leaves, segment) == [("segment.entered", segment)]
    with session_scope() as session:  # attributes changed behind the fleet's back
        session.execute(text("UPDATE users SET attributes = CAST(:a AS jsonb) WHERE id = :u"),
                        {"a": json.dumps({"plan": "free"}), "u": leaves})
        session.execute(text("UPDATE users SET attributes = CAST(:a AS jsonb) WHERE id = :u"),
                        {"a": json.dumps({"plan": "pro"}), "u": joins})
    _refresh(segment)
    assert _kinds(stays, segment) == [("segment.entered", segment)]
    assert _kinds(leaves, segment) == [("segment.entered", segment), ("segment.exited", segment)]
    assert _kinds(joins, segment) == [("segment.entered", segment)]


def test_a_refresh_of_an_unwatched_segment_counts_without_writing_events() -> None:
    segment = _segment(PLAN_PRO)
    user = new_user({"plan": "pro"})
    with session_scope() as session:
        result = refresh_segment(session, segment)
    assert result is not None and result.members >= 1 and result.transitions == []
    assert _outbox(user) == []


def test_a_cold_cache_evaluated_for_a_trigger_condition_is_an_entry(cache: TriggerCache,
                                                                     workflow: str) -> None:
    segment = _segment(PLAN_PRO)
    _watch(segment, "segment.entered")
    with session_scope() as session:
        name = session.execute(text("SELECT name FROM user_segments WHERE id = :s"),
                               {"s": segment}).scalar_one()
        event_type = f"test.cold{uuid.uuid4().hex[:8]}"
        session.execute(text(
            "INSERT INTO triggers (name, event_type, conditions, workflow_id) VALUES (:n, :t, "
            "CAST(:c AS jsonb), (SELECT id FROM workflows WHERE name = :w))"),
            {"n": f"cold-{uuid.uuid4().hex[:6]}", "t": event_type, "w": workflow,
             "c": json.dumps({"in_segment": name})})
    user = new_user({"plan": "pro"})  # never evaluated
    with session_scope() as session:
        result = ingest(session, [{"event_id": str(uuid.uuid4()), "event_type": event_type,
                                   "user": str(user), "data": {}}], source="test", triggers=cache)
    assert result.matched == 1
    assert _kinds(user, segment) == [("segment.entered", segment)]


def test_static_adds_and_removes_are_entries_and_exits() -> None:
    segment = _segment({}, kind="static")
    _watch(segment, "segment.entered")
    _watch(segment, "segment.exited")
    user = new_user()
    for add in (True, True, False, False):  # the repeats change nothing
        with session_scope() as session:
            change = set_static_members(session, segment, [user], add=add)
            add_segment_transitions(session, change.transitions)
    assert _kinds(user, segment) == [("segment.entered", segment), ("segment.exited", segment)]


def test_a_stage_change_re_evaluates_segments_on_the_stage(workflow: str) -> None:
    segment = _segment({"field": "user.stage", "op": "eq", "value": "Retention"})
    _watch(segment, "segment.entered")
    user = new_user()
    with session_scope() as session:
        execution_id, workflow_id = session.execute(text(
            "INSERT INTO workflow_executions (workflow_id, workflow_version, user_id, status) "
            "SELECT id, version, :u, 'running' FROM workflows WHERE name = :w RETURNING id, "
            "workflow_id"), {"u": user, "w": workflow}).one()
        ctx = OperatorContext(session=session, execution_id=execution_id, workflow_id=workflow_id,
                              user_id=user, node_id="stage", key=f"k-{uuid.uuid4()}",
                              now=dt.datetime.now(dt.UTC))
        set_lifecycle_stage(ctx, {"stage": "Retention"})
    assert _kinds(user, segment) == [("segment.entered", segment)]
    assert _member(user, segment)


# --------------------------------------------------------------------------- starting journeys


def _deliver(cache: TriggerCache, user_id: uuid.UUID) -> IngestResult:
    """Ingest the user's outbox events, as the relay's message would."""
    with session_scope() as session:
        return ingest(session, _outbox(user_id), source="outbox", triggers=cache)


def test_each_entry_starts_one_execution_and_a_redelivery_starts_none(
        cache: TriggerCache, workflow: str) -> None:
    segment, other = _segment(PLAN_PRO), _segment(PLAN_PRO)
    trigger = _watch(segment, "segment.entered", workflow, reentry="allow")
    _watch(other, "segment.entered", workflow)
    user = new_user({"plan": "free"})
    _identify(cache, user, {"plan": "pro"})
    _identify(cache, user, {"plan": "free"})
    _identify(cache, user, {"plan": "pro"})
    first = _deliver(cache, user)
    assert _executions(trigger) == 2  # entered twice, reentry allow
    # Each event is evaluated by the triggers of its own segment only.
    assert first.evaluated == 4 and first.matched == 4
    again = _deliver(cache, user)
    assert again.duplicates == 4 and _executions(trigger) == 2


def test_re_entry_rules_apply_to_segment_triggers(cache: TriggerCache, workflow: str) -> None:
    segment = _segment(PLAN_PRO)
    trigger = _watch(segment, "segment.entered", workflow, reentry="allow", max_runs_per_user=1)
    user = new_user({"plan": "free"})
    for plan in ("pro", "free", "pro"):
        _identify(cache, user, {"plan": plan})
    _deliver(cache, user)
    assert _executions(trigger) == 1


# --------------------------------------------------------------------------- concurrency


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            box["value"] = fn()
        except BaseException as exc:  # pragma: no cover - reported by the assertion below
            box["error"] = exc
        box["seconds"] = time.monotonic() - started
    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


@pytest.fixture()
def no_write_lock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The negative control: the writers without the segment write lock."""
    def none(*_: Any, **__: Any) -> None:
        return None
    monkeypatch.setattr(segments_module, "lock_for_writes", none)
    monkeypatch.setattr(membership_module, "lock_for_writes", none)
    yield


def _refresh_meets_identify_in_flight(cache: TriggerCache) -> tuple[uuid.UUID, uuid.UUID, float]:
    """An identify takes a member out and holds its transaction open; a refresh starts.

    Returns (user, segment, seconds the refresh took).
    """
    segment = _segment(PLAN_PRO)
    _watch(segment, "segment.entered")
    _watch(segment, "segment.exited")
    user = new_user({"plan": "pro"})
    _refresh(segment)  # a member, entered once
    with session_scope() as identify:
        _identify(cache, user, {"plan": "free"}, session=identify)  # exit, uncommitted
        thread, box = _in_thread(lambda: _refresh(segment))
        time.sleep(1.5)
        held = thread.is_alive()
        identify.commit()
    thread.join(30)
    assert "error" not in box, box.get("error")
    assert held or box["seconds"] < 1.5
    return user, segment, box["seconds"]


def test_a_refresh_waits_for_an_identify_in_flight_and_records_no_false_entry(
        cache: TriggerCache) -> None:
    user, segment, seconds = _refresh_meets_identify_in_flight(cache)
    assert seconds >= 1.4  # it waited for the identify's commit
    assert _kinds(user, segment) == [("segment.entered", segment), ("segment.exited", segment)]
    assert not _member(user, segment)


def test_without_the_write_lock_the_refresh_re_enters_a_user_who_left(
        cache: TriggerCache, no_write_lock: None) -> None:
    user, segment, _ = _refresh_meets_identify_in_flight(cache)
    # The refresh's snapshot still saw the old plan: a false entry, a wrong member row.
    assert _kinds(user, segment) == [("segment.entered", segment), ("segment.exited", segment),
                            ("segment.entered", segment)]
    assert _member(user, segment)


def test_an_identify_waits_for_a_refresh_in_flight_and_enters_once(cache: TriggerCache) -> None:
    segment = _segment(PLAN_PRO)
    _watch(segment, "segment.entered")
    user = new_user({"plan": "free"})
    with session_scope() as refresh:
        _refresh(segment, session=refresh)
        thread, box = _in_thread(lambda: _identify(cache, user, {"plan": "pro"}))
        time.sleep(1.5)
        held = thread.is_alive()
        refresh.commit()
    thread.join(30)
    assert "error" not in box, box.get("error")
    assert held and box["seconds"] >= 1.4
    assert _kinds(user, segment) == [("segment.entered", segment)]


def test_concurrent_identifies_and_refreshes_enter_each_user_once(cache: TriggerCache) -> None:
    segment = _segment(PLAN_PRO)
    _watch(segment, "segment.entered")
    # 8 sessions at once: within the pool (5 + 5 overflow), as waiting ones hold theirs.
    users = [new_user({"plan": "free"}) for _ in range(6)]
    threads = [_in_thread(lambda u=u: _identify(cache, u, {"plan": "pro"})) for u in users]
    threads += [_in_thread(lambda: _refresh(segment)) for _ in range(2)]
    for thread, box in threads:
        thread.join(60)
        assert "error" not in box, box.get("error")
    _refresh(segment)
    for user in users:
        assert _kinds(user, segment) == [("segment.entered", segment)]


# --------------------------------------------------------------------------- the program file


def _apply(tmp_path: Path, body: str) -> str:
    (tmp_path / "w.bpmn").write_text((Path(__file__).parent / "bpmn" / "minimal.bpmn").read_text())
    path = tmp_path / "program.yaml"
    path.write_text(body)
    try:
        doc, sources = definitions.load(path)
        with session_scope() as session:
            definitions.apply(session, doc, sources)
    except definitions.DefinitionError as exc:
        return str(exc)
    return ""


def test_the_program_declares_segment_triggers_with_on(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    problems = _apply(tmp_path, f"""
workflows: [{{name: w-{tag}, file: w.bpmn}}]
segments: [{{name: pro-{tag}, conditions: {json.dumps(PLAN_PRO)}}}]
triggers:
  - name: in-{tag}
    on: {{segment_entered: pro-{tag}}}
    workflow: w-{tag}
  - name: out-{tag}
    on: {{segment_exited: pro-{tag}}}
    workflow: w-{tag}
  - name: ev-{tag}
    on: {{event: order.completed}}
""")
    assert problems == ""
    with session_scope() as session:
        rows = {r.name: r for r in session.execute(text(
            "SELECT t.name, t.event_type, s.name AS segment FROM triggers t "
            "LEFT JOIN user_segments s ON s.id = t.segment_id WHERE t.name LIKE :p"),
            {"p": f"%-{tag}"})}
    assert (rows[f"in-{tag}"].event_type, rows[f"in-{tag}"].segment) == (
        "segment.entered", f"pro-{tag}")
    assert (rows[f"out-{tag}"].event_type, rows[f"out-{tag}"].segment) == (
        "segment.exited", f"pro-{tag}")
    assert (rows[f"ev-{tag}"].event_type, rows[f"ev-{tag}"].segment) == ("order.completed", None)


@pytest.mark.parametrize(("trigger", "problem"), [
    ("{name: t, on: {segment_entered: nowhere}}", "/triggers/0/on: trigger t: no segment named "
                                                  "'nowhere'"),
    ("{name: t, on: {segment_entered: a, segment_exited: a}}", "/triggers/0/on: trigger t: name "
                                                              "exactly one of"),
    ("{name: t, on: {}}", "name exactly one of event, segment_entered, segment_exited (got none)"),
    ("{name: t}", "give either event_type or on"),
    ("{name: t, event_type: a.b, on: {event: a.b}}", "give either event_type or on"),
    ("{name: t, event_type: segment.entered}", "is the fleet's own event: write on: "
                                               "{segment_entered: SEGMENT}"),
    ("{name: t, on: {event: Not.An.Event}}", "/triggers/0/on/event: trigger t: "
                                             "'Not.An.Event' is not an event type"),
    ("{name: t, on: {segment_left: a}}", "/triggers/0/on/segment_left: trigger t: Extra inputs"),
])
def test_bad_segment_triggers_are_refused_with_their_path(tmp_path: Path, trigger: str,
                                                           problem: str) -> None:
    assert problem in _apply(tmp_path, f"triggers: [{trigger}]\n")
