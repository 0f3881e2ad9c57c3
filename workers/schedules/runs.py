"""Scheduled audience journeys: the one writer of `workflow_schedules` and their runs.

A run starts the schedule's workflow for every current member of its segment (every
user when it has none), in `users.id` order, one batch per transaction: the batch's
executions, the run's keyset cursor (`last_user_id`) and its counts commit together,
so a run whose worker died goes on after the last committed batch and starts nobody
twice. Each start also carries a start key derived from the run and the user
(`uuid5(run id, user id)`), unique per workflow in `workflow_executions`: even a run
whose cursor were wound back starts no user a second time.

Who is a member is decided at batch time: a dynamic segment's condition compiled
to SQL over `users`, a static segment's `user_segment_memberships` rows. A user who
joins while the run is under way is started if the run has not passed their id yet
(and one who leaves before their batch is not).

Messages: a run message carries the run's `batches` count as the version it expects;
a copy, or one sent again by the sweep while the first still runs, finds the row
locked (`SKIP LOCKED`) or the count moved on and does nothing. The beat's sweep sends
due schedules' new runs, and again the running runs whose heartbeat (`updated_at`,
stamped by every batch) is older than STALE_AFTER: a killed worker's run resumes.

Pausing (`fleet schedule pause`) stops new runs and stops a running one at its next
batch (the batch in progress finishes); `resume` sends it on from its cursor. Runs
missed while paused, or while no beat ran, are not made up: the next run is the
first one after now (one run stands for every missed time of a beat that was down).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

from sqlalchemy import Select, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.models import (
    ACTIVE_EXECUTION_STATUSES,
    User,
    UserSegment,
    UserSegmentMembership,
    Workflow,
    WorkflowSchedule,
    WorkflowScheduleRun,
    sql_list,
)
from workers.engine import executions
from workers.rules.conditions import parse
from workers.rules.sql_backend import compile_sql
from workers.schedules.cron import next_interval, parse_cron

STALE_AFTER = dt.timedelta(seconds=60)  # a running run's heartbeat this old: resumed by the sweep
DUE_LIMIT = 100  # schedules started per sweep
START_KEY_PREFIX = "schedule-run:"
_ACTIVE = sql_list(ACTIVE_EXECUTION_STATUSES)


class ScheduleError(ValueError):
    """A schedule command that cannot be done (no such schedule, paused, ...)."""


class RunMessage(NamedTuple):
    """What a run message carries: the run and the `batches` count it expects."""

    run_id: uuid.UUID
    batches: int


@dataclass(frozen=True)
class When:
    """When a schedule runs: its trigger type and the cron (in a zone) or interval."""

    trigger_type: Literal["cron", "interval", "manual"]
    cron_expression: str | None = None
    timezone: str = "UTC"
    interval_seconds: int | None = None

    def next_after(self, now: dt.datetime, previous: dt.datetime | None = None
                   ) -> dt.datetime | None:
        """The next run time after `now` (interval: counted from `previous`); None: manual."""
        if self.trigger_type == "cron":
            assert self.cron_expression is not None
            return parse_cron(self.cron_expression, self.timezone).next_after(now)
        if self.trigger_type == "interval":
            assert self.interval_seconds is not None
            return next_interval(previous or now, self.interval_seconds, now)
        return None


def _when(row: WorkflowSchedule) -> When:
    kind: Any = row.trigger_type
    return When(kind, row.cron_expression, row.timezone, row.interval_seconds)


@dataclass(frozen=True)
class ScheduleValues:
    """A schedule as the program defines it (`workers/definitions.py` resolves the names)."""

    workflow_id: uuid.UUID
    when: When
    segment_id: uuid.UUID | None = None  # None: every user
    batch_size: int = 1000
    reentry: Literal["no_concurrent", "allow"] = "no_concurrent"


# --------------------------------------------------------------------------- definitions


def upsert(session: Session, name: str, values: ScheduleValues, now: dt.datetime
           ) -> Literal["created", "updated", "unchanged"]:
    """Create or update a schedule by name; a new `when` sets the next run from now.

    A paused schedule stays paused (pausing is an operator's act, not the program's).
    """
    columns: dict[str, Any] = {"workflow_id": values.workflow_id, "trigger_type": values.when.trigger_type,
               "cron_expression": values.when.cron_expression,
               "timezone": values.when.timezone, "interval_seconds": values.when.interval_seconds,
               "segment_id": values.segment_id, "batch_size": values.batch_size,
               "reentry": values.reentry}
    row = session.execute(select(WorkflowSchedule).where(WorkflowSchedule.name == name)
                          ).scalar_one_or_none()
    if row is None:
        session.execute(pg_insert(WorkflowSchedule).values(
            name=name, **columns, next_run_at=values.when.next_after(now), created_at=now,
            updated_at=now))
        return "created"
    if all(getattr(row, k) == v for k, v in columns.items()):
        return "unchanged"
    if _when(row) != values.when:
        columns["next_run_at"] = values.when.next_after(now)
    session.execute(update(WorkflowSchedule).where(WorkflowSchedule.id == row.id)
                    .values(**columns, updated_at=now))
    return "updated"


def _schedule(session: Session, name: str) -> WorkflowSchedule:
    row = session.execute(select(WorkflowSchedule).where(WorkflowSchedule.name == name)
                          .with_for_update()).scalar_one_or_none()
    if row is None:
        raise ScheduleError(f"no schedule named {name!r}")
    return row


def pause(session: Session, name: str, now: dt.datetime) -> bool:
    """Pause a schedule; False if it already was."""
    row = _schedule(session, name)
    if row.paused_at is not None:
        return False
    row.paused_at, row.updated_at = now, now
    return True


def resume(session: Session, name: str, now: dt.datetime) -> list[RunMessage] | None:
    """Resume a paused schedule; returns its running runs, to send on after commit (None:
    it was not paused).

    A run time that passed while it was paused is skipped: the next is the first after now.
    """
    row = _schedule(session, name)
    if row.paused_at is None:
        return None
    row.paused_at, row.updated_at = None, now
    if row.next_run_at is not None and row.next_run_at <= now:
        row.next_run_at = _when(row).next_after(now, row.next_run_at)
    return [RunMessage(r.id, r.batches) for r in session.execute(
        select(WorkflowScheduleRun.id, WorkflowScheduleRun.batches).where(
            WorkflowScheduleRun.schedule_id == row.id, WorkflowScheduleRun.status == "running"))]


# --------------------------------------------------------------------------- starting runs


def _new_run(session: Session, schedule_id: uuid.UUID, scheduled_for: dt.datetime,
             manual: bool, now: dt.datetime) -> uuid.UUID | None:
    """The run row, or None when this schedule already has a run for that time."""
    return session.execute(
        pg_insert(WorkflowScheduleRun).values(
            schedule_id=schedule_id, scheduled_for=scheduled_for, manual=manual,
            started_at=now, updated_at=now)
        .on_conflict_do_nothing(constraint="uq_schedule_runs_scheduled_for")
        .returning(WorkflowScheduleRun.id)).scalar_one_or_none()


def start_due(session: Session, now: dt.datetime, limit: int = DUE_LIMIT) -> list[RunMessage]:
    """Beat: a run for each schedule due by `now`, and its next run time, in one transaction.

    Locked with SKIP LOCKED, so two sweeps (a beat's takeover) never start one time
    twice; the unique (schedule, scheduled_for) would refuse it anyway.
    """
    due = session.execute(
        select(WorkflowSchedule).where(WorkflowSchedule.paused_at.is_(None),
                                       WorkflowSchedule.next_run_at <= now)
        .order_by(WorkflowSchedule.next_run_at).limit(limit)
        .with_for_update(skip_locked=True)).scalars().all()
    started: list[RunMessage] = []
    for row in due:
        scheduled_for = row.next_run_at
        assert scheduled_for is not None
        run_id = _new_run(session, row.id, scheduled_for, False, now)
        if run_id is not None:
            started.append(RunMessage(run_id, 0))
        row.last_run_at = scheduled_for
        row.next_run_at = _when(row).next_after(max(now, scheduled_for), scheduled_for)
        row.updated_at = now
    return started


def start_manual(session: Session, name: str, now: dt.datetime) -> RunMessage:
    """`fleet schedule run NAME`: a run now, whatever the schedule's trigger type."""
    row = _schedule(session, name)
    if row.paused_at is not None:
        raise ScheduleError(f"schedule {name} is paused: resume it first")
    run_id = _new_run(session, row.id, now, True, now)
    if run_id is None:
        raise ScheduleError(f"schedule {name} already has a run for {now.isoformat()}")
    row.last_run_at, row.updated_at = now, now
    return RunMessage(run_id, 0)


def resume_stale(session: Session, now: dt.datetime,
                 older_than: dt.timedelta = STALE_AFTER) -> list[RunMessage]:
    """Beat: running runs of unpaused schedules whose heartbeat is older than `older_than`.

    Their heartbeat is stamped now, so each is sent once per `older_than`; a run a
    worker is in the middle of (its row locked) is skipped.
    """
    rows = session.execute(text(
        "WITH stale AS (SELECT r.id FROM workflow_schedule_runs r "
        "JOIN workflow_schedules s ON s.id = r.schedule_id "
        "WHERE r.status = 'running' AND s.paused_at IS NULL AND r.updated_at < :cutoff "
        "ORDER BY r.updated_at LIMIT :limit FOR UPDATE OF r SKIP LOCKED) "
        "UPDATE workflow_schedule_runs r SET updated_at = :now FROM stale WHERE r.id = stale.id "
        "RETURNING r.id, r.batches"),
        {"cutoff": now - older_than, "now": now, "limit": DUE_LIMIT}).all()
    return [RunMessage(r.id, r.batches) for r in rows]


# --------------------------------------------------------------------------- one batch


@dataclass(frozen=True)
class Batch:
    """What one batch did. `more`: its starts are committed with the cursor, another follows."""

    status: Literal["more", "completed", "failed", "paused", "stale", "busy"]
    started: list[uuid.UUID]  # executions to step at version 0 after commit
    batches: int  # the run's count after it: what the next message expects
    skipped: int = 0


def start_key(run_id: uuid.UUID, user_id: uuid.UUID) -> str:
    """The start key of a run's execution for a user: the same for every retry of the run."""
    return START_KEY_PREFIX + str(uuid.uuid5(run_id, str(user_id)))


def _members(session: Session, segment_id: uuid.UUID | None, after: uuid.UUID | None,
             limit: int, now: dt.datetime) -> list[uuid.UUID]:
    """The next `limit` members by id after `after`, as they are now."""
    query: Select[Any]
    if segment_id is None:
        query = select(User.id)
        key: Any = User.id
    else:
        segment = session.get(UserSegment, segment_id)
        assert segment is not None  # RESTRICT: a segment a schedule names is not deleted
        if segment.kind == "static":
            m = UserSegmentMembership
            query = select(m.user_id).where(
                m.segment_id == segment_id,
                or_(m.valid_until.is_(None), m.valid_until > now))
            key = m.user_id
        else:
            query = select(User.id).where(
                compile_sql(parse(segment.conditions, allow_event=False), now=now))
            key = User.id
    if after is not None:
        query = query.where(key > after)
    return list(session.execute(query.order_by(key).limit(limit)).scalars())


def _active_users(session: Session, workflow_id: uuid.UUID, users: list[uuid.UUID]
                  ) -> set[uuid.UUID]:
    return set(session.execute(text(
        "SELECT DISTINCT user_id FROM workflow_executions WHERE workflow_id = :w "
        f"AND user_id = ANY(CAST(:u AS uuid[])) AND status IN ({_ACTIVE})"),
        {"w": workflow_id, "u": users}).scalars())


def run_batch(session: Session, run_id: uuid.UUID, expected: int, now: dt.datetime
              ) -> Batch:
    """Start the run's next batch of members, in the caller's transaction (see the module).

    The caller commits, then sends `workflows.step(id, 0)` for `started`, and the next
    run message when the status is `more`.
    """
    run = session.execute(select(WorkflowScheduleRun).where(WorkflowScheduleRun.id == run_id)
                          .with_for_update(skip_locked=True)).scalar_one_or_none()
    if run is None:
        return Batch("busy", [], expected)  # another worker has it (or it was deleted)
    if run.status != "running" or run.batches != expected:
        return Batch("stale", [], run.batches)
    schedule = session.get(WorkflowSchedule, run.schedule_id)
    assert schedule is not None  # CASCADE: a run goes with its schedule
    if schedule.paused_at is not None:
        return Batch("paused", [], run.batches)
    workflow = session.get(Workflow, schedule.workflow_id)
    assert workflow is not None
    run.batches, run.updated_at = run.batches + 1, now
    if workflow.status != "active":
        run.status, run.finished_at = "failed", now
        run.error_message = f"workflow {workflow.name} is {workflow.status}, not active"
        return Batch("failed", [], run.batches)
    members = _members(session, schedule.segment_id, run.last_user_id, schedule.batch_size, now)
    busy = (_active_users(session, workflow.id, members)
            if schedule.reentry == "no_concurrent" and members else set())
    variables = {"schedule": {"name": schedule.name, "run_id": str(run.id),
                              "scheduled_for": run.scheduled_for.isoformat()}}
    # One statement for the batch; a start key already used (a rerun) creates nothing.
    started = [s.id for s in executions.create(session, [
        executions.NewExecution(workflow_id=workflow.id, workflow_version=workflow.version,
                                user_id=user, variables=variables,
                                start_key=start_key(run.id, user))
        for user in members if user not in busy], now)]
    run.started += len(started)
    run.skipped += len(members) - len(started)
    if members:
        run.last_user_id = members[-1]
    if len(members) < schedule.batch_size:
        run.status, run.finished_at = "completed", now
        return Batch("completed", started, run.batches, len(members) - len(started))
    return Batch("more", started, run.batches, len(members) - len(started))


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RunView:
    id: uuid.UUID
    schedule: str
    scheduled_for: dt.datetime
    manual: bool
    status: str
    batches: int
    started: int
    skipped: int
    error: str | None
    started_at: dt.datetime
    finished_at: dt.datetime | None
    updated_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ScheduleView:
    name: str
    workflow: str
    when: When
    segment: str | None  # None: every user
    paused: bool
    next_run_at: dt.datetime | None
    last_run_at: dt.datetime | None
    last_run: RunView | None

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["when"] = asdict(self.when)
        data["last_run"] = self.last_run.to_json() if self.last_run else None
        return data


_RUN_COLUMNS = ("r.id, s.name AS schedule, r.scheduled_for, r.manual, r.status, r.batches, "
                "r.started, r.skipped, r.error_message AS error, r.started_at, r.finished_at, "
                "r.updated_at")


def run_view(session: Session, run_id: uuid.UUID) -> RunView | None:
    row = session.execute(text(
        f"SELECT {_RUN_COLUMNS} FROM workflow_schedule_runs r "
        "JOIN workflow_schedules s ON s.id = r.schedule_id WHERE r.id = :id"),
        {"id": run_id}).mappings().one_or_none()
    return RunView(**row) if row is not None else None


def schedules(session: Session) -> list[ScheduleView]:
    """Every schedule by name, with its latest run."""
    latest = {row["schedule"]: RunView(**row) for row in session.execute(text(
        f"SELECT DISTINCT ON (r.schedule_id) {_RUN_COLUMNS} FROM workflow_schedule_runs r "
        "JOIN workflow_schedules s ON s.id = r.schedule_id "
        "ORDER BY r.schedule_id, r.started_at DESC, r.scheduled_for DESC")).mappings()}
    rows = session.execute(
        select(WorkflowSchedule, Workflow.name, UserSegment.name)
        .join(Workflow, Workflow.id == WorkflowSchedule.workflow_id)
        .outerjoin(UserSegment, UserSegment.id == WorkflowSchedule.segment_id)
        .order_by(WorkflowSchedule.name)).all()
    return [ScheduleView(name=s.name, workflow=workflow, when=_when(s),
                         segment=segment, paused=s.paused_at is not None,
                         next_run_at=s.next_run_at, last_run_at=s.last_run_at,
                         last_run=latest.get(s.name))
            for s, workflow, segment in rows]
