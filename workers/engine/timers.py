"""Durable timers and the stuck-step reaper: PostgreSQL says what is due, the beat sends it.

Timer waits are a `wake_at` on the execution (DESIGN decision 4), never a Celery
countdown. Both sweeps claim rows with `FOR UPDATE SKIP LOCKED`, so a second beat
or an overlapping run claims other rows, and stamp `step_enqueued_at` so a lost
send is seen by the next reaper pass. The step's expected version turns any
duplicate into a no-op. The reaper is bounded: an execution it keeps re-sending
without progress fails (`FLEET_STUCK_STEP_MAX_RESENDS`).
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import text
from sqlalchemy.orm import Session

from workers.log import get_logger

log = get_logger(__name__)
Due = list[tuple[uuid.UUID, int]]
REAPER_NODE_TYPE = "Reaper"  # execution_steps.node_type of the reaper's re-sends


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
                limit: int = 1000, *, max_resends: int, retry_chain: dt.timedelta) -> Due:
    """Active executions whose step (or operator call) was sent long ago and never ran.

    Also catches an active execution with nothing sent and nothing to wait for
    (a send lost before it was stamped). An execution waiting for an operator call
    is left alone for `retry_chain` longer: the call may still be retrying, and a
    re-sent step would start a second chain of the same call.

    Each re-send is an `execution_steps` row (outcome `retrying`, `attempt` = re-sends
    in a row without progress) and a new version, so the lost message, should it
    turn up, is stale. Past `max_resends` the execution fails instead, with the
    reason. Returns (id, version) to re-send.
    """
    rows = session.execute(text(
        "WITH stuck AS ("
        "  SELECT e.id, COALESCE((SELECT s.attempt FROM execution_steps s "
        "    WHERE s.execution_id = e.id AND s.seq = e.state_version "
        "    AND s.outcome = 'retrying' AND s.node_type = :kind), 0) + 1 AS resends "
        "  FROM workflow_executions e "
        "  WHERE e.status IN ('pending', 'running') AND e.paused_at IS NULL AND ("
        "    (e.step_enqueued_at < :cutoff AND (e.step_enqueued_at < :chain_cutoff OR NOT EXISTS ("
        "      SELECT 1 FROM action_deliveries d "
        "      WHERE d.execution_id = e.id AND d.status = 'pending'))) "
        "    OR (e.step_enqueued_at IS NULL AND e.wake_at IS NULL "
        "        AND e.awaiting_events IS NULL AND e.updated_at < :cutoff)) "
        "  ORDER BY e.step_enqueued_at NULLS FIRST LIMIT :limit FOR UPDATE OF e SKIP LOCKED"
        "), moved AS ("
        "  UPDATE workflow_executions e SET state_version = e.state_version + 1, "
        "    updated_at = :now, "
        "    status = CASE WHEN s.resends > :max THEN 'failed' ELSE e.status END, "
        "    error_message = CASE WHEN s.resends > :max THEN 'node ' || "
        "      COALESCE(e.current_node_id, '-') || ': ' || :reason ELSE e.error_message END, "
        "    completed_at = CASE WHEN s.resends > :max THEN :now ELSE e.completed_at END, "
        "    wake_at = CASE WHEN s.resends > :max THEN NULL ELSE e.wake_at END, "
        "    step_enqueued_at = CASE WHEN s.resends > :max THEN NULL ELSE :now END "
        "  FROM stuck s WHERE e.id = s.id "
        "  RETURNING e.id, e.state_version, e.status, e.error_message, s.resends, "
        "    COALESCE(e.current_node_id, '-') AS node_id"
        "), history AS ("
        "  INSERT INTO execution_steps (execution_id, seq, node_id, node_type, outcome, "
        "    attempt, started_at, finished_at, error_message) "
        "  SELECT id, state_version, node_id, :kind, "
        "    CASE WHEN status = 'failed' THEN 'failed' ELSE 'retrying' END, "
        "    resends, :now, :now, CASE WHEN status = 'failed' THEN error_message END "
        "  FROM moved"
        ") SELECT id, state_version, status, error_message FROM moved"),
        {"now": now, "cutoff": now - older_than, "chain_cutoff": now - older_than - retry_chain,
         "limit": limit, "max": max_resends, "kind": REAPER_NODE_TYPE,
         "reason": f"step re-sent {max_resends} times without progress"}).all()
    for row in rows:
        if row.status == "failed":
            log.warning("execution.failed", execution_id=str(row.id), error=row.error_message)
    return [(r.id, r.state_version) for r in rows if r.status != "failed"]


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
