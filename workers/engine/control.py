"""Operator controls of one execution: cancel, pause, resume, retry, complete a human task.

Each locks the execution row (waiting for a running step to finish), checks that
the control applies, has `executions` change it, and returns the version to step
next, if any; the caller sends it after commit.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import (
    TERMINAL_EXECUTION_STATUSES,
    ActionDelivery,
    ExecutionStatus,
    Workflow,
    WorkflowExecution,
)
from workers.engine import executions, state, stepper
from workers.engine.values import Refused, check_storable


class ControlError(ValueError):
    """The execution is not in a state that allows this."""


def _lock(session: Session, execution_id: uuid.UUID) -> WorkflowExecution:
    row = executions.lock(session, execution_id)
    if row is None:
        raise ControlError(f"no execution {execution_id}")
    return row


def cancel(session: Session, execution_id: uuid.UUID, now: dt.datetime | None = None) -> None:
    now = now or dt.datetime.now(dt.UTC)
    row = _lock(session, execution_id)
    if row.status in TERMINAL_EXECUTION_STATUSES:
        raise ControlError(f"execution is already {row.status}")
    executions.cancel(session, row, now)


def pause(session: Session, execution_id: uuid.UUID, now: dt.datetime | None = None) -> None:
    now = now or dt.datetime.now(dt.UTC)
    row = _lock(session, execution_id)
    if row.status in TERMINAL_EXECUTION_STATUSES:
        raise ControlError(f"execution is {row.status}")
    if row.paused_at is not None:
        raise ControlError("execution is already paused")
    executions.pause(row, now)


def resume(session: Session, execution_id: uuid.UUID, now: dt.datetime | None = None) -> int:
    """Unpause; returns the version to step (it runs what is ready or re-reads the waits)."""
    now = now or dt.datetime.now(dt.UTC)
    row = _lock(session, execution_id)
    if row.paused_at is None:
        raise ControlError("execution is not paused")
    return executions.resume(row, now)


def retry(session: Session, execution_id: uuid.UUID, now: dt.datetime | None = None) -> int:
    """Run a failed execution again from its failed node, or a stalled one where it stopped.

    A stalled execution goes on if what stalled it was fixed meanwhile (the engine,
    say); otherwise its step finds it stalled again. Returns the version to step.
    """
    now = now or dt.datetime.now(dt.UTC)
    row = _lock(session, execution_id)
    if row.status != ExecutionStatus.FAILED and row.stalled_at is None:
        raise ControlError("only failed or stalled executions can be retried "
                           f"(this one is {row.status})")
    # The failed node's operator call runs again under a fresh delivery row.
    session.execute(delete(ActionDelivery).where(ActionDelivery.execution_id == row.id,
                                                 ActionDelivery.status == "failed"))
    return executions.retry(row, now)


def complete(session: Session, execution_id: uuid.UUID, node_id: str,
             data: dict[str, Any] | None = None, now: dt.datetime | None = None) -> int | None:
    """Complete the user or manual task `node_id` the execution waits for, with `data`.

    `data` is merged into the task's data (what later nodes see as variables). The
    node runs here, in the caller's transaction, with its history row. Returns the
    version to step next, or None when nothing follows by itself (the workflow ended,
    failed at the node, or waits again).
    """
    now = now or dt.datetime.now(dt.UTC)
    row = _lock(session, execution_id)
    if row.status in TERMINAL_EXECUTION_STATUSES:
        raise ControlError(f"execution is {row.status}: no task waits for completion")
    if row.paused_at is not None:
        raise ControlError("execution is paused: resume it before completing a task")
    exiting = executions.exit_requests(session, [row.id]).get(row.id)
    if exiting is not None:  # its next step (already sent) ends it
        raise ControlError(f"execution is leaving its workflow: {exiting.describe()}")
    waiting = row.awaiting_tasks or []
    if node_id not in waiting:
        raise ControlError(f"node {node_id} is not waiting for completion; "
                           + (f"waiting: {', '.join(waiting)}" if waiting else "none is"))
    values = _checked_data(data or {})
    result = stepper.complete_task(session, row, node_id, values, now)
    if result is None:
        raise ControlError(f"node {node_id} is not ready in the execution's state")
    return result.next_version


def _checked_data(data: dict[str, Any]) -> dict[str, Any]:
    """Task data is stored with the execution: refuse what could not be, naming the key."""
    if not isinstance(data, dict):
        raise ControlError(f"data must be a JSON object, not {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str):
            raise ControlError(f"data key {key!r} is not text")
        try:
            check_storable(f"data {key!r}", value, extra=())
        except Refused as exc:
            raise ControlError(str(exc)) from None
    try:
        state.check_json(data, "the data")
    except state.Unstorable as exc:
        raise ControlError(str(exc)) from None
    return data


RESERVED_VARIABLES = frozenset({"event", "user"})  # set by the fleet at the start


def start(session: Session, workflow_name: str, user_id: uuid.UUID,
          variables: dict[str, Any] | None = None, key: str | None = None,
          now: dt.datetime | None = None) -> uuid.UUID:
    """Start an execution of the workflow's current version by hand (not by a trigger).

    `variables` are its start variables, as a BPMN start would get them (`event` and
    `user` are the fleet's and refused). With a `key` the start happens once per workflow: a repeat returns the first
    execution's id and starts nothing. Returns the id; the caller sends
    `workflows.step(id, 0)` after commit (for a repeat, a no-op once the first ran).
    """
    now = now or dt.datetime.now(dt.UTC)
    reserved = sorted(RESERVED_VARIABLES & set(variables or {}))
    if reserved:
        raise ControlError(f"start variables may not be named {', '.join(reserved)}: the fleet "
                           "sets those itself (the starting event and the user)")
    workflow = session.execute(select(Workflow).where(Workflow.name == workflow_name)
                               ).scalar_one_or_none()
    if workflow is None:
        raise ControlError(f"no workflow named {workflow_name!r}")
    if workflow.status != "active":
        raise ControlError(f"workflow {workflow_name} is {workflow.status}, not active")
    new = executions.NewExecution(workflow_id=workflow.id, workflow_version=workflow.version,
                                  user_id=user_id, variables=variables or {})
    if key is not None:
        return executions.create_keyed(session, new, key, now)
    (started,) = executions.create(session, [new], now)
    return started.id
