"""`stepper.step` as a service: a real session and database, a fixed clock, no worker.

Each test starts an execution, calls `step` directly (one transaction per call, as
the task does) and reads back what it wrote: the execution row, its history and the
result that tells the task what to send after commit. Nothing is sent and nothing
is polled for.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from SpiffWorkflow.util.task import TaskState
from sqlalchemy import text

from db.models import ActionDelivery, ExecutionStatus, StepOutcome
from db.session import session_scope
from tests.workflow_helpers import BPMN, deploy, deploy_xml, execution, history, new_user, nodes
from workers.engine import control, executions, runner, sandbox, state, stepper, timers
from workers.engine.stepper import StepResult

pytestmark = pytest.mark.servers

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)
SCORE = (BPMN / "score_gateway.bpmn").read_text()


def _start(workflow: str, variables: dict[str, Any] | None = None) -> uuid.UUID:
    with session_scope() as session:
        return control.start(session, workflow, new_user(), variables, now=NOW)


def _step(execution_id: uuid.UUID, version: int, now: dt.datetime = NOW) -> StepResult:
    with session_scope() as session:
        return stepper.step(session, execution_id, version, now=now)


def _run(execution_id: uuid.UUID, version: int = 0, now: dt.datetime = NOW) -> list[StepResult]:
    """Step as the task chain would, until a step asks for no next one."""
    results = [_step(execution_id, version, now)]
    while (version_next := results[-1].next_version) is not None:
        results.append(_step(execution_id, version_next, now))
    return results


def _steps(execution_id: uuid.UUID) -> list[tuple[int, str, str, str, dt.datetime]]:
    with session_scope() as session:
        return [tuple(r) for r in session.execute(text(
            "SELECT seq, node_id, node_type, outcome, started_at FROM execution_steps "
            "WHERE execution_id = :i ORDER BY seq"), {"i": execution_id})]


# --------------------------------------------------------------------------- no-ops


def test_a_stale_or_duplicate_step_changes_nothing() -> None:
    execution_id = _start(deploy("score_gateway.bpmn"), {"base": 7})
    first = _step(execution_id, 0)
    assert (first.outcome, first.node_id, first.next_version) == ("completed", "start", 1)
    before = execution(execution_id)
    for version in (0, 5):  # the same message again, and one from no step that ran
        result = _step(execution_id, version, LATER)
        assert result.outcome == "noop" and result.next_version is None
        assert result.reason == f"stale step {version}, execution is at 1"
    after = execution(execution_id)
    assert (after.state_version, after.updated_at, after.engine_state) == \
        (before.state_version, before.updated_at, before.engine_state)
    assert history(execution_id) == [(1, "start", "completed")]


def test_a_paused_or_ended_execution_is_not_stepped() -> None:
    name = deploy("score_gateway.bpmn")
    paused, cancelled = _start(name, {"base": 7}), _start(name, {"base": 7})
    with session_scope() as session:
        control.pause(session, paused, now=NOW)
        control.cancel(session, cancelled, now=NOW)
    assert _step(paused, 0) == StepResult("noop", reason="execution is paused")
    assert _step(cancelled, 1) == StepResult("noop", reason="execution is cancelled")
    assert _step(uuid.uuid4(), 0) == StepResult("noop", reason="no such execution")
    assert history(paused) == [] and history(cancelled) == [(1, "-", "cancelled")]


# --------------------------------------------------------------------------- nodes


def test_a_script_task_writes_its_variables_and_one_history_row() -> None:
    execution_id = _start(deploy("score_gateway.bpmn"), {"base": 7})
    _step(execution_id, 0)
    result = _step(execution_id, 1)
    assert result == StepResult("completed", node_id="compute", next_version=2)
    row = execution(execution_id)
    assert row.status == ExecutionStatus.RUNNING and row.current_node_id == "compute"
    assert row.variables is not None
    assert (row.variables["score"], row.variables["tags"]) == (14, ["A", "B"])
    assert row.state_version == 2 and row.updated_at == NOW and row.step_enqueued_at == NOW
    assert _steps(execution_id)[-1] == (2, "compute", "ScriptTask", StepOutcome.COMPLETED, NOW)


@pytest.mark.parametrize(("base", "route"), [(7, "high"), (2, "low")])
def test_an_exclusive_gateway_takes_the_branch_its_condition_names(base: int, route: str) -> None:
    execution_id = _start(deploy("score_gateway.bpmn"), {"base": base})
    results = _run(execution_id)
    assert nodes(execution_id) == ["start", "compute", "decide", route, f"end_{route}"]
    assert [r.node_id for r in results] == nodes(execution_id)
    assert _steps(execution_id)[2][1:4] == ("decide", "ExclusiveGateway", "completed")
    assert execution(execution_id).variables["route"] == route  # type: ignore[index]


def test_an_end_event_completes_the_execution() -> None:
    execution_id = _start(deploy("score_gateway.bpmn"), {"base": 7})
    results = _run(execution_id)
    assert results[-1] == StepResult("completed", node_id="end_high", next_version=None)
    row = execution(execution_id)
    assert row.status == ExecutionStatus.COMPLETED and row.completed_at == NOW
    assert row.current_node_id == "end_high" and row.state_version == 5
    assert row.step_enqueued_at is None and row.wake_at is None and row.awaiting_events is None
    assert [seq for seq, *_ in _steps(execution_id)] == [1, 2, 3, 4, 5]
    assert _step(execution_id, 5) == StepResult("noop", reason="execution is completed")


def test_a_timer_wait_sets_wake_at_and_asks_for_no_step() -> None:
    due = dt.datetime(2031, 6, 1, 12, 0, tzinfo=dt.UTC)
    execution_id = _start(deploy("engine_timer.bpmn"), {"due": due.isoformat()})
    results = _run(execution_id)
    assert results[-1].next_version is None
    row = execution(execution_id)
    assert row.status == ExecutionStatus.RUNNING and row.wake_at == due
    assert row.step_enqueued_at is None and row.awaiting_events is None
    with session_scope() as session:  # the beat's sweep: due at `due`, not a second before
        assert executions.claim_due_timers(session, due - dt.timedelta(seconds=1), 10) == []
        assert executions.claim_due_timers(session, due, 10) == [(execution_id, row.state_version)]
    assert execution(execution_id).wake_at is None


def test_a_message_wait_records_the_event_type_and_a_delivered_message_moves_on() -> None:
    execution_id = _start(deploy("wait_for_message.bpmn"))
    _run(execution_id)
    row = execution(execution_id)
    assert row.awaiting_events == ["test.never_sent"] and row.wake_at is None
    assert row.status == ExecutionStatus.RUNNING and row.step_enqueued_at is None
    event_id = uuid.uuid4()
    message = executions.Message(
        user_id=row.user_id, event_id=event_id, event_type="test.never_sent",
        payload={"event_id": str(event_id), "event_type": "test.never_sent", "data": {},
                 "occurred_at": NOW.isoformat()})
    with session_scope() as session:
        woken = executions.wake_waiting(session, [message], NOW)
    assert woken == [(execution_id, row.state_version)]
    assert execution(execution_id).step_enqueued_at == NOW
    _run(execution_id, row.state_version, LATER)
    done = execution(execution_id)
    assert done.status == ExecutionStatus.COMPLETED and done.completed_at == LATER
    assert "wait" in nodes(execution_id) and done.awaiting_events is None
    with session_scope() as session:
        consumed = session.execute(text("SELECT consumed_at FROM execution_messages "
                                        "WHERE execution_id = :i"), {"i": execution_id}).all()
    assert [tuple(r) for r in consumed] == [(LATER,)]


def test_a_service_task_records_its_operator_call_then_completes_with_its_result() -> None:
    execution_id = _start(deploy("engine_webhook.bpmn"), {"hook_url": "http://127.0.0.1:9/"})
    _step(execution_id, 0)
    asked = _step(execution_id, 1)
    key = f"{execution_id}:"
    assert asked.outcome == "waiting" and asked.node_id == "notify"
    assert asked.next_version is None and (asked.action_key or "").startswith(key)
    row = execution(execution_id)
    assert row.state_version == 2 and row.step_enqueued_at == NOW  # the reaper watches the call
    assert _steps(execution_id)[-1][1:4] == ("notify", "ServiceTask", "waiting")
    with session_scope() as session:
        delivery = session.get(ActionDelivery, asked.action_key)
        assert delivery is not None and delivery.status == "pending"
        assert delivery.operator == "send_webhook" and delivery.node_id == "notify"
        assert delivery.params["url"] == "http://127.0.0.1:9/"
    # A step while the call is pending asks for it again, changing nothing else.
    assert _step(execution_id, 2, LATER) == StepResult("waiting", node_id="notify",
                                                       action_key=asked.action_key)
    assert execution(execution_id).step_enqueued_at == LATER
    assert execution(execution_id).state_version == 2
    with session_scope() as session:  # the operator ran (as `actions.run_action` records it)
        delivery = session.get(ActionDelivery, asked.action_key)
        assert delivery is not None
        delivery.status, delivery.result, delivery.finished_at = "succeeded", {"status": 200}, NOW
    done = _step(execution_id, 2)
    assert done.outcome == "completed" and done.node_id == "notify"
    _run(execution_id, 3)
    assert execution(execution_id).status == ExecutionStatus.COMPLETED
    assert nodes(execution_id) == ["start", "notify", "after", "end"]


# --------------------------------------------------------------------------- failures


def test_a_node_that_raises_fails_the_execution_at_that_node() -> None:
    execution_id = _start(deploy("score_gateway.bpmn"))  # no `base`: the script raises
    results = _run(execution_id)
    assert results[-1] == StepResult("failed", node_id="compute")
    row = execution(execution_id)
    assert row.status == ExecutionStatus.FAILED and row.current_node_id == "compute"
    assert "node compute" in (row.error_message or "") and "base" in (row.error_message or "")
    assert row.completed_at == NOW and row.step_enqueued_at is None and row.wake_at is None
    assert _steps(execution_id)[-1] == (2, "compute", "ScriptTask", StepOutcome.FAILED, NOW)
    assert _step(execution_id, 2) == StepResult("noop", reason="execution is failed")


def test_state_that_cannot_be_saved_fails_its_node() -> None:
    xml = SCORE.replace("score = base * 2", "a = []\na.append(a)\nscore = base * 2")
    execution_id = _start(deploy_xml(xml), {"base": 1})
    results = _run(execution_id)
    assert results[-1] == StepResult("failed", node_id="compute")
    row = execution(execution_id)
    assert row.status == ExecutionStatus.FAILED and row.current_node_id == "compute"
    assert "contain itself" in (row.error_message or "")
    assert history(execution_id) == [(1, "start", "completed"), (2, "compute", "failed")]


def test_state_postgresql_refuses_is_rolled_back_and_fails_its_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past every Python check, PostgreSQL itself refuses the state (a NUL in jsonb)."""
    monkeypatch.setattr(sandbox, "_refuse_unstorable", lambda variables: None)
    monkeypatch.setattr(state, "check_json", lambda value, what: None)
    xml = SCORE.replace("score = base * 2", "z = 'a\\x00b'\nscore = base * 2")
    execution_id = _start(deploy_xml(xml), {"base": 1})
    results = _run(execution_id)
    assert results[-1] == StepResult("failed", node_id="compute")
    row = execution(execution_id)
    assert row.status == ExecutionStatus.FAILED and row.current_node_id == "compute"
    assert "node compute: the execution's state cannot be saved" in (row.error_message or "")
    assert "z" not in (row.variables or {})  # the refused write was rolled back
    assert _steps(execution_id)[-1] == (2, "compute", "ScriptTask", StepOutcome.FAILED, NOW)


# --------------------------------------------------------------------------- human tasks


def _reaped(execution_id: uuid.UUID, *, unstalled: bool = False) -> bool:
    """Whether the reaper's sweep a month on would claim the execution (rolled back after).

    `unstalled`: as if its stall mark were not there (what the mark changes).
    """
    with session_scope() as session:
        if unstalled:
            session.execute(text("UPDATE workflow_executions SET stalled_at = NULL WHERE id = :i"),
                            {"i": execution_id})
        claimed = timers.claim_stuck(session, LATER + dt.timedelta(days=30),
                                     dt.timedelta(minutes=10), max_resends=3,
                                     retry_chain=dt.timedelta(0))
        session.rollback()  # other tests' executions are in the same database
    return execution_id in [claimed_id for claimed_id, _ in claimed]


def test_a_plain_task_passes_through_in_one_step() -> None:
    execution_id = _start(deploy("plain_task.bpmn"))
    results = _run(execution_id)
    assert [r.node_id for r in results] == ["start", "review", "after", "end"]
    assert _steps(execution_id)[1] == (2, "review", "NoneTask", StepOutcome.COMPLETED, NOW)
    row = execution(execution_id)
    assert row.status == ExecutionStatus.COMPLETED and row.variables["reviewed"] is True  # type: ignore[index]


def test_a_user_task_waits_with_nothing_in_flight_until_completed_with_data() -> None:
    execution_id = _start(deploy("user_task.bpmn"))
    assert _run(execution_id) == [StepResult("completed", node_id="start")]  # then it rests
    row = execution(execution_id)
    assert row.status == ExecutionStatus.RUNNING and row.awaiting_tasks == ["approve"]
    assert row.step_enqueued_at is None and row.wake_at is None and row.awaiting_events is None
    assert row.stalled_at is None and row.state_version == 1
    assert history(execution_id) == [(1, "start", "completed")]
    assert not _reaped(execution_id)  # the reaper does not re-send a step to a human wait
    with session_scope() as session:
        version = control.complete(session, execution_id, "approve",
                                   {"approved": True, "amount": 30}, now=LATER)
    assert version == 2
    row = execution(execution_id)
    assert row.awaiting_tasks is None and row.step_enqueued_at == LATER
    assert _steps(execution_id)[-1] == (2, "approve", "UserTask", StepOutcome.COMPLETED, LATER)
    _run(execution_id, version, LATER)
    done = execution(execution_id)
    assert done.status == ExecutionStatus.COMPLETED
    assert (done.variables or {})["refunded"] == 30
    assert nodes(execution_id) == ["start", "approve", "decide", "refund", "end_refunded"]


def test_completing_a_node_that_does_not_wait_is_refused_with_the_nodes_that_do() -> None:
    execution_id = _start(deploy("user_task.bpmn"))
    _run(execution_id)
    before = execution(execution_id)
    for node, data, message in [
            ("refund", None, "node refund is not waiting for completion; waiting: approve"),
            ("approve", {"x": float("nan")}, "data 'x' holds"),
            ("approve", {"x": "a\x00b"}, "data 'x' holds")]:
        with pytest.raises(control.ControlError, match=message), session_scope() as session:
            control.complete(session, execution_id, node, data, now=LATER)
    with session_scope() as session:
        control.pause(session, execution_id, now=NOW)
    with pytest.raises(control.ControlError, match="paused"), session_scope() as session:
        control.complete(session, execution_id, "approve", now=LATER)
    with session_scope() as session:
        control.cancel(session, execution_id, now=NOW)
    with pytest.raises(control.ControlError, match="execution is cancelled"), \
            session_scope() as session:
        control.complete(session, execution_id, "approve", now=LATER)
    after = execution(execution_id)
    assert after.engine_state == before.engine_state
    assert history(execution_id) == [(1, "start", "completed"), (2, "start", "cancelled")]


def test_a_manual_task_waits_and_completes_the_same_way() -> None:
    execution_id = _start(deploy("manual_task.bpmn"))
    _run(execution_id)
    assert execution(execution_id).awaiting_tasks == ["ship"]
    with pytest.raises(control.ControlError, match="node end is not waiting"), \
            session_scope() as session:
        control.complete(session, execution_id, "end", now=LATER)
    with session_scope() as session:
        version = control.complete(session, execution_id, "ship", {"carrier": "post"}, now=LATER)
    assert version is not None
    _run(execution_id, version, LATER)
    done = execution(execution_id)
    assert done.status == ExecutionStatus.COMPLETED and done.awaiting_tasks is None
    assert (done.variables or {})["carrier"] == "post"
    assert _steps(execution_id)[1][1:3] == ("ship", "ManualTask")


# --------------------------------------------------------------------------- stalls


def test_a_workflow_that_can_never_go_on_is_marked_stalled_and_left_alone() -> None:
    execution_id = _start(deploy("stall_join.bpmn"))
    results = _run(execution_id)
    assert [r.node_id for r in results] == ["start", "split", "a"]
    last = results[-1]
    assert last.outcome == "stalled" and last.next_version is None and last.action_key is None
    row = execution(execution_id)
    assert row.status == ExecutionStatus.RUNNING and row.stalled_at == NOW
    assert row.error_message == last.reason
    assert (row.error_message or "").startswith("stalled at node a: no node is ready")
    assert "join (waiting)" in (row.error_message or "")
    assert row.step_enqueued_at is None and row.wake_at is None
    assert row.awaiting_events is None and row.awaiting_tasks is None
    assert _steps(execution_id)[-1] == (4, "a", "Stalled", StepOutcome.STALLED, NOW)
    # The reaper's claim skips it, however long it sits there (it would not, unmarked).
    assert not _reaped(execution_id) and _reaped(execution_id, unstalled=True)
    assert execution(execution_id).state_version == 4


def test_a_step_that_finds_nothing_to_do_marks_the_stall() -> None:
    """As after a lost send of a stalled node's successor: the step itself sees the stall."""
    execution_id = _start(deploy("stall_join.bpmn"))
    _run(execution_id)
    with session_scope() as session:
        version = control.retry(session, execution_id, now=LATER)
    assert execution(execution_id).stalled_at is None
    again = _step(execution_id, version, LATER)
    assert again.outcome == "stalled" and again.node_id is None
    row = execution(execution_id)
    assert row.stalled_at == LATER and row.state_version == version + 1
    assert _steps(execution_id)[-1][1:4] == ("a", "Stalled", StepOutcome.STALLED)


def test_retry_of_a_stalled_execution_steps_it_again_once_fixed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that runs no plain task (as SpiffWorkflow's own loop) stalls before it;
    once the engine is fixed, retry lets the execution go on."""
    monkeypatch.setattr(runner, "_ready", lambda workflow: workflow.get_tasks_iterator(
        state=TaskState.READY, manual=False))
    execution_id = _start(deploy("plain_task.bpmn"))
    assert _run(execution_id)[-1].outcome == "stalled"
    assert (execution(execution_id).error_message or "").startswith("stalled at node start")
    monkeypatch.undo()
    with pytest.raises(control.ControlError, match="only failed or stalled"), \
            session_scope() as session:
        control.retry(session, _start(deploy("user_task.bpmn")), now=LATER)
    with session_scope() as session:
        version = control.retry(session, execution_id, now=LATER)
    row = execution(execution_id)
    assert row.status == ExecutionStatus.RUNNING and row.stalled_at is None
    assert row.error_message is None and row.step_enqueued_at == LATER
    _run(execution_id, version, LATER)
    done = execution(execution_id)
    assert done.status == ExecutionStatus.COMPLETED and done.stalled_at is None
    assert nodes(execution_id) == ["start", "review", "after", "end"]
    assert [node_type for _, _, node_type, _, _ in _steps(execution_id)][1] == "Stalled"


def test_an_execution_that_keeps_stepping_fails_at_its_step_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop with no exit (or a cycle deploy missed) fails visibly instead of for ever."""
    settings = stepper.get_settings().model_copy(update={"max_execution_steps": 5})
    monkeypatch.setattr(stepper, "get_settings", lambda: settings)
    execution_id = _start(deploy("loop.bpmn"), {"iterations": 1000})
    results = _run(execution_id)
    assert [r.outcome for r in results][-1] == "failed" and len(results) == 6
    row = execution(execution_id)
    assert row.status == ExecutionStatus.FAILED and row.state_version == 6
    assert row.error_message is not None and "ran 5 steps without ending" in row.error_message
    assert "FLEET_MAX_EXECUTION_STEPS=5" in row.error_message
    assert _steps(execution_id)[-1][2:4] == ("Budget", StepOutcome.FAILED)
