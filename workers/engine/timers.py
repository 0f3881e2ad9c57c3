"""Durable timers and the stuck-step reaper: PostgreSQL says what is due, the beat sends it.

Timer waits are a `wake_at` on the execution (docs/architecture.md, decision 4); one due
within the horizon is also sent as a delayed step message by the step that began it
(`stepper._timer_step`), and the sweep is then the recovery path. Both sweeps claim
rows with `FOR UPDATE SKIP LOCKED`, so a second beat or an overlapping run claims
other rows, and stamp `step_enqueued_at` so a lost
send is seen by the next reaper pass. The step's expected version turns any
duplicate into a no-op. The reaper is bounded: an execution it keeps re-sending
without progress fails (`FLEET_STUCK_STEP_MAX_RESENDS`). This module decides what
counts as due or lost; `executions` writes the claims.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import ACTIVE_EXECUTION_STATUSES, ExecutionStatus, sql_list
from workers.engine import executions
from workers.engine.executions import Due
from workers.log import get_logger

log = get_logger(__name__)
REAPER_NODE_TYPE = "Reaper"  # execution_steps.node_type of the reaper's re-sends


SWEEP_GRACE = dt.timedelta(seconds=1)  # a delayed step message is late by more than this


def claim_due_timers(session: Session, now: dt.datetime, limit: int = 1000,
                     grace: dt.timedelta = dt.timedelta(0)) -> Due:
    """Executions whose timer is due: clear `wake_at` and return (id, version) to step.

    With timer messages on (`FLEET_TIMER_MESSAGE_HORIZON`) a timer due soon fires by
    its delayed step message; the sweep then claims only timers overdue by `grace`
    (the message was lost, or the timer was too far ahead to get one), so that it
    does not race every message that is a few milliseconds behind.
    """
    return executions.claim_due_timers(session, now, limit, due_by=now - grace)


def claim_stuck(session: Session, now: dt.datetime, older_than: dt.timedelta,
                limit: int = 1000, *, max_resends: int, retry_chain: dt.timedelta) -> Due:
    """Active executions whose step (or operator call) was sent long ago and never ran.

    Also catches an active execution with nothing sent and nothing to wait for
    (a send lost before it was stamped). A stalled execution is left alone: its
    step ran and found nothing to do, and a re-send would only find that again
    (retry it once fixed). An execution waiting for an operator call
    is left alone for `retry_chain` longer: the call may still be retrying, and a
    re-sent step would start a second chain of the same call.

    Each re-send is an `execution_steps` row (outcome `retrying`, `attempt` = re-sends
    in a row without progress) and a new version, so the lost message, should it
    turn up, is stale. Past `max_resends` the execution fails instead, with the
    reason. Returns (id, version) to re-send.
    """
    rows = executions.claim_stuck(
        session, now, sent_before=now - older_than, chain_before=now - older_than - retry_chain,
        limit=limit, max_resends=max_resends, node_type=REAPER_NODE_TYPE,
        reason=f"step re-sent {max_resends} times without progress")
    for row in rows:
        if row.status == ExecutionStatus.FAILED:
            log.warning("execution.failed", execution_id=str(row.id), error=row.error_message)
    return [(r.id, r.state_version) for r in rows if r.status != ExecutionStatus.FAILED]


def stuck_cutoff(session: Session, base: dt.timedelta, backlog: int) -> dt.timedelta:
    """How old a sent step must be before it counts as lost.

    A step queued behind a backlog is late, not lost: re-sending it would only add
    to the backlog (and a backlog older than `base` would be re-sent in full, again
    and again). So the cutoff is `base` plus the time the fleet needs to work through
    `backlog` queued messages at the pace of its last minute of steps.
    """
    if backlog <= 0:
        return base
    recent = session.execute(text(
        "SELECT count(*) FROM execution_steps WHERE started_at > now() - interval '60 seconds'"
    )).scalar_one()
    return base + dt.timedelta(seconds=backlog / max(recent / 60, 1.0))


def oldest_due_timer(session: Session, now: dt.datetime) -> dt.datetime | None:
    """The oldest `wake_at` that is already due (timer lag = now - this)."""
    return session.execute(text(
        "SELECT min(wake_at) FROM workflow_executions WHERE wake_at <= :now "
        f"AND status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)}) AND paused_at IS NULL"),
        {"now": now}).scalar()
