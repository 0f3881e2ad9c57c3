"""Durable timers and the stuck-step reaper: PostgreSQL says what is due, the beat sends it.

Timer waits are a `wake_at` on the execution (DESIGN decision 4), never a Celery
countdown. Both sweeps claim rows with `FOR UPDATE SKIP LOCKED`, so a second beat
or an overlapping run claims other rows, and stamp `step_enqueued_at` so a lost
send is seen by the next reaper pass. The step's expected version turns any
duplicate into a no-op.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import text
from sqlalchemy.orm import Session

Due = list[tuple[uuid.UUID, int]]


def claim_due_timers(session: Session, now: dt.datetime, limit: int = 1000) -> Due:
    """Executions whose timer is due: clear `wake_at` and return (id, version) to step."""
    rows = session.execute(text(
        "UPDATE workflow_executions e SET wake_at = NULL, step_enqueued_at = :now "
        "FROM (SELECT id FROM workflow_executions WHERE wake_at <= :now "
        "      AND status IN ('pending', 'running') AND paused_at IS NULL "
        "      ORDER BY wake_at LIMIT :limit FOR UPDATE SKIP LOCKED) due "
        "WHERE e.id = due.id RETURNING e.id, e.state_version"),
        {"now": now, "limit": limit}).all()
    return [(r.id, r.state_version) for r in rows]


def claim_stuck(session: Session, now: dt.datetime, older_than: dt.timedelta,
                limit: int = 1000) -> Due:
    """Active executions whose step (or operator call) was sent long ago and never ran.

    Also catches an active execution with nothing sent and nothing to wait for
    (a send lost before it was stamped). Returns (id, version) to re-send.
    """
    rows = session.execute(text(
        "UPDATE workflow_executions e SET step_enqueued_at = :now "
        "FROM (SELECT id FROM workflow_executions "
        "      WHERE status IN ('pending', 'running') AND paused_at IS NULL AND ("
        "        step_enqueued_at < :cutoff OR (step_enqueued_at IS NULL AND wake_at IS NULL "
        "        AND awaiting_events IS NULL AND updated_at < :cutoff)) "
        "      ORDER BY step_enqueued_at NULLS FIRST LIMIT :limit FOR UPDATE SKIP LOCKED) stuck "
        "WHERE e.id = stuck.id RETURNING e.id, e.state_version"),
        {"now": now, "cutoff": now - older_than, "limit": limit}).all()
    return [(r.id, r.state_version) for r in rows]


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
        "AND status IN ('pending', 'running') AND paused_at IS NULL"), {"now": now}).scalar()
