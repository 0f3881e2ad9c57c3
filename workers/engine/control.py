"""Operator controls of one execution: cancel, pause, resume, retry.

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
from workers.engine import executions


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
    """Run a failed execution again from its failed node; returns the version to step."""
    now = now or dt.datetime.now(dt.UTC)
    row = _lock(session, execution_id)
    if row.status != ExecutionStatus.FAILED:
        raise ControlError(f"only failed executions can be retried (this one is {row.status})")
    # The failed node's operator call runs again under a fresh delivery row.
    session.execute(delete(ActionDelivery).where(ActionDelivery.execution_id == row.id,
                                                 ActionDelivery.status == "failed"))
    return executions.retry(row, now)


def start(session: Session, workflow_name: str, user_id: uuid.UUID,
          variables: dict[str, Any] | None = None, now: dt.datetime | None = None) -> uuid.UUID:
    """Start an execution of the workflow's current version by hand (not by a trigger).

    Returns its id; the caller sends `workflows.step(id, 0)` after commit.
    """
    now = now or dt.datetime.now(dt.UTC)
    workflow = session.execute(select(Workflow).where(Workflow.name == workflow_name)
                               ).scalar_one_or_none()
    if workflow is None:
        raise ControlError(f"no workflow named {workflow_name!r}")
    if workflow.status != "active":
        raise ControlError(f"workflow {workflow_name} is {workflow.status}, not active")
    (started,) = executions.create(session, [executions.NewExecution(
        workflow_id=workflow.id, workflow_version=workflow.version, user_id=user_id,
        variables=variables or {})], now)
    return started.id
