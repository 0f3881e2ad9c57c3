"""Message correlation: a wait catches only the event whose correlation values match.

tests/bpmn/correlated_order.bpmn waits for `order.completed` whose `data["order_id"]`
(the retrieval expression, run in the sandbox against the payload the fleet hands
the workflow) equals the execution's `order_id` variable (the spiff extension
`processVariableCorrelation`). An event that does not match is not caught and
stays unconsumed for a later wait; `deliver` says caught only when the engine did.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from db.models import ExecutionStatus
from db.session import session_scope
from tests.helpers import WorkerProcess, wait_for
from tests.workflow_helpers import (
    BPMN,
    deploy,
    execution,
    new_user,
    nodes,
    start,
    wait_status,
    wait_waiting,
)
from workers.engine import control, executions, runner, state, stepper
from workers.engine.bpmn import BpmnError
from workers.engine.specs import LoadedSpec
from workers.engine.validate import validate_bpmn
from workers.producer import send_event

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)
ORDER = (BPMN / "correlated_order.bpmn").read_text()


def _payload(order_id: Any, total: int = 5, event_id: uuid.UUID | None = None) -> dict[str, Any]:
    """What ingest stores for a waiting execution (`execution_messages.payload`)."""
    return {"event_id": str(event_id or uuid.uuid4()), "event_type": "order.completed",
            "data": {"order_id": order_id, "total": total}, "occurred_at": NOW.isoformat()}


# --------------------------------------------------------------------------- the runner alone


def _waiting_workflow(xml: str = ORDER, order_id: str = "A-1") -> Any:
    parsed = validate_bpmn(xml).parsed
    loaded = LoadedSpec(uuid.uuid4(), "1", parsed.process_id, parsed.spec, parsed.subprocess_specs)
    workflow = state.new_workflow(loaded, {"order_id": order_id})
    while (task := runner.next_node(workflow)) is not None:
        runner.run_node(workflow, task)
    assert runner.waits(workflow).messages == ("order.completed",)
    return workflow


def _run_to_end(workflow: Any) -> list[str]:
    ran = []
    while (task := runner.next_node(workflow)) is not None:
        ran.append(task.task_spec.bpmn_id)
        runner.run_node(workflow, task)
    return ran


def test_the_matching_event_is_caught() -> None:
    workflow = _waiting_workflow()
    assert runner.deliver(workflow, "order.completed", _payload("A-1", total=42))
    assert _run_to_end(workflow) == ["wait_order", "thank", "end"]
    assert workflow.is_completed() and workflow.data["total"] == 42


@pytest.mark.parametrize("payload", [
    _payload("B-2"),  # another order
    _payload(1),  # another value (and type)
    {**_payload("A-1"), "data": {"total": 5}},  # no order id: the expression cannot run
])
def test_an_event_that_does_not_match_is_not_caught_and_a_later_one_is(
        payload: dict[str, Any]) -> None:
    workflow = _waiting_workflow()
    assert not runner.deliver(workflow, "order.completed", payload)
    assert runner.next_node(workflow) is None  # still waiting
    assert runner.waits(workflow).messages == ("order.completed",)
    assert not runner.deliver(workflow, "order.other", _payload("A-1"))  # not awaited
    assert runner.deliver(workflow, "order.completed", _payload("A-1", total=9))
    assert _run_to_end(workflow) == ["wait_order", "thank", "end"]
    assert workflow.data["total"] == 9


def test_correlation_survives_a_save_and_load() -> None:
    workflow = _waiting_workflow()
    parsed = validate_bpmn(ORDER).parsed
    loaded = LoadedSpec(uuid.uuid4(), "1", parsed.process_id, parsed.spec, parsed.subprocess_specs)
    restored = state.load(state.dump(workflow), loaded)
    assert not runner.deliver(restored, "order.completed", _payload("B-2"))
    assert runner.deliver(restored, "order.completed", _payload("A-1"))


def test_a_receive_task_with_a_standard_correlation_key_takes_the_first_events_values(
        ) -> None:
    """Without a process variable, SpiffWorkflow takes the first event's values as the key."""
    xml = (BPMN / "message_timeout.bpmn").read_text().replace(
        '<bpmn:message id="order_completed" name="order.completed">',
        '<bpmn:correlationProperty id="order_id" name="order id">'
        '<bpmn:correlationPropertyRetrievalExpression messageRef="order_completed">'
        '<bpmn:messagePath>data["order_id"]</bpmn:messagePath>'
        '</bpmn:correlationPropertyRetrievalExpression></bpmn:correlationProperty>'
        '<bpmn:message id="order_completed" name="order.completed">')
    workflow = _waiting_workflow(xml)
    assert not runner.deliver(workflow, "order.completed", {**_payload("A-1"), "data": {}})
    assert runner.deliver(workflow, "order.completed", _payload("A-1", total=3))
    assert workflow.correlations == {"MainCorrelationKey": {"order_id": "A-1"}}


# --------------------------------------------------------------------------- deploy time


def test_a_correlation_expression_must_pass_the_sandbox() -> None:
    hostile = "().__class__.__base__.__subclasses__()"
    with pytest.raises(BpmnError, match="element wait_order: correlation property 'order_id' "
                                        "refused"):
        validate_bpmn(ORDER.replace('data["order_id"]', hostile))
    with pytest.raises(BpmnError, match="element wait_order: process correlation 'order_id' "
                                        "refused"):
        validate_bpmn(ORDER.replace("<spiffworkflow:expression>order_id<",
                                    f"<spiffworkflow:expression>{hostile}<"))


# --------------------------------------------------------------------------- the step, in a session


def _start(workflow: str, order_id: str) -> uuid.UUID:
    with session_scope() as session:
        return control.start(session, workflow, new_user(), {"order_id": order_id}, now=NOW)


def _step_all(execution_id: uuid.UUID, version: int, now: dt.datetime) -> None:
    next_version: int | None = version
    while next_version is not None:
        with session_scope() as session:
            next_version = stepper.step(session, execution_id, next_version, now=now).next_version


def _arrive(execution_id: uuid.UUID, order_id: str, total: int, now: dt.datetime) -> uuid.UUID:
    """Ingest's part: store the event for the waiting execution; step it if woken."""
    event_id = uuid.uuid4()
    row = execution(execution_id)
    message = executions.Message(user_id=row.user_id, event_id=event_id,
                                 event_type="order.completed",
                                 payload=_payload(order_id, total, event_id))
    with session_scope() as session:
        woken = executions.wake_waiting(session, [message], now)
    for woken_id, version in woken:
        _step_all(woken_id, version, now)
    return event_id


def _consumed(execution_id: uuid.UUID) -> dict[uuid.UUID, dt.datetime | None]:
    with session_scope() as session:
        return {r.event_id: r.consumed_at for r in session.execute(text(
            "SELECT event_id, consumed_at FROM execution_messages WHERE execution_id = :i"),
            {"i": execution_id})}


def _pending(execution_id: uuid.UUID) -> list[uuid.UUID]:
    with session_scope() as session:
        return [m.event_id for m in executions.pending_messages(session, execution_id)]


@pytest.mark.servers
def test_a_step_leaves_a_message_that_does_not_match_pending_and_catches_the_next() -> None:
    execution_id = _start(deploy("correlated_order.bpmn"), "A-1")
    _step_all(execution_id, 0, NOW)
    assert execution(execution_id).awaiting_events == ["order.completed"]
    other = _arrive(execution_id, "B-2", 1, NOW)
    row = execution(execution_id)
    assert row.status == ExecutionStatus.RUNNING and row.awaiting_events == ["order.completed"]
    assert row.step_enqueued_at is None and nodes(execution_id) == ["start"]
    assert _consumed(execution_id) == {other: None} and _pending(execution_id) == [other]
    mine = _arrive(execution_id, "A-1", 42, LATER)
    done = execution(execution_id)
    assert done.status == ExecutionStatus.COMPLETED, done.error_message
    assert done.variables is not None and done.variables["total"] == 42
    assert nodes(execution_id) == ["start", "wait_order", "thank", "end"]
    assert _consumed(execution_id) == {other: None, mine: LATER}


@pytest.mark.servers
def test_a_message_left_pending_is_caught_by_a_later_wait() -> None:
    execution_id = _start(deploy("two_orders.bpmn"), "A-1")
    _step_all(execution_id, 0, NOW)
    other = _arrive(execution_id, "B-2", 1, NOW)
    mine = _arrive(execution_id, "A-1", 42, LATER)
    done = execution(execution_id)
    assert done.status == ExecutionStatus.COMPLETED, done.error_message
    assert done.variables is not None and done.variables["other"]["data"]["order_id"] == "B-2"
    assert nodes(execution_id) == ["start", "wait_order", "thank", "wait_any", "end"]
    assert _consumed(execution_id) == {other: LATER, mine: LATER} and _pending(execution_id) == []


# --------------------------------------------------------------------------- through real workers


def _email(user_id: uuid.UUID) -> str:
    with session_scope() as session:
        return str(session.execute(text("SELECT email FROM users WHERE id = :u"),
                                   {"u": user_id}).scalar_one())


@pytest.mark.servers
def test_only_the_event_for_this_order_completes_the_wait(celery_worker: WorkerProcess) -> None:
    user_id = new_user()
    execution_id = start(deploy("correlated_order.bpmn"), {"order_id": "A-1"}, user_id=user_id)
    assert wait_waiting(execution_id).awaiting_events == ["order.completed"]
    send_event("order.completed", user=_email(user_id), data={"order_id": "B-2", "total": 1})
    wait_for(lambda: _pending(execution_id) and execution(execution_id).step_enqueued_at is None,
             message="the other order's event to reach the execution and be left pending")
    assert execution(execution_id).status == ExecutionStatus.RUNNING
    assert nodes(execution_id) == ["start"]
    send_event("order.completed", user=_email(user_id), data={"order_id": "A-1", "total": 42})
    done = wait_status(execution_id, "completed", "failed", "cancelled")
    assert done.status == "completed", done.error_message
    assert done.variables is not None and done.variables["total"] == 42
    assert done.variables["order"]["data"] == {"order_id": "A-1", "total": 42}
    assert nodes(execution_id) == ["start", "wait_order", "thank", "end"]
    pending = _pending(execution_id)
    assert len(pending) == 1 and len(_consumed(execution_id)) == 2


def test_an_event_based_gateway_branch_catches_only_its_match() -> None:
    """The gateway holds its branches' definitions; their process correlations still apply."""
    xml = (BPMN / "event_gateway.bpmn").read_text().replace(
        '<bpmn:messageEventDefinition messageRef="order_completed"/>',
        '<bpmn:messageEventDefinition messageRef="order_completed"><bpmn:extensionElements>'
        '<spiffworkflow:processVariableCorrelation><spiffworkflow:propertyId>order_id'
        '</spiffworkflow:propertyId><spiffworkflow:expression>order_id</spiffworkflow:expression>'
        '</spiffworkflow:processVariableCorrelation></bpmn:extensionElements>'
        '</bpmn:messageEventDefinition>').replace(
        '<bpmn:message id="order_completed" name="order.completed">',
        '<bpmn:correlationProperty id="order_id" name="order id">'
        '<bpmn:correlationPropertyRetrievalExpression messageRef="order_completed">'
        '<bpmn:formalExpression>data["order_id"]</bpmn:formalExpression>'
        '</bpmn:correlationPropertyRetrievalExpression></bpmn:correlationProperty>'
        '<bpmn:message id="order_completed" name="order.completed">')
    parsed = validate_bpmn(xml).parsed
    loaded = LoadedSpec(uuid.uuid4(), "1", parsed.process_id, parsed.spec, parsed.subprocess_specs)
    workflow = state.new_workflow(loaded, {"order_id": "A-1", "wait": "PT30S"})
    while (task := runner.next_node(workflow)) is not None:
        runner.run_node(workflow, task)
    now = {"occurred_at": dt.datetime.now(dt.UTC).isoformat()}  # before the gateway's timer
    assert not runner.deliver(workflow, "order.completed", {**_payload("B-2"), **now})
    assert runner.next_node(workflow) is None
    mine = {**_payload("A-1"), **now, "data": {"order_id": "A-1", "amount": 7}}
    assert runner.deliver(workflow, "order.completed", mine)
    assert _run_to_end(workflow) == ["race", "order_done", "ordered", "end_ordered"]
    assert workflow.data["amount"] == 7
