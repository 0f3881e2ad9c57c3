"""Set-based refresh of a dynamic segment's cached memberships.

One INSERT … SELECT computes every member with the segment's SQL condition and
upserts their rows with a fresh `valid_until`; one DELETE removes the rows this
refresh did not touch (users who no longer match). No user is loaded into Python,
so it scales with PostgreSQL, not with the worker.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, func, literal, select, update
from sqlalchemy.dialects.postgresql import TIMESTAMP
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.models import SegmentExclusion, User, UserSegment, UserSegmentMembership
from workers.rules.conditions import parse
from workers.rules.sql_backend import compile_sql

TS = TIMESTAMP(timezone=True)


@dataclass(frozen=True)
class RefreshResult:
    segment_id: uuid.UUID
    members: int
    removed: int


def refresh_segment(session: Session, segment_id: uuid.UUID,
                    now: dt.datetime | None = None) -> RefreshResult | None:
    """Recompute a dynamic segment in the caller's transaction; None for static/missing ones."""
    now = now or dt.datetime.now(dt.UTC)
    segment = session.execute(
        select(UserSegment).where(UserSegment.id == segment_id).with_for_update(skip_locked=True)
    ).scalar_one_or_none()
    if segment is None or segment.kind != "dynamic":
        return None  # static, gone, or being refreshed by another worker right now
    condition = compile_sql(parse(segment.conditions, allow_event=False), now=now)
    until = now + dt.timedelta(seconds=segment.ttl_seconds)
    members = select(User.id, literal(segment.id), literal(now, TS), literal(until, TS)) \
        .where(condition)
    stmt = pg_insert(UserSegmentMembership).from_select(
        ["user_id", "segment_id", "evaluated_at", "valid_until"], members)
    upsert = stmt.on_conflict_do_update(
        index_elements=["user_id", "segment_id"],
        set_={"evaluated_at": stmt.excluded.evaluated_at, "valid_until": stmt.excluded.valid_until},
    ).returning(UserSegmentMembership.user_id).cte("upserted")
    # Counted in SQL: the members never travel to Python.
    upserted = session.execute(select(func.count()).select_from(upsert)).scalar_one()
    stale = delete(UserSegmentMembership).where(
        UserSegmentMembership.segment_id == segment.id,
        UserSegmentMembership.evaluated_at < now,
    ).returning(UserSegmentMembership.user_id).cte("removed")
    removed = session.execute(select(func.count()).select_from(stale)).scalar_one()
    # The refresh is the newer answer for everyone: earlier "not a member" answers go.
    session.execute(delete(SegmentExclusion).where(SegmentExclusion.segment_id == segment.id,
                                                   SegmentExclusion.evaluated_at < now))
    session.execute(update(UserSegment).where(UserSegment.id == segment.id)
                    .values(refreshed_at=now))
    return RefreshResult(segment.id, upserted, removed)


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


def set_static_members(session: Session, segment_id: uuid.UUID, user_ids: list[uuid.UUID],
                       add: bool) -> int:
    """Add users to (or remove them from) a static segment; returns how many rows changed.

    Static memberships never expire (`valid_until` NULL) and are never recomputed.
    """
    if not user_ids:
        return 0
    if add:
        changed = session.execute(pg_insert(UserSegmentMembership).values(
            [{"user_id": u, "segment_id": segment_id, "valid_until": None} for u in user_ids]
        ).on_conflict_do_nothing().returning(UserSegmentMembership.user_id)).all()
    else:
        changed = session.execute(delete(UserSegmentMembership).where(
            UserSegmentMembership.segment_id == segment_id,
            UserSegmentMembership.user_id.in_(user_ids)).returning(
            UserSegmentMembership.user_id)).all()
    return len(changed)
