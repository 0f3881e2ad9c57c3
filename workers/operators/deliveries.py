"""Run one service-task operator call (actions queue), exactly once per idempotency key.

The `action_deliveries` row is locked for the call, so two copies of one action
message run one after the other and the second finds the row done. Database
operators commit their effect with the row's `succeeded`; the caller then sends
the execution's next step.

A send the gateway puts off (outside the user's send window) leaves the row
`deferred` with `run_after`, and the execution waiting on a durable timer
(`executions.defer`): when it is due, the execution's step sends the call again
(workers/engine/stepper.py), and the operator and its gateway run once more.

No call runs for an execution that has ended or has an exit requested (its goal was
reached: workers/events/exits.py): checked in the call's own transaction, before the
operator, and again, under the execution's row lock, before a send is deferred. Such a
call is `failed` with the reason, and a send deferred earlier is recorded `dropped`.
An exit whose goal commits while the operator is running is not seen by it: that
send was decided before the goal was recorded.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import TERMINAL_EXECUTION_STATUSES, ActionDelivery, WorkflowExecution
from workers.engine import executions
from workers.events.ingest import IngestResult
from workers.log import get_logger
from workers.operators.context import Deferred, OperatorContext, OperatorError
from workers.operators.registry import OPERATORS
from workers.sends.gateway import drop_deferred

log = get_logger(__name__)


@dataclass(frozen=True)
class ActionResult:
    """What a call decided; the caller sends its follow-up work after the commit."""

    status: Literal["succeeded", "failed", "skipped", "missing", "deferred"]
    execution_id: uuid.UUID | None = None
    step_version: int | None = None  # send workflows.step(execution_id, step_version)
    ingested: tuple[IngestResult, ...] = ()  # ingests of the events the operator emitted
    send: tuple[str, str] | None = None  # (channel, outcome) of the send gateway's decision


def _step_after(session: Session, execution_id: uuid.UUID) -> int | None:
    row = session.execute(select(WorkflowExecution.state_version, WorkflowExecution.status,
                                 WorkflowExecution.paused_at)
                          .where(WorkflowExecution.id == execution_id)).one_or_none()
    if row is None or row.status in TERMINAL_EXECUTION_STATUSES or row.paused_at is not None:
        return None
    return int(row.state_version)


def run_action(session: Session, key: str, now: dt.datetime | None = None) -> ActionResult:
    """Run the operator of delivery `key` unless it already ran; errors propagate (retry)."""
    now = now or dt.datetime.now(dt.UTC)
    delivery = session.execute(
        select(ActionDelivery).where(ActionDelivery.key == key).with_for_update()
    ).scalar_one_or_none()
    if delivery is None:
        return ActionResult("missing")
    if delivery.status == "deferred" and (delivery.run_after or now) > now + executions.DEFERRED_GRACE:
        return ActionResult("skipped")  # an early copy: the execution's timer runs it again
    if delivery.status not in ("pending", "deferred"):  # a redelivery: the effect happened
        return ActionResult("skipped", delivery.execution_id,
                            _step_after(session, delivery.execution_id))
    execution = session.get(WorkflowExecution, delivery.execution_id)
    if execution is None or execution.status in TERMINAL_EXECUTION_STATUSES:
        _drop(session, delivery, "execution ended before the operator ran", now)
        return ActionResult("failed", delivery.execution_id)
    exiting = executions.exit_requests(session, [execution.id]).get(execution.id)
    if exiting is not None:  # a call queued before the goal: its execution's next step ends it
        _drop(session, delivery, f"dropped: the execution exited ({exiting.describe()})", now)
        return ActionResult("failed", execution.id, _step_after(session, execution.id))
    operator = OPERATORS.get(delivery.operator)
    if operator is None:
        raise OperatorError(f"no operator named {delivery.operator!r} in this worker")
    ctx = OperatorContext(session=session, execution_id=execution.id,
                          workflow_id=execution.workflow_id, user_id=execution.user_id,
                          node_id=delivery.node_id, key=key, now=now)
    delivery.attempts += 1
    try:
        result = operator(ctx, dict(delivery.params))
    except Deferred as deferral:
        session.refresh(execution, with_for_update=True)  # a step of it may be writing
        ended = execution.status in TERMINAL_EXECUTION_STATUSES
        exiting = None if ended else executions.exit_requests(session, [execution.id]).get(
            execution.id)
        if ended or exiting is not None:  # an exit came meanwhile: the send never goes out
            why = exiting.describe() if exiting is not None else f"it is {execution.status}"
            delivery.status, delivery.run_after = "deferred", deferral.until
            _drop(session, delivery, f"dropped: the execution exited ({why})", now)
            ctx.send = (ctx.send[0], "dropped") if ctx.send else None
            return ActionResult("failed", execution.id,
                                None if ended else _step_after(session, execution.id),
                                send=ctx.send)
        delivery.status, delivery.run_after = "deferred", deferral.until
        delivery.send_outcome = "deferred"
        executions.defer(execution, deferral.until, now)
        log.info("action.deferred", execution_id=str(execution.id), operator=delivery.operator,
                 node_id=delivery.node_id, until=deferral.until.isoformat())
        return ActionResult("deferred", execution.id, send=ctx.send)
    delivery.status, delivery.result, delivery.finished_at = "succeeded", result, now
    delivery.send_outcome = ctx.send[1] if ctx.send else None
    log.info("action.succeeded", execution_id=str(execution.id), operator=delivery.operator,
             node_id=delivery.node_id)
    return ActionResult("succeeded", execution.id, _step_after(session, execution.id),
                        tuple(ctx.ingested), ctx.send)


def _drop(session: Session, delivery: ActionDelivery, why: str, now: dt.datetime) -> None:
    """The call will never run: failed with the reason; a deferred send becomes `dropped`."""
    if delivery.status == "deferred":
        delivery.send_outcome = "dropped"
        drop_deferred(session, [delivery.key], why, now)
    delivery.status, delivery.finished_at, delivery.error_message = "failed", now, why


def fail_action(session: Session, key: str, error: str, attempts: int,
                now: dt.datetime | None = None) -> ActionResult:
    """Give up on a delivery (permanent error, or retries exhausted); the next step fails the node."""
    now = now or dt.datetime.now(dt.UTC)
    delivery = session.execute(
        select(ActionDelivery).where(ActionDelivery.key == key).with_for_update()
    ).scalar_one_or_none()
    if delivery is None or delivery.status != "pending":
        return ActionResult("skipped")
    delivery.status, delivery.error_message = "failed", error[:2000]
    delivery.attempts, delivery.finished_at = attempts, now
    log.warning("action.failed", execution_id=str(delivery.execution_id),
                operator=delivery.operator, error=error)
    return ActionResult("failed", delivery.execution_id,
                        _step_after(session, delivery.execution_id))
