"""Goal exits and exit conditions on a real database: ingest and the stepper called directly.

Each journey waits (a timer, a message, an event-based gateway, a human task, a send
deferred to the user's window, an operator call already queued) and then sends a
nudge. The goal event ends it where it waits: `completed`, outcome `goal`, the event
recorded, no later node and no send (`sends`, `message_log`). The same journeys
without `exit_on_goal` send the nudge: the negative controls. Ingest and steps run
in transactions of their own (`session_scope`), as the tasks run them.
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

import tasks.workflows  # noqa: F401  (installs the stepper's exit hooks, as in every worker)
from db.models import ExecutionStatus
from db.session import session_scope
from tests.workflow_helpers import (
    cancel_unfinished,
    deploy_xml,
    execution,
    history,
    new_user,
    store_messaging,
)
from workers.definitions import DefinitionError, load
from workers.engine import control, executions, stepper
from workers.engine.stepper import StepResult
from workers.events import exits
from workers.events.ingest import IngestResult, ingest
from workers.operators.deliveries import run_action
from workers.reports.nodes import workflow_report
from workers.rules.triggers import TriggerCache
from workers.sends.config import GoalDef, WorkflowSettings

pytestmark = pytest.mark.servers

REPLY = "test.gx_replied"  # the message the message waits wait for
NUDGE = """<bpmn:serviceTask id="nudge"><bpmn:extensionElements>
  <spiffworkflow:serviceTaskOperator id="send_message" resultVariable="sent"><spiffworkflow:parameters>
    <spiffworkflow:parameter id="channel" type="str" value="&quot;email&quot;"/>
    <spiffworkflow:parameter id="body" type="str" value="&quot;Create your first project&quot;"/>
  </spiffworkflow:parameters></spiffworkflow:serviceTaskOperator></bpmn:extensionElements>
  <bpmn:incoming>to_nudge</bpmn:incoming><bpmn:outgoing>to_end</bpmn:outgoing></bpmn:serviceTask>
<bpmn:sequenceFlow id="to_end" sourceRef="nudge" targetRef="end"/>
<bpmn:endEvent id="end"><bpmn:incoming>to_end</bpmn:incoming></bpmn:endEvent>"""
TIMER = "<bpmn:timerEventDefinition><bpmn:timeDuration>\"{}\"</bpmn:timeDuration></bpmn:timerEventDefinition>"
CATCH = '<bpmn:messageEventDefinition messageRef="reply"/>'
WAITS = {
    "timer": f"""<bpmn:intermediateCatchEvent id="wait"><bpmn:incoming>f1</bpmn:incoming>
      <bpmn:outgoing>to_nudge</bpmn:outgoing>{TIMER}</bpmn:intermediateCatchEvent>""",
    "message": f"""<bpmn:intermediateCatchEvent id="wait"><bpmn:incoming>f1</bpmn:incoming>
      <bpmn:outgoing>to_nudge</bpmn:outgoing>{CATCH}</bpmn:intermediateCatchEvent>""",
    "human": """<bpmn:userTask id="wait"><bpmn:incoming>f1</bpmn:incoming>
      <bpmn:outgoing>to_nudge</bpmn:outgoing></bpmn:userTask>""",
    "gateway": f"""<bpmn:eventBasedGateway id="wait"><bpmn:incoming>f1</bpmn:incoming>
      <bpmn:outgoing>g1</bpmn:outgoing><bpmn:outgoing>g2</bpmn:outgoing></bpmn:eventBasedGateway>
    <bpmn:sequenceFlow id="g1" sourceRef="wait" targetRef="replied"/>
    <bpmn:sequenceFlow id="g2" sourceRef="wait" targetRef="waited"/>
    <bpmn:intermediateCatchEvent id="replied"><bpmn:incoming>g1</bpmn:incoming>
      <bpmn:outgoing>r1</bpmn:outgoing>{CATCH}</bpmn:intermediateCatchEvent>
    <bpmn:intermediateCatchEvent id="waited"><bpmn:incoming>g2</bpmn:incoming>
      <bpmn:outgoing>r2</bpmn:outgoing>{TIMER}</bpmn:intermediateCatchEvent>
    <bpmn:sequenceFlow id="r1" sourceRef="replied" targetRef="nudge"/>
    <bpmn:sequenceFlow id="r2" sourceRef="waited" targetRef="nudge"/>""",
    "send": "",  # straight to the nudge
}


def journey_xml(wait: str, timer: str = "PT1H") -> str:
    """start -> the wait -> the nudge (send_message) -> end."""
    target = "nudge" if wait == "send" else "wait"
    body = WAITS[wait].replace("{}", timer)
    incoming = ("<bpmn:incoming>to_nudge</bpmn:incoming>" if wait != "gateway"
                else "<bpmn:incoming>r1</bpmn:incoming><bpmn:incoming>r2</bpmn:incoming>")
    nudge = NUDGE.replace("<bpmn:incoming>to_nudge</bpmn:incoming>", incoming)
    flows = ('<bpmn:sequenceFlow id="to_nudge" sourceRef="wait" targetRef="nudge"/>'
             if wait not in ("send", "gateway") else "")
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:spiffworkflow="http://spiffworkflow.org/bpmn/schema/1.0/core"
    id="goal-exit" targetNamespace="http://lifecycle-fleet/test">
  <bpmn:message id="reply" name="{REPLY}"/>
  <bpmn:process id="goal_exit" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="{target}"/>
    {body}
    {flows}
    {nudge.replace('to_nudge</bpmn:incoming>', 'f1</bpmn:incoming>') if wait == "send" else nudge}
  </bpmn:process>
</bpmn:definitions>"""


@pytest.fixture(autouse=True)
def exit_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit rules read afresh on every use: the tests change them between transactions."""
    monkeypatch.setattr(exits, "_PROCESS_EXITS", exits.ExitCache(refresh_seconds=0))


STARTED: list[uuid.UUID] = []


@pytest.fixture(autouse=True)
def _cancel_what_waits() -> Iterator[None]:
    """Negative controls leave journeys waiting; other tests' sweeps must not find them."""
    yield
    cancel_unfinished(STARTED)


def _etype() -> str:
    return f"test.gx{uuid.uuid4().hex[:10]}"


def _workflow(wait: str, *, goal: str | None = None, exit_on_goal: bool = True,
              exit_when: dict[str, Any] | None = None, timer: str = "PT1H") -> str:
    """Deploy the journey, with its settings stored as `fleet apply` stores them."""
    name = deploy_xml(journey_xml(wait, timer))
    settings = WorkflowSettings(
        goal=GoalDef(event_type=goal, within="3650d") if goal else None,
        exit_on_goal=exit_on_goal and goal is not None, exit_when=exit_when)
    with session_scope() as session:
        session.execute(text("UPDATE workflows SET settings = CAST(:s AS jsonb) WHERE name = :n"),
                        {"s": json.dumps(settings.model_dump(mode="json")), "n": name})
    return name


def _start(workflow: str, user: uuid.UUID, now: dt.datetime | None = None) -> uuid.UUID:
    with session_scope() as session:
        execution_id = control.start(session, workflow, user, {}, now=now)
    STARTED.append(execution_id)
    return execution_id


def _step(execution_id: uuid.UUID, version: int | None = None,
          now: dt.datetime | None = None) -> StepResult:
    with session_scope() as session:
        return stepper.step(session, execution_id,
                            execution(execution_id).state_version if version is None else version,
                            now=now)


def _settle(execution_id: uuid.UUID, now: dt.datetime | None = None) -> StepResult:
    """Step (running operator calls as the actions worker would) until it rests or ends."""
    version: int | None = 0 if execution(execution_id).engine_state is None else None
    while True:
        result = _step(execution_id, version, now)
        if result.action_key is not None:
            with session_scope() as session:
                action = run_action(session, result.action_key, now=now)
            if action.step_version is None:
                return result
            version = action.step_version
        elif result.next_version is not None and result.send_at is None:
            version = result.next_version
        else:
            return result


def _ingest(events: list[dict[str, Any]], now: dt.datetime | None = None) -> IngestResult:
    with session_scope() as session:
        return ingest(session, events, source="test", triggers=TriggerCache(refresh_seconds=0),
                      now=now)


def _event(etype: str, user: uuid.UUID, now: dt.datetime | None = None,
           data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "event_type": etype, "user": str(user),
            "occurred_at": (now or dt.datetime.now(dt.UTC)).isoformat(), "data": data or {}}


def _sent(execution_id: uuid.UUID) -> tuple[list[str], int]:
    """(the outcomes of its send decisions, how many messages went out) for one execution."""
    with session_scope() as session:
        outcomes = list(session.execute(text(
            "SELECT outcome FROM sends WHERE execution_id = :e ORDER BY created_at"),
            {"e": execution_id}).scalars())
        messages = session.execute(text("SELECT count(*) FROM message_log WHERE execution_id = :e"),
                                   {"e": execution_id}).scalar_one()
    return outcomes, int(messages)


def _exit_row(execution_id: uuid.UUID) -> Any:
    with session_scope() as session:
        return session.execute(text("SELECT * FROM execution_exits WHERE execution_id = :e"),
                               {"e": execution_id}).one_or_none()


def _assert_exited(execution_id: uuid.UUID, goal_event: dict[str, Any] | None) -> None:
    """Ended where it was (its current node), with nothing left to wake it or to send."""
    row = execution(execution_id)
    assert (row.status, row.outcome) == (ExecutionStatus.COMPLETED,
                                         "goal" if goal_event else "exited")
    assert row.wake_at is None and row.awaiting_events is None and row.awaiting_tasks is None
    assert row.step_enqueued_at is None and row.completed_at is not None
    assert history(execution_id)[-1] == (row.state_version, row.current_node_id, "exited")
    if goal_event is not None:
        assert str(_exit_row(execution_id).event_id) == goal_event["event_id"]
        with session_scope() as session:
            assert str(session.execute(text(
                "SELECT event_id FROM execution_goals WHERE execution_id = :e"),
                {"e": execution_id}).scalar_one()) == goal_event["event_id"]
    assert ("nudge", "completed") not in {(node, outcome) for _, node, outcome in
                                          history(execution_id)}


# --------------------------------------------------------------------------- each wait


def _goal_while_waiting(wait: str, exit_on_goal: bool, timer: str = "PT1H"
                        ) -> tuple[uuid.UUID, uuid.UUID, dict[str, Any], IngestResult]:
    goal = _etype()
    workflow = _workflow(wait, goal=goal, exit_on_goal=exit_on_goal, timer=timer)
    user = new_user()
    execution_id = _start(workflow, user)
    _settle(execution_id)
    before = execution(execution_id)
    assert before.status == "running" and (before.wake_at or before.awaiting_events
                                           or before.awaiting_tasks), wait
    goal_event = _event(goal, user)
    return execution_id, user, goal_event, _ingest([goal_event])


@pytest.mark.parametrize("wait", ["timer", "message", "gateway", "human"])
def test_the_goal_ends_an_execution_where_it_waits_and_nothing_is_sent_after(wait: str) -> None:
    execution_id, user, goal_event, ingested = _goal_while_waiting(wait, exit_on_goal=True)
    assert execution_id in {e for e, _ in ingested.woken}  # ingest sends its step
    assert _exit_row(execution_id).reason == "goal"
    result = _step(execution_id, dict(ingested.woken)[execution_id])
    assert (result.outcome, result.node_id) == ("exited", "wait")  # where it waited
    _assert_exited(execution_id, goal_event)
    # Whatever would have woken it finds it ended: its reply, a late timer step, the person.
    assert execution_id not in {e for e, _ in _ingest([_event(REPLY, user)]).woken}
    assert _step(execution_id).outcome == "noop"
    with session_scope() as session, pytest.raises(control.ControlError):
        control.complete(session, execution_id, "wait", {})
    assert _sent(execution_id) == ([], 0)


def test_the_workflow_report_counts_goal_exits_at_the_node_they_left() -> None:
    goal = _etype()
    workflow = _workflow("message", goal=goal)
    users = [new_user() for _ in range(3)]
    ids = [_start(workflow, user) for user in users]
    for execution_id in ids:
        _settle(execution_id)
    node = "wait"  # the message catch: it waits there, its last history row is the start's
    ingested = _ingest([_event(goal, user) for user in users[:2]])  # the third stays
    for execution_id in ids[:2]:
        assert _step(execution_id, dict(ingested.woken)[execution_id]).outcome == "exited"
    with session_scope() as session:
        report = workflow_report(session, workflow)
    stats = report.node(node)
    assert (stats.exited, stats.waiting) == (2, 1)
    assert report.outcomes["goal_exits"] == 2 and report.outcomes["completed"] == 2
    assert report.outcomes["condition_exits"] == 0
    assert {n["node_id"]: n["exited"] for n in report.to_json()["nodes"]}[node] == 2


@pytest.mark.parametrize("wait", ["message", "human"])
def test_without_exit_on_goal_the_goal_ends_nothing_and_the_nudge_goes_out(wait: str) -> None:
    """The negative control: the same journey, its goal reached, goes on and sends."""
    execution_id, user, _, ingested = _goal_while_waiting(wait, exit_on_goal=False)
    assert execution_id not in {e for e, _ in ingested.woken}
    assert _exit_row(execution_id) is None
    if wait == "message":
        _ingest([_event(REPLY, user)])
    else:
        with session_scope() as session:
            control.complete(session, execution_id, "wait", {})
    _settle(execution_id)
    row = execution(execution_id)
    assert (row.status, row.outcome) == (ExecutionStatus.COMPLETED, None)
    assert _sent(execution_id) == (["sent"], 1)


def test_a_short_timer_due_after_the_goal_sends_nothing_and_without_the_exit_it_would() -> None:
    ended, _, _, _ = _goal_while_waiting("timer", exit_on_goal=True, timer="PT1S")
    control_run, _, _, _ = _goal_while_waiting("timer", exit_on_goal=False, timer="PT1S")
    time.sleep(1.2)
    for execution_id in (ended, control_run):  # the timer's step, as the sweep sends it
        _settle(execution_id)
    assert execution(ended).outcome == "goal" and _sent(ended) == ([], 0)
    assert execution(control_run).outcome is None and _sent(control_run) == (["sent"], 1)


# Monday 2030-01-07 07:00 UTC: 08:00 in Paris, before a 09:00-20:00 window.
EARLY = dt.datetime(2030, 1, 7, 7, 0, tzinfo=dt.UTC)
OPEN = dt.datetime(2030, 1, 7, 8, 0, tzinfo=dt.UTC)


@pytest.fixture()
def send_window() -> Iterator[None]:
    store_messaging({"timezone": "Europe/Paris", "send_window": {"hours": "09:00-20:00"}})
    yield
    store_messaging(None)


@pytest.mark.usefixtures("send_window")
def test_a_send_deferred_to_the_window_is_dropped_by_the_goal() -> None:
    goal = _etype()
    user = new_user()
    execution_id = _start(_workflow("send", goal=goal), user, EARLY)
    result = _settle(execution_id, EARLY)  # the call was deferred: the execution waits for 09:00
    key = result.action_key
    assert key is not None and execution(execution_id).wake_at == OPEN
    assert _sent(execution_id) == (["deferred"], 0)
    goal_event = _event(goal, user, EARLY)
    ingested = _ingest([goal_event], EARLY)
    assert _step(execution_id, dict(ingested.woken)[execution_id], EARLY).outcome == "exited"
    _assert_exited(execution_id, goal_event)
    with session_scope() as session:
        delivery = session.execute(text("SELECT status, send_outcome, error_message FROM "
                                        "action_deliveries WHERE key = :k"), {"k": key}).one()
    assert (delivery.status, delivery.send_outcome) == ("failed", "dropped")
    assert "goal reached" in delivery.error_message
    # 09:00 in Paris: the timer is gone; a late copy of the call or the step sends nothing.
    assert _step(execution_id, execution(execution_id).state_version - 1, OPEN).outcome == "noop"
    with session_scope() as session:
        assert run_action(session, key, now=OPEN).status == "skipped"
    assert _sent(execution_id) == (["dropped"], 0)


@pytest.mark.usefixtures("send_window")
def test_a_deferred_send_without_exit_on_goal_goes_out_when_the_window_opens() -> None:
    """The negative control of the test above."""
    goal = _etype()
    user = new_user()
    execution_id = _start(_workflow("send", goal=goal, exit_on_goal=False), user, EARLY)
    _settle(execution_id, EARLY)
    _ingest([_event(goal, user, EARLY)], EARLY)
    _settle(execution_id, OPEN)
    assert _sent(execution_id) == (["sent"], 1)


def test_an_operator_call_queued_before_the_goal_does_not_run() -> None:
    goal = _etype()
    user = new_user()
    execution_id = _start(_workflow("send", goal=goal), user)
    version = 0
    while (result := _step(execution_id, version)).action_key is None:  # the call is asked for
        assert result.next_version is not None
        version = result.next_version
    goal_event = _event(goal, user)
    _ingest([goal_event])  # ... and the goal arrives while the call waits on the actions queue
    with session_scope() as session:
        action = run_action(session, result.action_key)
    assert action.status == "failed" and action.step_version is not None
    assert _step(execution_id, action.step_version).outcome == "exited"
    _assert_exited(execution_id, goal_event)
    assert _sent(execution_id) == ([], 0)


# --------------------------------------------------------------------------- the race


def test_a_goal_arriving_while_a_step_holds_the_row_still_ends_the_execution() -> None:
    """The ingest does not wait for the step; the step it sends, stale by then, ends it.

    The first step (version 0: the start event) holds the row, uncommitted, while the
    goal is ingested in another thread; that ingest finishes first, having read
    version 0. After the step commits (version 1), the ingest's step message for
    version 0 comes back busy while the row is held, and afterwards ends the execution.
    """
    goal = _etype()
    user = new_user()
    execution_id = _start(_workflow("timer", goal=goal), user)
    goal_event = _event(goal, user)
    ingested: list[IngestResult] = []
    with session_scope() as holder:
        stepper.step(holder, execution_id, 0)  # the start event: version 1, the row held
        ingesting = threading.Thread(target=lambda: ingested.append(_ingest([goal_event])))
        ingesting.start()
        ingesting.join(timeout=10)
        assert not ingesting.is_alive() and ingested, "the ingest waited for the step"
        with session_scope() as other:  # a batch meeting the held row does not wait either
            [busy] = stepper.step_many(other, [(execution_id, 0)])
        assert busy.outcome == "busy"
    assert dict(ingested[0].woken)[execution_id] == 0  # read before the step committed
    assert execution(execution_id).state_version >= 1
    assert _step(execution_id, 0).outcome == "exited"  # stale, and it ends it all the same
    _assert_exited(execution_id, goal_event)


def test_without_applying_the_request_the_race_leaves_the_execution_running(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The negative control: a stepper that ignores the recorded exit lets the journey go on."""
    goal = _etype()
    user = new_user()
    execution_id = _start(_workflow("timer", goal=goal), user)
    _settle(execution_id)
    ingested = _ingest([_event(goal, user)])
    monkeypatch.setattr(executions, "exit_requests", lambda session, ids: {})
    assert _step(execution_id, dict(ingested.woken)[execution_id]).outcome != "exited"
    assert execution(execution_id).status == "running"


# --------------------------------------------------------------------------- exit_when


def test_exit_when_ends_the_execution_on_identify_when_the_user_leaves_the_segment() -> None:
    key = f"trial_{uuid.uuid4().hex[:6]}"
    segment = f"trial-{uuid.uuid4().hex[:6]}"
    with session_scope() as session:
        session.execute(text(
            "INSERT INTO user_segments (name, conditions, ttl_seconds) "
            "VALUES (:n, CAST(:c AS jsonb), 3600)"),
            {"n": segment, "c": json.dumps({"field": f"user.attributes.{key}", "op": "eq",
                                            "value": True})})
    workflow = _workflow("timer", exit_when={"not": {"in_segment": segment}})
    staying, leaving = new_user(), new_user()
    _ingest([_event("user.identify", user, data={key: True})
             for user in (staying, leaving)])  # both members now
    runs = {user: _start(workflow, user) for user in (staying, leaving)}
    for execution_id in runs.values():
        assert _settle(execution_id).outcome == "completed"  # on the timer
    ingested = _ingest([_event("user.identify", leaving, data={key: False})])
    assert dict(ingested.woken).keys() == {runs[leaving]}
    assert _exit_row(runs[leaving]).reason == "exited"
    assert _step(runs[leaving], dict(ingested.woken)[runs[leaving]]).outcome == "exited"
    _assert_exited(runs[leaving], None)
    assert execution(runs[staying]).status == "running"


def test_exit_when_is_checked_on_each_step() -> None:
    key = f"plan_{uuid.uuid4().hex[:6]}"
    workflow = _workflow("timer", exit_when={"field": f"user.attributes.{key}", "op": "eq",
                                             "value": "paid"}, timer="PT1S")
    paid, free = new_user(), new_user()
    runs = {user: _start(workflow, user) for user in (paid, free)}
    for execution_id in runs.values():
        _settle(execution_id)
    with session_scope() as session:  # changed behind ingest's back: only a step can see it
        session.execute(text("UPDATE users SET attributes = CAST(:a AS jsonb) WHERE id = :u"),
                        {"a": json.dumps({key: "paid"}), "u": paid})
    time.sleep(1.2)  # the timer's step
    assert _settle(runs[paid]).outcome == "exited"
    _assert_exited(runs[paid], None)
    assert _exit_row(runs[paid]) is None  # decided by the step itself
    _settle(runs[free])
    assert execution(runs[free]).outcome is None and _sent(runs[free]) == (["sent"], 1)


# --------------------------------------------------------------------------- validation


def _problems(tmp_path: Path, workflow: dict[str, Any]) -> str:
    bpmn = tmp_path / "journey.bpmn"
    bpmn.write_text(journey_xml("timer"))
    doc = tmp_path / "program.yaml"
    doc.write_text(json.dumps({"workflows": [{"name": "journey", "file": "journey.bpmn",
                                              **workflow}]}))
    with pytest.raises(DefinitionError) as raised:
        load(doc)
    return str(raised.value)


def test_exit_on_goal_without_a_goal_is_refused_at_its_path(tmp_path: Path) -> None:
    found = _problems(tmp_path, {"exit_on_goal": True})
    assert "/workflows/0/exit_on_goal: workflow journey: exit_on_goal needs a goal" in found


def test_an_exit_condition_is_a_condition_on_the_user_checked_at_its_path(tmp_path: Path) -> None:
    event = _problems(tmp_path, {"exit_when": {"field": "event.data.plan", "op": "eq",
                                               "value": "x"}})
    assert "/workflows/0/exit_when: workflow journey:" in event and "event" in event
    bad = _problems(tmp_path, {"exit_when": {"field": "user.attributes.plan", "op": "nope"}})
    assert "/workflows/0/exit_when: workflow journey:" in bad


def test_a_valid_program_stores_the_exit_settings(tmp_path: Path) -> None:
    bpmn = tmp_path / "journey.bpmn"
    bpmn.write_text(journey_xml("timer"))
    doc = tmp_path / "program.yaml"
    doc.write_text(json.dumps({"workflows": [{
        "name": "journey", "file": "journey.bpmn", "exit_on_goal": True,
        "goal": {"event_type": "project.created"},
        "exit_when": {"not": {"in_segment": "trial"}}}]}))
    definitions, _ = load(doc)
    settings = definitions.workflows[0].settings
    assert settings["exit_on_goal"] is True
    assert settings["exit_when"] == {"not": {"in_segment": "trial"}}
