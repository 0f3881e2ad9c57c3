"""Exits: when a running execution leaves its workflow before an end event.

A workflow may declare (`workflows.settings`, applied by `fleet apply`):

* `exit_on_goal: true`: the goal event (workers/events/goals.py) ends each of the
  user's executions of it that reached the goal with it, wherever they are;
* `exit_when: CONDITION`: a condition on the user (the segment language: no event in
  scope, `in_segment` allowed) that ends them when it holds, checked when an
  identify changed the user (in ingest) and on each step (the stepper's hook).

Ingest does not end an execution itself: it records the exit (`executions.request_exits`,
in the goal's or the identify's transaction, waiting for no step) and sends a step,
which ends it before running any node (`workers/engine/stepper.py` explains the
locking). A step's own check ends it at once. Either way the end is `completed` with
the outcome `goal` or `exited`.

Conditions are evaluated in SQL (`workers/rules/sql_backend.py`) over the users and
their memberships as recorded: ingest has just recomputed the memberships of users an
identify changed; otherwise the refresh sweep keeps them, and an expired membership
counts as none, as in a segment refresh.
"""

from __future__ import annotations

import datetime as dt
import math
import time
import uuid
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, and_, or_, select, text
from sqlalchemy.orm import Session

from db.models import ACTIVE_EXECUTION_STATUSES, ExitReason, User, WorkflowExecution, sql_list
from workers.engine import executions
from workers.events.envelope import Event
from workers.log import get_logger
from workers.rules.conditions import ConditionError, Node, parse
from workers.rules.sql_backend import compile_sql
from workers.rules.triggers import ActiveTriggers, UserView
from workers.settings import get_settings

log = get_logger(__name__)

LOAD_SQL = text(
    "SELECT id, name, settings->'exit_when' AS exit_when, "
    "       settings @> '{\"exit_on_goal\": true}' AS on_goal FROM workflows "
    "WHERE jsonb_typeof(settings->'exit_when') = 'object' "
    "   OR settings @> '{\"exit_on_goal\": true}'")


@dataclass(frozen=True)
class ExitRules:
    """The workflows that exit early: those that exit on their goal, and the conditions."""

    on_goal: frozenset[uuid.UUID] = frozenset()
    conditions: Mapping[uuid.UUID, Node] = field(default_factory=dict)  # exit_when, parsed


class ExitCache:
    """Per-process exit rules, read again every FLEET_TRIGGER_CACHE_SECONDS (as triggers are)."""

    def __init__(self, refresh_seconds: float | None = None) -> None:
        self.refresh_seconds = (get_settings().trigger_cache_seconds if refresh_seconds is None
                                else refresh_seconds)
        self._loaded = -math.inf
        self._rules = ExitRules()

    def get(self, session: Session) -> ExitRules:
        if time.monotonic() - self._loaded >= self.refresh_seconds:
            self._rules = _load(session)
            self._loaded = time.monotonic()
        return self._rules


def _load(session: Session) -> ExitRules:
    on_goal: set[uuid.UUID] = set()
    when: dict[uuid.UUID, Node] = {}
    for row in session.execute(LOAD_SQL):
        if row.on_goal:
            on_goal.add(row.id)
        if row.exit_when is not None:
            try:
                when[row.id] = parse(row.exit_when, allow_event=False)
            except ConditionError as exc:  # validated by `fleet apply`; never stop a step
                log.error("exit_when.invalid", workflow=row.name, error=str(exc))
    return ExitRules(frozenset(on_goal), when)


_PROCESS_EXITS: ExitCache | None = None


def process_exits() -> ExitCache:
    """This process's exit rules, shared by ingest and the step hook."""
    global _PROCESS_EXITS
    if _PROCESS_EXITS is None:
        _PROCESS_EXITS = ExitCache()
    return _PROCESS_EXITS


# The goals these events reached (recorded just before, in this transaction) for active
# executions of workflows that exit on their goal; found through the users' executions
# (idx_executions_user), not by the event id (execution_goals has no index on it).
GOAL_EXITS = text(f"""
SELECT g.execution_id, g.event_id
  FROM workflow_executions x JOIN execution_goals g ON g.execution_id = x.id
 WHERE x.user_id = ANY(CAST(:users AS uuid[])) AND x.workflow_id = ANY(CAST(:workflows AS uuid[]))
   AND x.status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)})
   AND g.event_id = ANY(CAST(:events AS uuid[]))
 ORDER BY g.execution_id""")


def request_exits(session: Session, events: Sequence[Event], users: Mapping[str, UserView],
                  changed: Set[uuid.UUID], definitions: ActiveTriggers,
                  now: dt.datetime) -> list[tuple[uuid.UUID, int]]:
    """Exits these admitted events cause, recorded in ingest's transaction; the steps to send.

    Called right after `record_goals`. Costs no query unless a goal of these events'
    types belongs to a workflow that exits on it, or an identify changed a user while
    some workflow has `exit_when`.
    """
    rules = process_exits().get(session)
    requests: list[executions.ExitRequest] = []
    workflows = {g.workflow_id for e in events for g in definitions.goals_for(e.event_type)
                 } & rules.on_goal
    if workflows:
        requests += [executions.ExitRequest(r.execution_id, ExitReason.GOAL, r.event_id)
                     for r in session.execute(GOAL_EXITS, {
                         "users": sorted({users[e.user].id for e in events}),
                         "workflows": sorted(workflows),
                         "events": [e.event_id for e in events]})]
    if changed and rules.conditions:
        x = WorkflowExecution.__table__
        requests += [executions.ExitRequest(execution_id, ExitReason.EXITED)
                     for execution_id in _meeting(session, rules, now, x.c.user_id.in_(
                         sorted(changed)), x.c.status.in_(sorted(ACTIVE_EXECUTION_STATUSES)))]
    return executions.request_exits(session, requests, now)


def exit_when_met(session: Session, rows: Sequence[WorkflowExecution],
                  now: dt.datetime) -> set[uuid.UUID]:
    """The stepper's hook: which of these (locked, active) executions meet their exit_when.

    One query for the batch, none when no workflow of the batch has an exit condition.
    """
    rules = process_exits().get(session)
    ids = sorted(row.id for row in rows if row.workflow_id in rules.conditions)
    if not ids:
        return set()
    return _meeting(session, rules, now, WorkflowExecution.__table__.c.id.in_(ids))


def _meeting(session: Session, rules: ExitRules, now: dt.datetime,
             *where: ColumnElement[bool]) -> set[uuid.UUID]:
    """Executions (of `where`) whose user meets their workflow's exit condition now."""
    x, users = WorkflowExecution.__table__, User.__table__
    met = or_(*(and_(x.c.workflow_id == workflow_id, compile_sql(node, now=now))
                for workflow_id, node in rules.conditions.items()))
    query = (select(x.c.id).select_from(x.join(users, users.c.id == x.c.user_id))
             .where(x.c.workflow_id.in_(sorted(rules.conditions)), met, *where))
    return set(session.execute(query).scalars())
