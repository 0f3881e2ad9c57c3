"""Enabled triggers and segment definitions, compiled once and cached per worker process.

The cache re-reads the definitions when their fingerprint (a hash of every
trigger row with its workflow's version and status, of every segment, and of every
workflow's goal) changes.
The fingerprint is checked at most every FLEET_TRIGGER_CACHE_SECONDS (default 2),
so a create, update or disable takes effect within seconds on every worker,
without a restart.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.orm import Session

from db import tenancy
from workers.event_types import SEGMENT_ENTERED, SEGMENT_EXITED
from workers.log import get_logger
from workers.rules.conditions import ConditionError, parse
from workers.rules.conditions import segment_refs as node_segment_refs
from workers.rules.membership import MembershipResolver, SegmentInfo, segment_info
from workers.rules.python_backend import EvalContext, compile_python
from workers.sends.config import GoalDef
from workers.settings import get_settings

if TYPE_CHECKING:
    from workers.events.envelope import Event

log = get_logger(__name__)
SEGMENT_EVENTS = (SEGMENT_ENTERED, SEGMENT_EXITED)


@dataclass
class UserView:
    """The user as conditions see it (attributes kept current within a message)."""

    id: uuid.UUID
    email: str
    stage: str
    attributes: dict[str, Any]
    created_at: dt.datetime | None


def count_events(session: Session, user_id: uuid.UUID, event_type: str,
                 within: dt.timedelta | None, now: dt.datetime) -> int:
    """How many audit rows of `event_type` the user has (within a window): `performed`."""
    sql = "SELECT count(*) FROM lifecycle_events WHERE user_id = :u AND event_type = :t"
    params: dict[str, Any] = {"u": user_id, "t": event_type}
    if within is not None:
        sql += " AND created_at >= :since"
        params["since"] = now - within
    return int(session.execute(text(sql), params).scalar_one())


# --------------------------------------------------------------------------- start variables

# What a start-variable path may name: each root's fields; the open ones (a JSON
# object) may be followed by keys. The views mirror the execution's own `event` and
# `user` variables.
START_FIELDS: dict[str, dict[str, bool]] = {
    "event": {"event_id": False, "event_type": False, "occurred_at": False, "data": True},
    "user": {"id": False, "email": False, "stage": False, "attributes": True},
}
RESERVED_VARIABLES = frozenset(START_FIELDS)  # the fleet's own start variables
_VARIABLE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_PATH_KEYS = 8


class StartVariableError(ValueError):
    """A trigger's `variables` mapping names a variable or a path that cannot be."""


@dataclass(frozen=True)
class StartPath:
    """`root.field.key...`: a compiled path into the event or the user."""

    root: str
    keys: tuple[str, ...]

    def value(self, views: Mapping[str, Mapping[str, Any]]) -> Any:
        """The value at the path; None where a key is missing or a value is no object."""
        value: Any = views[self.root]
        for key in self.keys:
            if not isinstance(value, Mapping):
                return None
            value = value.get(key)
        return value


def _start_path(name: str, path: Any) -> StartPath:
    if not isinstance(path, str):
        raise StartVariableError(f"variable {name}: the path must be a string, not {path!r}")
    root, *keys = path.split(".")
    fields = START_FIELDS.get(root)
    if fields is None:
        raise StartVariableError(f"variable {name}: unknown root {root!r} in {path!r} "
                                 f"(expected {' or '.join(f'{r}.<field>' for r in START_FIELDS)})")
    if not keys or keys[0] not in fields:
        raise StartVariableError(f"variable {name}: {path!r} names no field of {root} "
                                 f"(expected one of {', '.join(fields)})")
    if len(keys) > 1 and not fields[keys[0]]:
        raise StartVariableError(f"variable {name}: {root}.{keys[0]} has no keys below it "
                                 f"({path!r})")
    if len(keys) > 1 + MAX_PATH_KEYS or not all(_KEY_RE.fullmatch(k) for k in keys[1:]):
        raise StartVariableError(f"variable {name}: bad key path {path!r} (at most "
                                 f"{MAX_PATH_KEYS} keys of letters, digits, _ -)")
    return StartPath(root, tuple(keys))


def compile_start_variables(mapping: Any) -> tuple[tuple[str, StartPath], ...]:
    """Compile a trigger's `{variable: path}` mapping; raises StartVariableError.

    A variable name is what a BPMN expression reads, so it is a plain identifier,
    and not one of the fleet's own (`event`, `user`).
    """
    if not isinstance(mapping, Mapping):
        raise StartVariableError(f"variables must be a mapping of name to path, not {mapping!r}")
    compiled: list[tuple[str, StartPath]] = []
    for name, path in mapping.items():
        if not isinstance(name, str) or not _VARIABLE_RE.fullmatch(name):
            raise StartVariableError(f"variable {name!r}: a name is a letter, then up to 63 "
                                     "letters, digits or _")
        if name in RESERVED_VARIABLES:
            raise StartVariableError(f"variable {name}: {name!r} is the fleet's own variable")
        compiled.append((name, _start_path(name, path)))
    return tuple(compiled)


# --------------------------------------------------------------------------- triggers


def eval_context(event: Event, user: UserView, now: dt.datetime,
                 membership: MembershipResolver, session: Session) -> EvalContext:
    """What a compiled condition sees for one event and its user (triggers and goals alike)."""
    return EvalContext(
        event_type=event.event_type,
        event_data=event.data,
        user_id=user.id,
        user_email=user.email,
        user_stage=user.stage,
        user_attributes=user.attributes,
        user_created_at=user.created_at,
        now=now,
        is_member=lambda ref: membership.is_member(user.id, ref),
        count_events=lambda etype, within: count_events(session, user.id, etype, within, now),
    )


@dataclass(frozen=True)
class CompiledTrigger:
    id: uuid.UUID
    name: str
    event_type: str
    # None when the trigger has no workflow or its workflow is not active:
    # the trigger is still evaluated and logged, but starts nothing.
    workflow_id: uuid.UUID | None
    workflow_version: str | None
    reentry: str
    max_runs_per_user: int | None
    cooldown_seconds: int | None
    predicate: Callable[[EvalContext], bool]
    segment_refs: frozenset[str]
    start_variables: tuple[tuple[str, StartPath], ...] = ()
    # The segment a segment.entered / segment.exited trigger watches; None for the others.
    segment_id: uuid.UUID | None = None

    def evaluate(self, event: Event, user: UserView, now: dt.datetime,
                 membership: MembershipResolver, session: Session) -> bool:
        return self.predicate(eval_context(event, user, now, membership, session))

    def mapped_variables(self, event: Event, user: UserView) -> dict[str, Any]:
        """The start variables this trigger maps from the event and the user (None if missing)."""
        if not self.start_variables:
            return {}
        views = {"event": {"event_id": str(event.event_id), "event_type": event.event_type,
                           "occurred_at": event.occurred_at.isoformat(), "data": event.data},
                 "user": {"id": str(user.id), "email": user.email, "stage": user.stage,
                          "attributes": user.attributes}}
        return {name: path.value(views) for name, path in self.start_variables}


@dataclass(frozen=True)
class CompiledGoal:
    """A workflow's goal (workflows.settings): its event type, condition and window."""

    workflow_id: uuid.UUID
    event_type: str
    window: dt.timedelta
    predicate: Callable[[EvalContext], bool]
    segment_refs: frozenset[str]

    def evaluate(self, event: Event, user: UserView, now: dt.datetime,
                 membership: MembershipResolver, session: Session) -> bool:
        return self.predicate(eval_context(event, user, now, membership, session))


def compile_goal(row: Any) -> CompiledGoal:
    """Compile one workflow's stored goal; raises ValidationError when invalid."""
    goal = GoalDef.model_validate(row.goal)
    node = parse(goal.conditions)
    return CompiledGoal(workflow_id=row.id, event_type=goal.event_type, window=goal.window,
                        predicate=compile_python(node), segment_refs=node_segment_refs(node))


@dataclass
class ActiveTriggers:
    by_event_type: dict[str, list[CompiledTrigger]] = field(default_factory=dict)
    # Segment definitions by name and by id, for in_segment during evaluation.
    segments: dict[str, SegmentInfo] = field(default_factory=dict)
    # Workflows' goals by their event type (workers/events/goals.py records them).
    goals: dict[str, list[CompiledGoal]] = field(default_factory=dict)

    def for_event(self, event: Event) -> list[CompiledTrigger]:
        """The triggers an event is evaluated by: its type's, and for a segment event its segment's."""
        triggers = self.by_event_type.get(event.event_type, [])
        if event.event_type not in SEGMENT_EVENTS:
            return triggers
        segment = event.data.get("segment_id")
        return [t for t in triggers if str(t.segment_id) == segment]

    def goals_for(self, event_type: str) -> list[CompiledGoal]:
        return self.goals.get(event_type, [])

    def __iter__(self) -> Iterator[CompiledTrigger]:
        for triggers in self.by_event_type.values():
            yield from triggers


FINGERPRINT_SQL = text(
    "SELECT md5(coalesce(string_agg(t::text || '|' || coalesce(w.version, '') || '|' || "
    "coalesce(w.status, ''), ',' ORDER BY t.id), '') || '#' || "
    "coalesce((SELECT string_agg(s::text, ',' ORDER BY s.id) FROM user_segments s), '') "
    "|| '#' || "
    "coalesce((SELECT string_agg(g.id::text || (g.settings->'goal')::text, ',' ORDER BY g.id) "
    "FROM workflows g WHERE jsonb_typeof(g.settings->'goal') = 'object'), '')) "
    "FROM triggers t LEFT JOIN workflows w ON w.id = t.workflow_id"
)

GOALS_SQL = text("SELECT id, name, settings->'goal' AS goal FROM workflows "
                 "WHERE jsonb_typeof(settings->'goal') = 'object'")

SEGMENTS_SQL = text("SELECT id, name, kind, conditions, ttl_seconds FROM user_segments")

LOAD_SQL = text(
    "SELECT t.id, t.name, t.event_type, t.conditions, t.workflow_id, t.reentry, "
    "t.max_runs_per_user, t.cooldown_seconds, t.start_variables, t.segment_id, "
    "w.version AS workflow_version, "
    "w.status AS workflow_status "
    "FROM triggers t LEFT JOIN workflows w ON w.id = t.workflow_id WHERE t.enabled"
)


def compile_trigger(row: Any) -> CompiledTrigger:
    """Compile one triggers row; raises ConditionError or StartVariableError when invalid."""
    node = parse(row.conditions)
    active = row.workflow_id is not None and row.workflow_status == "active"
    return CompiledTrigger(
        id=row.id,
        name=row.name,
        event_type=row.event_type,
        workflow_id=row.workflow_id if active else None,
        workflow_version=row.workflow_version if active else None,
        reentry=row.reentry,
        max_runs_per_user=row.max_runs_per_user,
        cooldown_seconds=row.cooldown_seconds,
        predicate=compile_python(node),
        segment_refs=node_segment_refs(node),
        start_variables=compile_start_variables(row.start_variables or {}),
        segment_id=row.segment_id,
    )


@dataclass
class _Loaded:
    fingerprint: str | None = None
    checked: float = -math.inf  # never checked: the first get() loads, whatever the clock
    active: ActiveTriggers = field(default_factory=ActiveTriggers)


class TriggerCache:
    """Per-process cache of compiled enabled triggers, one set per workspace (each is
    read under that workspace's row-level security)."""

    def __init__(self, refresh_seconds: float | None = None) -> None:
        self.refresh_seconds = (get_settings().trigger_cache_seconds if refresh_seconds is None
                                else refresh_seconds)
        self._workspaces: dict[uuid.UUID, _Loaded] = {}

    def get(self, session: Session) -> ActiveTriggers:
        """The current workspace's triggers (db/tenancy.py)."""
        loaded = self._workspaces.setdefault(tenancy.current_workspace(), _Loaded())
        if time.monotonic() - loaded.checked < self.refresh_seconds:
            return loaded.active
        fingerprint = session.execute(FINGERPRINT_SQL).scalar_one()
        if fingerprint != loaded.fingerprint:
            loaded.active = self._load(session)
            loaded.fingerprint = fingerprint
        loaded.checked = time.monotonic()
        return loaded.active

    def _load(self, session: Session) -> ActiveTriggers:
        active = ActiveTriggers()
        for row in session.execute(LOAD_SQL):
            try:
                trigger = compile_trigger(row)
            except (ConditionError, StartVariableError) as exc:
                # Validated on create; a row written around the CLI must not stop ingest.
                log.error("trigger.invalid", trigger_id=str(row.id), error=str(exc))
                continue
            active.by_event_type.setdefault(trigger.event_type, []).append(trigger)
        watch: dict[uuid.UUID, set[str]] = {}
        for trigger in active:
            if trigger.segment_id is not None:
                watch.setdefault(trigger.segment_id, set()).add(trigger.event_type)
        for row in session.execute(SEGMENTS_SQL):
            try:
                segment = segment_info(row, frozenset(watch.get(row.id, ())))
            except ConditionError as exc:
                log.error("segment.invalid_conditions", segment_id=str(row.id), error=str(exc))
                continue
            active.segments[segment.name] = active.segments[str(segment.id)] = segment
        for row in session.execute(GOALS_SQL):
            try:
                goal = compile_goal(row)
            except ValidationError as exc:  # validated by `fleet apply`, as triggers are
                log.error("goal.invalid", workflow=row.name, error=str(exc))
                continue
            active.goals.setdefault(goal.event_type, []).append(goal)
        log.info("definitions.loaded", triggers=sum(1 for _ in active),
                 segments=len(active.segments) // 2,
                 goals=sum(len(g) for g in active.goals.values()))
        return active


_PROCESS_TRIGGERS: TriggerCache | None = None


def process_triggers() -> TriggerCache:
    """This process's trigger cache, shared by every task that ingests events."""
    global _PROCESS_TRIGGERS
    if _PROCESS_TRIGGERS is None:
        _PROCESS_TRIGGERS = TriggerCache()
    return _PROCESS_TRIGGERS
