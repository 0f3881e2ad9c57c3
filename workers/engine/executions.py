"""The one writer of executions, their step history, the messages they wait for, their exits.

Every change of `workflow_executions`, `execution_steps`, `execution_messages` and
`execution_exits` goes through these functions, so the rules that hold across the tables live in one
place: a history row's `seq` is the execution's new `state_version` (gap-free per
execution); an execution that ends waits for nothing and has no step on its way;
`step_enqueued_at` is stamped whenever a step or an operator call is on its way
(the reaper watches it). Callers decide what happens (the stepper, the controls,
ingest, the timer sweeps); these functions write it in the caller's transaction
and never commit or send.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import Connection, Row, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.models import (
    ACTIVE_EXECUTION_STATUSES,
    TERMINAL_EXECUTION_STATUSES,
    ExecutionMessage,
    ExecutionStatus,
    ExecutionStep,
    ExitReason,
    StepOutcome,
    WorkflowExecution,
    sql_list,
)
from workers.durations import parse_lookback

MAX_ERROR = 2000  # characters of an error message kept on the execution and its step
STALL_NODE_TYPE = "Stalled"  # execution_steps.node_type of the row that marks a stall
EXIT_NODE_TYPE = "Exit"  # ... of the row that ends an execution by a goal exit or exit_when
Due = list[tuple[uuid.UUID, int]]  # (execution, version) to step
_ACTIVE = sql_list(ACTIVE_EXECUTION_STATUSES)


# --------------------------------------------------------------------------- start and wake


@dataclass(frozen=True)
class NewExecution:
    workflow_id: uuid.UUID
    workflow_version: str | None
    user_id: uuid.UUID
    variables: dict[str, Any]
    trigger_id: uuid.UUID | None = None
    source_event_id: uuid.UUID | None = None
    single_active: bool = False  # the trigger allows one active execution per user
    start_key: str | None = None  # unique per workflow: a second start with it creates nothing


class Started(NamedTuple):
    id: uuid.UUID
    trigger_id: uuid.UUID | None
    source_event_id: uuid.UUID | None


def create(session: Session, new: Sequence[NewExecution], now: dt.datetime) -> list[Started]:
    """Insert pending executions in one statement; the unique indexes drop racing duplicates.

    Returns the executions created (a dropped duplicate is not among them); each is
    stamped as sent: the caller sends its first step, `workflows.step(id, 0)`, after commit.
    """
    if not new:
        return []
    rows = session.execute(CREATE, {
        "workflows": [n.workflow_id for n in new], "versions": [n.workflow_version for n in new],
        "users": [n.user_id for n in new], "triggers": [n.trigger_id for n in new],
        "sources": [n.source_event_id for n in new], "single": [n.single_active for n in new],
        "keys": [n.start_key for n in new],
        "variables": json.dumps([n.variables for n in new], default=str),
        "status": ExecutionStatus.PENDING.value, "now": now}).all()
    return [Started(r.id, r.trigger_id, r.source_event_id) for r in rows]


# Arrays, not one VALUES row per execution: the statement text is the same whatever the
# batch size (parsed and planned once), where a 500-row VALUES cost 0.14 s to compile.
CREATE = text(
    "INSERT INTO workflow_executions (workflow_id, workflow_version, user_id, status, variables, "
    "  trigger_id, source_event_id, single_active, start_key, step_enqueued_at) "
    "SELECT k.workflow_id, k.workflow_version, k.user_id, :status, v.value, k.trigger_id, "
    "  k.source_event_id, k.single_active, k.start_key, :now "
    "FROM unnest(CAST(:workflows AS uuid[]), CAST(:versions AS text[]), CAST(:users AS uuid[]), "
    "  CAST(:triggers AS uuid[]), CAST(:sources AS uuid[]), CAST(:single AS boolean[]), "
    "  CAST(:keys AS text[])) "
    "  WITH ORDINALITY AS k(workflow_id, workflow_version, user_id, trigger_id, source_event_id, "
    "  single_active, start_key, n) "
    "JOIN jsonb_array_elements(CAST(:variables AS jsonb)) WITH ORDINALITY AS v(value, n) "
    "  ON v.n = k.n "
    "ON CONFLICT DO NOTHING RETURNING id, trigger_id, source_event_id")


def create_keyed(session: Session, new: NewExecution, key: str, now: dt.datetime) -> uuid.UUID:
    """Insert one pending execution under a start key, unless its workflow has one with it.

    Returns its id; a repeated key returns the first execution's id and creates nothing. A concurrent start with the same key waits on the unique index until the
    other commits, so both answer with the same id. Stamped as sent, like `create`.
    """
    created = session.execute(
        pg_insert(WorkflowExecution)
        .values(workflow_id=new.workflow_id, workflow_version=new.workflow_version,
                user_id=new.user_id, status=ExecutionStatus.PENDING, variables=new.variables,
                start_key=key, step_enqueued_at=now)
        .on_conflict_do_nothing(index_elements=["workflow_id", "start_key"],
                                index_where=text("start_key IS NOT NULL"))
        .returning(WorkflowExecution.id)
    ).scalar_one_or_none()
    if created is not None:
        return created
    return session.execute(select(WorkflowExecution.id).where(
        WorkflowExecution.workflow_id == new.workflow_id,
        WorkflowExecution.start_key == key)).scalar_one()


@dataclass(frozen=True)
class Message:
    """An event for its user's executions that wait for its type (message catch)."""

    user_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    payload: dict[str, Any]


def wake_waiting(session: Session, messages: Sequence[Message], now: dt.datetime) -> Due:
    """Store each message for the user's active executions waiting for its type; wake them.

    Why no wake-up is lost: the caller has already written the events to
    `lifecycle_events`, whose foreign key holds a `FOR KEY SHARE` lock on each user
    row until commit, and a step of an execution that can wait for messages locks its
    user `FOR UPDATE` before it reads its pending messages (`lock_users`). So a step
    either ran before this transaction wrote the event (its waits are committed and
    seen here) or runs after it commits (and finds the stored message, or the event
    itself when its new wait looks back).

    Executions a running step holds are not waited for (`SKIP LOCKED`: that step may
    be waiting for this transaction's user lock). Their message is stored when their
    committed waits take it, and their step re-reads the pending messages after this
    commits; a step is still sent for them (a stale one does nothing). Returns
    (execution, version) to step.
    """
    by_user: dict[uuid.UUID, list[Message]] = defaultdict(list)
    for message in messages:
        by_user[message.user_id].append(message)
    if not by_user:
        return []
    params = {"users": list(by_user), "types": sorted({m.event_type for m in messages})}
    waiting_sql = ("SELECT id, user_id, awaiting_events, state_version, step_enqueued_at, "
                   "paused_at FROM workflow_executions "
                   "WHERE user_id = ANY(CAST(:users AS uuid[])) "
                   f"AND awaiting_events && CAST(:types AS varchar[]) AND status IN ({_ACTIVE}) "
                   "ORDER BY id")
    waiting = {row.id: row for row in session.execute(text(waiting_sql), params).all()}
    locked = {row.id: row for row in session.execute(
        text(waiting_sql + " FOR UPDATE SKIP LOCKED"), params).all()}
    stored: list[dict[str, Any]] = []
    woken: Due = []
    for execution_id, seen in waiting.items():
        row = locked.get(execution_id, seen)  # a locked row is read again after its lock
        matching = [m for m in by_user[row.user_id] if m.event_type in row.awaiting_events]
        stored += [{"execution_id": row.id, "event_id": m.event_id, "event_type": m.event_type,
                    "payload": m.payload} for m in matching]
        if not matching or row.paused_at is not None:
            continue
        if execution_id not in locked or row.step_enqueued_at is None:
            woken.append((row.id, row.state_version))
    if stored:
        session.execute(pg_insert(ExecutionMessage).values(stored).on_conflict_do_nothing())
    mark_enqueued(session, [execution_id for execution_id, _ in woken
                            if execution_id in locked], now)
    return woken


def lock_users(session: Session, user_ids: Sequence[uuid.UUID]) -> None:
    """Lock these users' rows until commit, in id order, before reading their messages.

    `FOR UPDATE` is the one row lock that conflicts with the `FOR KEY SHARE` an
    ingest's `lifecycle_events` insert holds on its user: an ingest of the user in
    progress commits first (its events are then visible here), and one that starts
    later waits for this commit (and then sees this transaction's waits). See
    `wake_waiting`. Taken only by steps of executions that can wait for a message.
    """
    if user_ids:
        session.execute(text("SELECT 1 FROM users WHERE id = ANY(CAST(:ids AS uuid[])) "
                             "ORDER BY id FOR UPDATE"), {"ids": sorted(set(user_ids))})


@dataclass(frozen=True)
class ExitRequest:
    """Why an execution is to leave its workflow: a goal reached (with its event), or
    its workflow's `exit_when` met."""

    execution_id: uuid.UUID
    reason: ExitReason
    event_id: uuid.UUID | None = None

    def describe(self) -> str:
        if self.reason == ExitReason.GOAL:
            return f"goal reached (event {self.event_id})"
        return "exit condition met (exit_when)"


def request_exits(session: Session, requests: Sequence[ExitRequest], now: dt.datetime) -> Due:
    """Record exits for these executions, whatever each is doing; returns the steps to send.

    Called by ingest, in the transaction that recorded the goal (or the identify). The
    request is a row of its own (`execution_exits`, the first per execution wins): its
    insert takes only `FOR KEY SHARE` on the execution, which does not wait for a step
    holding it (`FOR NO KEY UPDATE`), so an ingest never waits for a step (which may be
    waiting for this ingest's user lock: `lock_users`). The step it sends ends the
    execution before running any node, whatever version it carries (`stepper`): if a
    step holds the row now, the message finds it busy and comes back after that step's
    commit, and then sees this committed request, so no exit is lost. Rows no other
    transaction holds are stamped as sent (`SKIP LOCKED`), so the reaper re-sends a
    lost one. Ended executions are left alone.
    """
    first: dict[uuid.UUID, ExitRequest] = {}
    for request in requests:
        first.setdefault(request.execution_id, request)
    if not first:
        return []
    params = {"ids": sorted(first)}
    active_sql = ("SELECT id, state_version, step_enqueued_at FROM workflow_executions "
                  f"WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ({_ACTIVE}) ORDER BY id")
    seen = {row.id: row for row in session.execute(text(active_sql), params).all()}
    if not seen:
        return []
    locked = {row.id: row for row in session.execute(
        text(active_sql + " FOR NO KEY UPDATE SKIP LOCKED"), params).all()}
    wanted = [first[execution_id] for execution_id in sorted(seen)]
    session.execute(text(
        "INSERT INTO execution_exits (execution_id, reason, event_id, requested_at) "
        "SELECT k.id, k.reason, k.event_id, :now FROM unnest(CAST(:ids AS uuid[]), "
        "CAST(:reasons AS varchar[]), CAST(:events AS uuid[])) AS k(id, reason, event_id) "
        "ORDER BY k.id ON CONFLICT DO NOTHING"),
        {"ids": [r.execution_id for r in wanted], "reasons": [str(r.reason) for r in wanted],
         "events": [r.event_id for r in wanted], "now": now})
    mark_enqueued(session, [execution_id for execution_id, row in locked.items()
                            if row.step_enqueued_at is None], now)
    return [(execution_id, locked.get(execution_id, row).state_version)
            for execution_id, row in seen.items()]


def exit_requests(session: Session, execution_ids: Sequence[uuid.UUID]
                  ) -> dict[uuid.UUID, ExitRequest]:
    """The exits requested for these executions (one query; none asked, none run)."""
    if not execution_ids:
        return {}
    rows = session.execute(text(
        "SELECT execution_id, reason, event_id FROM execution_exits "
        "WHERE execution_id = ANY(CAST(:ids AS uuid[]))"), {"ids": list(execution_ids)}).all()
    return {r.execution_id: ExitRequest(r.execution_id, ExitReason(r.reason), r.event_id)
            for r in rows}


def workflow_lookback(session: Session, workflow_id: uuid.UUID) -> dt.timedelta | None:
    """The program's `lookback` for this workflow's message waits (`fleet apply` checked it).

    Read when a wait begins without a `lookback` of its own (rare: no cache). A value
    written around `fleet apply` that is not a duration counts as none.
    """
    value = session.execute(text("SELECT settings ->> 'lookback' FROM workflows WHERE id = :w"),
                            {"w": workflow_id}).scalar()
    try:
        return parse_lookback(value) if value is not None else None
    except ValueError:
        return None


def look_back(session: Session, execution_id: uuid.UUID, user_id: uuid.UUID,
              windows: dict[str, dt.timedelta], now: dt.datetime) -> list[ExecutionMessage]:
    """Store the user's recorded events of these types as messages of the execution.

    For a wait that has just begun and looks back: each event type's events recorded
    (`created_at`) within its window before `now`, read from the audit log while the
    user is locked (`lock_users`), so none can commit unseen between this lookup and
    the wait. One already stored for the execution is not stored again. Returns the
    new pending messages, oldest first.
    """
    if not windows:
        return []
    rows = session.execute(text(
        "INSERT INTO execution_messages (execution_id, event_id, event_type, payload) "
        "SELECT :execution, e.event_id, e.event_type, jsonb_build_object("
        "  'event_id', e.event_id, 'event_type', e.event_type, 'data', e.event_data,"
        "  'occurred_at', to_char(e.occurred_at AT TIME ZONE 'UTC', "
        "                         'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'))"
        "  FROM lifecycle_events e"
        "  JOIN unnest(CAST(:types AS varchar[]), CAST(:since AS timestamptz[])) AS w(t, since)"
        "    ON e.event_type = w.t AND e.created_at >= w.since"
        " WHERE e.user_id = :user AND e.event_id IS NOT NULL"
        "   AND e.created_at >= CAST(:earliest AS timestamptz)"
        " ORDER BY e.created_at, e.id "
        "ON CONFLICT DO NOTHING RETURNING id"),
        {"execution": execution_id, "user": user_id, "types": list(windows),
         "since": [now - window for window in windows.values()],
         "earliest": now - max(windows.values())}).scalars().all()
    if not rows:
        return []
    return list(session.execute(select(ExecutionMessage).where(ExecutionMessage.id.in_(rows))
                                .order_by(ExecutionMessage.id)).scalars())


MAX_PENDING = 200  # pending messages a step looks at: the newest, so a step stays bounded


def pending_messages(session: Session, execution_id: uuid.UUID,
                     event_types: Sequence[str] | None = None) -> list[ExecutionMessage]:
    """The execution's messages no wait has caught yet (of these types), oldest first.

    A message stays pending until a wait catches it: one whose correlation values
    did not match is kept for a later wait of the execution, not dropped. A step
    looks at the newest `MAX_PENDING` of them only, so a user who sends thousands of
    non-matching events cannot make every step of the execution slower.
    """
    query = (select(ExecutionMessage)
             .where(ExecutionMessage.execution_id == execution_id,
                    ExecutionMessage.consumed_at.is_(None))
             .order_by(ExecutionMessage.id.desc()).limit(MAX_PENDING))
    if event_types is not None:
        query = query.where(ExecutionMessage.event_type.in_(event_types))
    return sorted(session.execute(query).scalars(), key=lambda message: message.id)


def pending_messages_of(session: Session, execution_ids: Sequence[uuid.UUID]
                        ) -> dict[uuid.UUID, list[ExecutionMessage]]:
    """`pending_messages` of many executions in one query: {execution: messages, oldest first}."""
    if not execution_ids:
        return {}
    query = select(ExecutionMessage).from_statement(text(
        "SELECT m.* FROM unnest(CAST(:ids AS uuid[])) AS x(id) CROSS JOIN LATERAL ("
        "  SELECT * FROM execution_messages WHERE execution_id = x.id AND consumed_at IS NULL"
        "  ORDER BY id DESC LIMIT :limit) m ORDER BY m.id"))
    found: dict[uuid.UUID, list[ExecutionMessage]] = defaultdict(list)
    for message in session.execute(query, {"ids": list(execution_ids),
                                           "limit": MAX_PENDING}).scalars():
        found[message.execution_id].append(message)
    return dict(found)


def consume(message: ExecutionMessage, now: dt.datetime) -> None:
    """The execution's workflow caught this message."""
    message.consumed_at = now


def mark_enqueued(session: Session, execution_ids: Sequence[uuid.UUID], now: dt.datetime) -> None:
    """Record that a step (or operator call) was sent for these executions."""
    if execution_ids:
        session.execute(update(WorkflowExecution)
                        .where(WorkflowExecution.id.in_(execution_ids))
                        .values(step_enqueued_at=now))


# --------------------------------------------------------------------------- one execution


def lock(session: Session, execution_id: uuid.UUID) -> WorkflowExecution | None:
    """The execution, locked until commit (a running step of it finishes first).

    `FOR NO KEY UPDATE`: steps of one execution still run one after the other, while
    an ingest's inserts that reference it (messages, goals) do not wait for a step,
    which may itself be waiting for that ingest's user lock (`lock_users`).
    """
    return session.execute(select(WorkflowExecution).where(WorkflowExecution.id == execution_id)
                           .with_for_update(key_share=True)).scalar_one_or_none()


def lock_many(session: Session, execution_ids: Sequence[uuid.UUID]
              ) -> dict[uuid.UUID, WorkflowExecution]:
    """The executions no other transaction holds, locked until commit, in one statement.

    Rows are locked in id order and held rows are skipped (`SKIP LOCKED`), so two
    batches that share executions never wait on each other in a cycle.
    """
    if not execution_ids:
        return {}
    rows = session.execute(select(WorkflowExecution)
                           .where(WorkflowExecution.id.in_(sorted(set(execution_ids))))
                           .order_by(WorkflowExecution.id)
                           .with_for_update(skip_locked=True, key_share=True)).scalars()
    return {row.id: row for row in rows}


def existing(session: Session, execution_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these executions exist (those `lock_many` skipped are held elsewhere)."""
    if not execution_ids:
        return set()
    return set(session.execute(select(WorkflowExecution.id)
                               .where(WorkflowExecution.id.in_(execution_ids))).scalars())


def _history(session: Session, row: WorkflowExecution, node_id: str, node_type: str,
             outcome: StepOutcome, started: dt.datetime, now: dt.datetime,
             error: str | None = None) -> int:
    """Bump the version and write the step-history row it names; returns the new version."""
    row.state_version += 1
    row.updated_at = now
    session.add(ExecutionStep(execution_id=row.id, seq=row.state_version, node_id=node_id,
                              node_type=node_type, outcome=outcome, started_at=started,
                              finished_at=dt.datetime.now(dt.UTC),
                              error_message=error[:MAX_ERROR] if error else None))
    return row.state_version


def advance(session: Session, row: WorkflowExecution, *, node_id: str, node_type: str,
            outcome: StepOutcome, engine_state: dict[str, Any], variables: dict[str, Any],
            wake_at: dt.datetime | None, awaiting: Sequence[str], tasks: Sequence[str],
            completed: bool, in_flight: bool, now: dt.datetime) -> int:
    """A node ran (or asked for its operator): its state, waits and history row.

    `tasks`: the user and manual tasks now waiting for completion. `in_flight`: a
    step or operator call follows (the caller sends it after commit). Returns the
    new version.
    """
    row.engine_state, row.variables = engine_state, variables
    row.current_node_id = node_id
    row.status = ExecutionStatus.COMPLETED if completed else ExecutionStatus.RUNNING
    row.completed_at = now if completed else None
    row.wake_at, row.awaiting_events = wake_at, list(awaiting) or None
    row.awaiting_tasks, row.stalled_at = list(tasks) or None, None
    row.step_enqueued_at = now if in_flight else None
    return _history(session, row, node_id, node_type, outcome, now, now)


def save_waits(row: WorkflowExecution, *, engine_state: dict[str, Any],
               wake_at: dt.datetime | None, awaiting: Sequence[str], tasks: Sequence[str],
               completed: bool, in_flight: bool, now: dt.datetime) -> None:
    """No node was ready: only the state and waits change; the version stays."""
    row.engine_state = engine_state
    row.wake_at, row.awaiting_events = wake_at, list(awaiting) or None
    row.awaiting_tasks, row.stalled_at = list(tasks) or None, None
    row.step_enqueued_at = now if in_flight else None
    if completed:
        row.status, row.completed_at = ExecutionStatus.COMPLETED, now
    elif row.status == ExecutionStatus.PENDING:
        row.status = ExecutionStatus.RUNNING
    row.updated_at = now


# A deferred operator call due within this runs now: the timer that woke it may be early.
DEFERRED_GRACE = dt.timedelta(seconds=1)


def defer(row: WorkflowExecution, until: dt.datetime, now: dt.datetime, *,
          keep_earlier: bool = True) -> None:
    """An operator call of this (locked) execution waits until `until`: a durable timer.

    A send put off to the user's send window: nothing is in flight, and `wake_at`
    wakes it; its step sends the call again (workers/engine/stepper.py).
    `keep_earlier`: the caller does not know the engine's own timers (a boundary
    event's), so an earlier `wake_at` is kept, even a past one (the one that woke the
    step may still be there): the step it causes sets the exact time. The stepper,
    which knows them, passes False and `until` already folded with them.
    """
    row.wake_at = min(row.wake_at, until) if keep_earlier and row.wake_at else until
    row.step_enqueued_at, row.updated_at = None, now


def fail(session: Session, row: WorkflowExecution, *, node_id: str, node_type: str,
         error: str, now: dt.datetime) -> int:
    """The execution fails at `node_id` with `error`; returns the version of its history row."""
    row.status = ExecutionStatus.FAILED
    row.error_message = error[:MAX_ERROR]
    row.current_node_id = node_id
    row.completed_at = now
    row.wake_at = row.awaiting_tasks = row.stalled_at = row.step_enqueued_at = None
    return _history(session, row, node_id, node_type, StepOutcome.FAILED, now, now, error)


def stall(session: Session, row: WorkflowExecution, *, engine_state: dict[str, Any],
          reason: str, now: dt.datetime) -> int:
    """The execution is running but can never go on by itself: mark it, with the reason.

    Nothing is awaited or sent (the reaper leaves it alone) until an operator
    retries or cancels it. Returns the version of its history row.
    """
    row.engine_state = engine_state
    row.status, row.stalled_at = ExecutionStatus.RUNNING, now
    row.error_message = reason[:MAX_ERROR]
    row.wake_at = row.awaiting_events = row.awaiting_tasks = row.step_enqueued_at = None
    return _history(session, row, row.current_node_id or "-", STALL_NODE_TYPE,
                    StepOutcome.STALLED, now, now, reason)


def _end(row: WorkflowExecution, status: ExecutionStatus, now: dt.datetime) -> None:
    """Stop for good where it is: timers, message waits, human tasks and a pause are dropped."""
    row.status, row.completed_at = status, now
    row.wake_at = row.awaiting_events = row.awaiting_tasks = None
    row.step_enqueued_at = row.paused_at = row.stalled_at = None


def cancel(session: Session, row: WorkflowExecution, now: dt.datetime) -> None:
    """Stop for good: timers, waits and a pause are dropped; a late step finds a new version."""
    _end(row, ExecutionStatus.CANCELLED, now)
    _history(session, row, row.current_node_id or "-", "Cancel", StepOutcome.CANCELLED, now, now)


def exit_now(session: Session, row: WorkflowExecution, request: ExitRequest,
             node_id: str | None, now: dt.datetime) -> int:
    """The (locked) execution leaves its workflow where it is: `completed`, outcome the reason.

    Ended as `cancel` ends it (no timer, wait, human task or pause is left, so nothing
    wakes it again), with a history row (node type `Exit`, outcome `exited`, the reason
    in its message) at `node_id`, the node it was at (the wait, not the node before it).
    Returns the version of that row.
    """
    _end(row, ExecutionStatus.COMPLETED, now)
    row.outcome = request.reason
    node_id = node_id or row.current_node_id or "-"
    row.current_node_id = node_id
    return _history(session, row, node_id, EXIT_NODE_TYPE, StepOutcome.EXITED, now, now,
                    request.describe())


def pause(row: WorkflowExecution, now: dt.datetime) -> None:
    row.paused_at, row.updated_at = now, now


def resume(row: WorkflowExecution, now: dt.datetime) -> int:
    """Unpause; returns the version to step (the caller sends it after commit)."""
    row.paused_at, row.updated_at, row.step_enqueued_at = None, now, now
    return row.state_version


def retry(row: WorkflowExecution, now: dt.datetime) -> int:
    """Run a failed or stalled execution again where it stopped; returns the version to step."""
    row.status, row.error_message, row.completed_at = ExecutionStatus.RUNNING, None, None
    row.stalled_at = None
    row.paused_at, row.updated_at, row.step_enqueued_at = None, now, now
    return row.state_version


# --------------------------------------------------------------------------- sweeps


def claim_due_timers(session: Session, now: dt.datetime, limit: int,
                     due_by: dt.datetime | None = None) -> Due:
    """Active, unpaused executions whose `wake_at` is `due_by` (now): clear it, stamp the send."""
    rows = session.execute(text(
        "UPDATE workflow_executions e SET wake_at = NULL, step_enqueued_at = :now "
        "FROM (SELECT id FROM workflow_executions WHERE wake_at <= :due_by "
        f"      AND status IN ({_ACTIVE}) AND paused_at IS NULL "
        "      ORDER BY wake_at LIMIT :limit FOR UPDATE SKIP LOCKED) due "
        "WHERE e.id = due.id RETURNING e.id, e.state_version"),
        {"now": now, "due_by": due_by or now, "limit": limit}).all()
    return [(r.id, r.state_version) for r in rows]


def claim_stuck(session: Session, now: dt.datetime, *, sent_before: dt.datetime,
                chain_before: dt.datetime, limit: int, max_resends: int, node_type: str,
                reason: str) -> Sequence[Row[Any]]:
    """Re-send (or, past `max_resends`, fail) active executions whose step looks lost.

    Lost: sent before `sent_before` (before `chain_before` while an operator call of
    it is pending), or nothing sent and nothing to wait for. A stalled execution is
    not lost: its step ran and found nothing to do. Each gets a history row
    of `node_type` (outcome `retrying`, `attempt` = re-sends in a row without progress)
    and a new version. Returns (id, state_version, status, error_message) of each.
    """
    failed, retrying = StepOutcome.FAILED, StepOutcome.RETRYING
    return session.execute(text(
        "WITH stuck AS ("
        "  SELECT e.id, COALESCE((SELECT s.attempt FROM execution_steps s "
        "    WHERE s.execution_id = e.id AND s.seq = e.state_version "
        f"    AND s.outcome = '{retrying}' AND s.node_type = :kind), 0) + 1 AS resends "
        "  FROM workflow_executions e "
        f"  WHERE e.status IN ({_ACTIVE}) AND e.paused_at IS NULL AND e.stalled_at IS NULL "
        "  AND ("
        "    (e.step_enqueued_at < :cutoff AND (e.step_enqueued_at < :chain_cutoff OR NOT EXISTS ("
        "      SELECT 1 FROM action_deliveries d "
        "      WHERE d.execution_id = e.id AND d.status = 'pending'))) "
        "    OR (e.step_enqueued_at IS NULL AND e.wake_at IS NULL "
        "        AND e.awaiting_events IS NULL AND e.awaiting_tasks IS NULL "
        "        AND e.updated_at < :cutoff)) "
        "  ORDER BY e.step_enqueued_at NULLS FIRST LIMIT :limit FOR UPDATE OF e SKIP LOCKED"
        "), moved AS ("
        "  UPDATE workflow_executions e SET state_version = e.state_version + 1, "
        "    updated_at = :now, "
        f"    status = CASE WHEN s.resends > :max THEN '{ExecutionStatus.FAILED}' "
        "      ELSE e.status END, "
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
        f"    CASE WHEN status = '{ExecutionStatus.FAILED}' THEN '{failed}' "
        f"      ELSE '{retrying}' END, "
        "    resends, :now, :now, "
        f"    CASE WHEN status = '{ExecutionStatus.FAILED}' THEN error_message END "
        "  FROM moved"
        ") SELECT id, state_version, status, error_message FROM moved"),
        {"now": now, "cutoff": sent_before, "chain_cutoff": chain_before, "limit": limit,
         "max": max_resends, "kind": node_type, "reason": reason}).all()


# --------------------------------------------------------------------------- retention

_ENDED_BEFORE = (f"status IN ({sql_list(TERMINAL_EXECUTION_STATUSES)}) "
                 "AND coalesce(completed_at, started_at) < :cutoff")


def count_ended_before(conn: Connection, cutoff: dt.datetime) -> int:
    """How many executions `delete_ended_before` would remove (retention's dry run)."""
    return int(conn.execute(text(f"SELECT count(*) FROM workflow_executions WHERE {_ENDED_BEFORE}"),
                            {"cutoff": cutoff}).scalar_one())


def delete_ended_before(conn: Connection, cutoff: dt.datetime, limit: int) -> int:
    """Delete up to `limit` executions that ended before `cutoff`; steps and messages cascade.

    Rows another transaction holds are skipped, so retention never waits on a step.
    """
    return int(conn.execute(text(
        f"WITH batch AS (SELECT id FROM workflow_executions WHERE {_ENDED_BEFORE} "
        "LIMIT :limit FOR UPDATE SKIP LOCKED), "
        "gone AS (DELETE FROM workflow_executions x USING batch WHERE x.id = batch.id "
        "RETURNING 1) SELECT count(*) FROM gone"), {"cutoff": cutoff, "limit": limit}).scalar_one())
