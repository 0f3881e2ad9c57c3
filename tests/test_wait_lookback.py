"""Message waits that look back, and the locking that leaves no event between lookup and wait.

A wait for a message may accept an event of its type the user produced shortly
before the wait began (`lookback` on the catch event, or the workflow's `lookback`
in the program), read from the audit log. The interleaving tests hold one
transaction open at the critical point and run the other side in a thread, with
real PostgreSQL connections: an ingest still committing when a wait begins, and an
ingest that commits after the wait's lookup but before the wait is saved. Each is
also run with the user lock taken out, to show the event is then lost: the lock is
what the tests prove.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from db.session import session_scope
from tests.workflow_helpers import BPMN, deploy_xml, execution, new_user, nodes
from workers.engine import control, executions, stepper
from workers.engine.bpmn import BpmnError
from workers.engine.validate import validate_bpmn
from workers.events.ingest import IngestResult, ingest
from workers.rules.triggers import TriggerCache
from workers.sends.policy import POLICIES

SPIFF = "http://spiffworkflow.org/bpmn/schema/1.0/core"


def _xml(event_type: str, lookback: str | None) -> str:
    """start -> a script -> wait for `event_type` (looking back `lookback`) -> end."""
    properties = "" if lookback is None else (
        "<bpmn:extensionElements><spiffworkflow:properties>"
        f'<spiffworkflow:property name="lookback" value="{lookback}"/>'
        "</spiffworkflow:properties></bpmn:extensionElements>")
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
                  xmlns:spiffworkflow="{SPIFF}" id="d" targetNamespace="http://lifecycle-fleet/test">
  <bpmn:message id="m" name="{event_type}"/>
  <bpmn:process id="nudge" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="prepare"/>
    <bpmn:scriptTask id="prepare"><bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
      <bpmn:script>prepared = True</bpmn:script></bpmn:scriptTask>
    <bpmn:sequenceFlow id="f2" sourceRef="prepare" targetRef="wait"/>
    <bpmn:intermediateCatchEvent id="wait">{properties}
      <bpmn:incoming>f2</bpmn:incoming><bpmn:outgoing>f3</bpmn:outgoing>
      <bpmn:messageEventDefinition messageRef="m"/>
    </bpmn:intermediateCatchEvent>
    <bpmn:sequenceFlow id="f3" sourceRef="wait" targetRef="end"/>
    <bpmn:endEvent id="end"><bpmn:incoming>f3</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>"""


def _etype() -> str:
    return f"test.lb{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- validation (pure)


def test_the_lookback_property_is_read_per_message_name() -> None:
    validated = validate_bpmn(_xml("project.created", "10m"))
    assert validated.lookbacks == {"project.created": dt.timedelta(minutes=10)}
    assert validate_bpmn(_xml("project.created", None)).lookbacks == {}


@pytest.mark.parametrize(("value", "reason"), [
    ("ten minutes", "expected a duration"), ("-5m", "expected a duration"),
    ("200d", "at most 90 days"), ("", "expected a duration"), ("20000w", "duration longer than 10 years")])
def test_a_lookback_that_is_not_a_duration_is_refused_naming_the_element(
        value: str, reason: str) -> None:
    with pytest.raises(BpmnError, match=f"element wait: property lookback: {reason}"):
        validate_bpmn(_xml("project.created", value))


# --------------------------------------------------------------------------- servers

def _ingest(session: Session, user_id: uuid.UUID, event_type: str) -> IngestResult:
    raw = {"event_id": str(uuid.uuid4()), "event_type": event_type, "user": str(user_id),
           "data": {"name": "first project"}}
    return ingest(session, [raw], source="test", triggers=TriggerCache(refresh_seconds=0))


def _ingest_committed(user_id: uuid.UUID, event_type: str) -> IngestResult:
    with session_scope() as session:
        return _ingest(session, user_id, event_type)


def _start(workflow: str, user_id: uuid.UUID) -> uuid.UUID:
    with session_scope() as session:
        return control.start(session, workflow, user_id)


def _step(execution_id: uuid.UUID, version: int) -> stepper.StepResult:
    with session_scope() as session:
        return stepper.step(session, execution_id, version)


def _run(execution_id: uuid.UUID, version: int = 0) -> int:
    """Step until no next step is asked for now (a timer's delayed one is not taken);
    returns the version it rests at."""
    while True:
        result = _step(execution_id, version)
        if result.next_version is None or result.send_at is not None:
            return execution(execution_id).state_version
        version = result.next_version


def _messages(execution_id: uuid.UUID) -> list[Any]:
    with session_scope() as session:
        return list(session.execute(text(
            "SELECT event_id, event_type, consumed_at, payload FROM execution_messages "
            "WHERE execution_id = :i ORDER BY id"), {"i": execution_id}))


@pytest.fixture()
def workflow_settings() -> Iterator[list[str]]:
    """Names of workflows whose program settings a test wrote; the policy cache is reset."""
    names: list[str] = []
    POLICIES.clear()
    yield names
    POLICIES.clear()


@pytest.mark.servers
def test_a_wait_that_looks_back_catches_the_event_recorded_just_before_it_began() -> None:
    event_type, user = _etype(), new_user()
    workflow = deploy_xml(_xml(event_type, "10m"))
    _ingest_committed(user, event_type)  # the user creates a project right after signing up
    execution_id = _start(workflow, user)
    _run(execution_id)
    assert execution(execution_id).status == "completed"
    [message] = _messages(execution_id)
    assert message.event_type == event_type and message.consumed_at is not None
    assert message.payload["data"] == {"name": "first project"}
    assert message.payload["occurred_at"]


@pytest.mark.servers
def test_without_lookback_or_outside_its_window_the_earlier_event_is_not_caught() -> None:
    event_type, user, other = _etype(), new_user(), new_user()
    plain = _start(deploy_xml(_xml(event_type, None)), user)
    short = _start(deploy_xml(_xml(event_type, "10m")), other)
    _ingest_committed(user, event_type)
    _ingest_committed(other, event_type)
    with session_scope() as session:  # the other user's event was recorded 11 minutes ago
        session.execute(text("UPDATE lifecycle_events SET created_at = created_at - "
                             "interval '11 minutes' WHERE user_id = :u"), {"u": other})
    _run(plain)
    _run(short)
    for execution_id in (plain, short):
        row = execution(execution_id)
        assert (row.status, row.awaiting_events) == ("running", [event_type])
        assert _messages(execution_id) == []
    _ingest_committed(user, event_type)  # a later event is caught as ever
    _run(plain, execution(plain).state_version)
    assert execution(plain).status == "completed"


@pytest.mark.servers
def test_the_workflows_program_lookback_applies_to_waits_without_their_own(
        workflow_settings: list[str]) -> None:
    event_type, user = _etype(), new_user()
    workflow = deploy_xml(_xml(event_type, None))
    with session_scope() as session:
        session.execute(text("UPDATE workflows SET settings = CAST(:s AS jsonb), "
                             "updated_at = now() WHERE name = :n"),
                        {"s": '{"lookback": "1h"}', "n": workflow})
    workflow_settings.append(workflow)
    POLICIES.clear()
    _ingest_committed(user, event_type)
    execution_id = _start(workflow, user)
    _run(execution_id)
    assert execution(execution_id).status == "completed"


@pytest.mark.servers
def test_an_event_recorded_before_the_lookback_is_caught_once_even_when_also_delivered() -> None:
    """The event arrives while the execution already waits: ingest delivers it, and the
    lookback of a wait begun later in a loop-free workflow does not deliver it twice."""
    event_type, user = _etype(), new_user()
    execution_id = _start(deploy_xml(_xml(event_type, "10m")), user)
    version = _run(execution_id)
    result = _ingest_committed(user, event_type)
    assert result.woken == ((execution_id, version),)
    _run(execution_id, version)
    assert execution(execution_id).status == "completed"
    assert len(_messages(execution_id)) == 1


# --------------------------------------------------------------------------- interleavings


class _Side(threading.Thread):
    """Runs `work` in its own thread; `done` is set when it returns (or raises)."""

    def __init__(self, work: Any) -> None:
        super().__init__(daemon=True)
        self.work, self.result, self.error = work, None, None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.done.set()


BLOCKED = 1.5  # seconds a side must stay blocked to count as waiting for the lock


@pytest.fixture(params=["locked", "without the user lock"])
def user_lock(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both interleavings run as built, and with `lock_users` taken out (the event is lost)."""
    if request.param != "locked":
        monkeypatch.setattr(executions, "lock_users", lambda session, user_ids: None)
    return request.param == "locked"


@pytest.mark.servers
def test_an_ingest_committing_while_the_wait_begins_is_seen_by_its_lookback(
        engine: Engine, user_lock: bool) -> None:
    """Ingest has written the event and found no wait (none is saved yet); before it
    commits, the step that begins the wait runs its lookup."""
    event_type, user = _etype(), new_user()
    execution_id = _start(deploy_xml(_xml(event_type, "10m")), user)
    first = _step(execution_id, 0)  # the start event: the next step runs the script
    assert first.next_version is not None
    with Session(engine) as ingesting:
        result = _ingest(ingesting, user, event_type)
        assert result.woken == ()  # nothing waits yet
        step = _Side(lambda: _step(execution_id, first.next_version or 0))
        step.start()
        blocked = not step.done.wait(BLOCKED)
        ingesting.commit()
    step.join(30)
    assert step.error is None, step.error
    assert blocked == user_lock  # the step waited for the ingest's commit
    _run(execution_id, execution(execution_id).state_version)
    caught = execution(execution_id).status == "completed"
    assert caught == user_lock, "the event committed between lookup and wait was lost"


@pytest.mark.servers
def test_an_ingest_after_the_lookup_but_before_the_wait_is_saved_wakes_the_wait(
        engine: Engine, user_lock: bool) -> None:
    """The step has run its lookup and begun the wait, not yet committed; the event
    is ingested then (no lookback: the ingest itself must deliver it)."""
    event_type, user = _etype(), new_user()
    execution_id = _start(deploy_xml(_xml(event_type, None)), user)
    first = _step(execution_id, 0)
    with Session(engine) as stepping:
        result = stepper.step(stepping, execution_id, first.next_version or 0)
        assert result.next_version is None  # the step began the wait
        ingest_side = _Side(lambda: _ingest_committed(user, event_type))
        ingest_side.start()
        blocked = not ingest_side.done.wait(BLOCKED)
        stepping.commit()
    ingest_side.join(30)
    assert ingest_side.error is None, ingest_side.error
    assert blocked == user_lock  # the ingest waited for the wait to be saved
    woken = ingest_side.result.woken if isinstance(ingest_side.result, IngestResult) else ()
    assert bool(woken) == user_lock
    if woken:
        [(woken_id, version)] = woken
        _run(woken_id, version)
    caught = execution(execution_id).status == "completed"
    assert caught == user_lock, "the event ingested while the wait was being saved was lost"


@pytest.mark.servers
def test_an_ingest_meeting_a_step_in_progress_stores_the_message_for_its_wait(
        engine: Engine) -> None:
    """An execution already waiting is held by a step (a timer's, say) when the event
    comes: the ingest does not wait for it, stores the message, and the held step,
    re-reading after the user lock, or the step sent for it, delivers it."""
    event_type, user = _etype(), new_user()
    execution_id = _start(deploy_xml(_xml(event_type, None)), user)
    version = _run(execution_id)
    with Session(engine) as holding:
        assert executions.lock(holding, execution_id) is not None  # a step holds the row
        started = time.monotonic()
        result = _ingest_committed(user, event_type)
        assert time.monotonic() - started < BLOCKED  # not waiting for the held row
        holding.rollback()
    assert result.woken == ((execution_id, version),)
    assert len(_messages(execution_id)) == 1
    _run(execution_id, version)
    assert execution(execution_id).status == "completed"


# --------------------------------------------------------------------------- message vs. timer


def _timed_wait(execution_id: uuid.UUID) -> tuple[int, dt.datetime]:
    """Step into message_timeout's wait; returns (version, the boundary timer's due time)."""
    version = _run(execution_id)
    row = execution(execution_id)
    assert row.awaiting_events == ["order.completed"] and row.wake_at is not None
    return version, row.wake_at


def _store(execution_id: uuid.UUID, received_at: dt.datetime) -> None:
    with session_scope() as session:
        session.execute(text(
            "INSERT INTO execution_messages (execution_id, event_id, event_type, payload, "
            "received_at) VALUES (:e, :i, 'order.completed', CAST(:p AS jsonb), :r)"),
            {"e": execution_id, "i": uuid.uuid4(), "r": received_at,
             "p": '{"event_type": "order.completed", "data": {"total": 5}, "occurred_at": null}'})


@pytest.mark.servers
def test_a_message_that_came_before_the_timeout_wins_though_the_step_runs_after_it() -> None:
    """The step runs late (a backlog): both the message and the boundary timer are there.
    The message came first, so the wait completes with it, and the timer is cancelled
    instead of firing as well (it used to: both ways ran and the timer's won)."""
    execution_id = _start(deploy_xml((BPMN / "message_timeout.bpmn").read_text()), new_user())
    version, due = _timed_wait(execution_id)
    _store(execution_id, received_at=due - dt.timedelta(milliseconds=250))
    time.sleep(max(0.0, (due - dt.datetime.now(dt.UTC)).total_seconds()) + 0.3)
    _run(execution_id, version)
    row = execution(execution_id)
    assert row.status == "completed" and row.current_node_id == "end_ordered"
    assert [n for n in nodes(execution_id) if n in ("thank", "timeout", "nudge")] == ["thank"]
    assert row.variables["outcome"] == "ordered"


@pytest.mark.servers
def test_a_message_that_came_after_the_timeout_leaves_the_timer_its_way() -> None:
    execution_id = _start(deploy_xml((BPMN / "message_timeout.bpmn").read_text()), new_user())
    version, due = _timed_wait(execution_id)
    time.sleep(max(0.0, (due - dt.datetime.now(dt.UTC)).total_seconds()) + 0.3)
    _store(execution_id, received_at=dt.datetime.now(dt.UTC))
    _run(execution_id, version)
    row = execution(execution_id)
    assert row.status == "completed" and row.current_node_id == "end_timed_out"
    assert "thank" not in nodes(execution_id)
    [message] = _messages(execution_id)
    assert message.consumed_at is None  # kept, as any message no wait caught
