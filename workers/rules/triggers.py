"""Enabled triggers and segment definitions, compiled once and cached per worker process.

The cache re-reads the definitions when their fingerprint (a hash of every
trigger row with its workflow's version and status, and of every segment) changes.
The fingerprint is checked at most every FLEET_TRIGGER_CACHE_SECONDS (default 2),
so a create, update or disable takes effect within seconds on every worker,
without a restart.
"""

from __future__ import annotations

import datetime as dt
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from workers.log import get_logger
from workers.rules.conditions import ConditionError, parse
from workers.rules.conditions import segment_refs as node_segment_refs
from workers.rules.membership import MembershipResolver, SegmentInfo, segment_info
from workers.rules.python_backend import EvalContext, compile_python
from workers.settings import get_settings

if TYPE_CHECKING:
    from workers.events.envelope import Event

log = get_logger(__name__)


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

    def evaluate(self, event: Event, user: UserView, now: dt.datetime,
                 membership: MembershipResolver, session: Session) -> bool:
        context = EvalContext(
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
        return self.predicate(context)


@dataclass
class ActiveTriggers:
    by_event_type: dict[str, list[CompiledTrigger]] = field(default_factory=dict)
    # Segment definitions by name and by id, for in_segment during evaluation.
    segments: dict[str, SegmentInfo] = field(default_factory=dict)

    def for_event_type(self, event_type: str) -> list[CompiledTrigger]:
        return self.by_event_type.get(event_type, [])

    def __iter__(self) -> Iterator[CompiledTrigger]:
        for triggers in self.by_event_type.values():
            yield from triggers


FINGERPRINT_SQL = text(
    "SELECT md5(coalesce(string_agg(t::text || '|' || coalesce(w.version, '') || '|' || "
    "coalesce(w.status, ''), ',' ORDER BY t.id), '') || '#' || "
    "coalesce((SELECT string_agg(s::text, ',' ORDER BY s.id) FROM user_segments s), '')) "
    "FROM triggers t LEFT JOIN workflows w ON w.id = t.workflow_id"
)

SEGMENTS_SQL = text("SELECT id, name, kind, conditions, ttl_seconds FROM user_segments")

LOAD_SQL = text(
    "SELECT t.id, t.name, t.event_type, t.conditions, t.workflow_id, t.reentry, "
    "t.max_runs_per_user, t.cooldown_seconds, w.version AS workflow_version, "
    "w.status AS workflow_status "
    "FROM triggers t LEFT JOIN workflows w ON w.id = t.workflow_id WHERE t.enabled"
)


def compile_trigger(row: Any) -> CompiledTrigger:
    """Compile one triggers row; raises ConditionError for an invalid condition."""
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
    )


class TriggerCache:
    """Per-process cache of compiled enabled triggers."""

    def __init__(self, refresh_seconds: float | None = None) -> None:
        self.refresh_seconds = (get_settings().trigger_cache_seconds if refresh_seconds is None
                                else refresh_seconds)
        self._fingerprint: str | None = None
        self._checked = -math.inf  # never checked: the first get() loads, whatever the clock
        self._active = ActiveTriggers()

    def get(self, session: Session) -> ActiveTriggers:
        if time.monotonic() - self._checked < self.refresh_seconds:
            return self._active
        fingerprint = session.execute(FINGERPRINT_SQL).scalar_one()
        if fingerprint != self._fingerprint:
            self._active = self._load(session)
            self._fingerprint = fingerprint
        self._checked = time.monotonic()
        return self._active

    def _load(self, session: Session) -> ActiveTriggers:
        active = ActiveTriggers()
        for row in session.execute(LOAD_SQL):
            try:
                trigger = compile_trigger(row)
            except ConditionError as exc:
                # Validated on create; a row written around the CLI must not stop ingest.
                log.error("trigger.invalid_conditions", trigger_id=str(row.id), error=str(exc))
                continue
            active.by_event_type.setdefault(trigger.event_type, []).append(trigger)
        for row in session.execute(SEGMENTS_SQL):
            try:
                segment = segment_info(row)
            except ConditionError as exc:
                log.error("segment.invalid_conditions", segment_id=str(row.id), error=str(exc))
                continue
            active.segments[segment.name] = active.segments[str(segment.id)] = segment
        log.info("definitions.loaded", triggers=sum(1 for _ in active),
                 segments=len(active.segments) // 2)
        return active


_PROCESS_TRIGGERS: TriggerCache | None = None


def process_triggers() -> TriggerCache:
    """This process's trigger cache, shared by every task that ingests events."""
    global _PROCESS_TRIGGERS
    if _PROCESS_TRIGGERS is None:
        _PROCESS_TRIGGERS = TriggerCache()
    return _PROCESS_TRIGGERS
