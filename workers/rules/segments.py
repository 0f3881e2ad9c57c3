"""Set-based refresh of a dynamic segment's cached memberships.

One INSERT … SELECT computes every member with the segment's SQL condition and
upserts their rows with a fresh `valid_until`; one DELETE removes the rows this
refresh did not touch (users who no longer match). No user is loaded into Python,
so it scales with PostgreSQL, not with the worker.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

from sqlalchemy import delete, func, literal, literal_column, select, update
from sqlalchemy.dialects.postgresql import TIMESTAMP
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.models import SegmentExclusion, User, UserSegment, UserSegmentMembership
from workers.rules.conditions import parse
from workers.rules.sql_backend import compile_sql
from workers.rules.transitions import Transition, lock_for_writes, transitions, watched_segments

TS = TIMESTAMP(timezone=True)


@dataclass(frozen=True)
class RefreshResult:
    segment_id: uuid.UUID
    members: int
    removed: int
    transitions: list[Transition] = field(default_factory=list)  # watched segments only


def refresh_segment(session: Session, segment_id: uuid.UUID,
                    now: dt.datetime | None = None) -> RefreshResult | None:
    """Recompute a dynamic segment in the caller's transaction; None for static/missing ones.

    A watched segment (workers/rules/transitions.py) is refreshed under its exclusive
    write lock, and the users it inserted (entered) or deleted (exited) come back in
    `transitions`; an unwatched one counts them in SQL only.
    """
    now = now or dt.datetime.now(dt.UTC)
    # NO KEY UPDATE: two refreshes exclude each other, while ingest's membership inserts
    # (whose foreign key takes KEY SHARE on this row) go on.
    segment = session.execute(
        select(UserSegment).where(UserSegment.id == segment_id)
        .with_for_update(skip_locked=True, key_share=True)
    ).scalar_one_or_none()
    if segment is None or segment.kind != "dynamic":
        return None  # static, gone, or being refreshed by another worker right now
    watch = watched_segments(session, segment.id).get(segment.id, frozenset())
    if watch:
        lock_for_writes(session, [segment.id], exclusive=True)
    condition = compile_sql(parse(segment.conditions, allow_event=False), now=now)
    until = now + dt.timedelta(seconds=segment.ttl_seconds)
    members = select(User.id, literal(segment.id), literal(now, TS), literal(until, TS)) \
        .where(condition)
    stmt = pg_insert(UserSegmentMembership).from_select(
        ["user_id", "segment_id", "evaluated_at", "valid_until"], members)
    # xmax = 0 on a row an upsert returns: inserted (the user entered), not updated.
    upsert = stmt.on_conflict_do_update(
        index_elements=["user_id", "segment_id"],
        set_={"evaluated_at": stmt.excluded.evaluated_at, "valid_until": stmt.excluded.valid_until},
    ).returning(UserSegmentMembership.user_id,
                literal_column("xmax = 0").label("inserted")).cte("upserted")
    stale = delete(UserSegmentMembership).where(
        UserSegmentMembership.segment_id == segment.id,
        UserSegmentMembership.evaluated_at < now,
    ).returning(UserSegmentMembership.user_id).cte("removed")
    if watch:
        rows = session.execute(select(upsert.c.user_id, upsert.c.inserted)).all()
        upserted = len(rows)
        gone = list(session.execute(select(stale.c.user_id)).scalars())
        found = transitions(segment.id, watch, entered=[r.user_id for r in rows if r.inserted],
                            exited=gone)
        removed = len(gone)
    else:  # counted in SQL: the members never travel to Python
        upserted = session.execute(select(func.count()).select_from(upsert)).scalar_one()
        removed = session.execute(select(func.count()).select_from(stale)).scalar_one()
        found = []
    # The refresh is the newer answer for everyone: earlier "not a member" answers go.
    session.execute(delete(SegmentExclusion).where(SegmentExclusion.segment_id == segment.id,
                                                   SegmentExclusion.evaluated_at < now))
    session.execute(update(UserSegment).where(UserSegment.id == segment.id)
                    .values(refreshed_at=now))
    return RefreshResult(segment.id, upserted, removed, found)


def segments_due(session: Session, now: dt.datetime, horizon: dt.timedelta) -> list[uuid.UUID]:
    """Dynamic segments never refreshed, or whose memberships expire within `horizon`."""
    expires = UserSegment.refreshed_at + func.make_interval(0, 0, 0, 0, 0, 0,
                                                            UserSegment.ttl_seconds)
    return list(session.execute(
        select(UserSegment.id).where(
            UserSegment.kind == "dynamic",
            (UserSegment.refreshed_at.is_(None)) | (expires < literal(now + horizon, TS)),
        ).order_by(UserSegment.refreshed_at.nulls_first())
    ).scalars())


@dataclass(frozen=True)
class StaticChange:
    changed: int  # membership rows added or removed
    transitions: list[Transition]  # those of them the segment's triggers want


def set_static_members(session: Session, segment_id: uuid.UUID, user_ids: list[uuid.UUID],
                       add: bool) -> StaticChange:
    """Add users to (or remove them from) a static segment, in the caller's transaction.

    Static memberships never expire (`valid_until` NULL) and are never recomputed.
    """
    if not user_ids:
        return StaticChange(0, [])
    watch = watched_segments(session, segment_id).get(segment_id, frozenset())
    if watch:
        lock_for_writes(session, [segment_id])
    if add:
        changed = session.execute(pg_insert(UserSegmentMembership).values(
            [{"user_id": u, "segment_id": segment_id, "valid_until": None} for u in user_ids]
        ).on_conflict_do_nothing().returning(UserSegmentMembership.user_id)).scalars().all()
    else:
        changed = session.execute(delete(UserSegmentMembership).where(
            UserSegmentMembership.segment_id == segment_id,
            UserSegmentMembership.user_id.in_(user_ids)).returning(
            UserSegmentMembership.user_id)).scalars().all()
    return StaticChange(len(changed), transitions(
        segment_id, watch, entered=changed if add else [], exited=[] if add else changed))
