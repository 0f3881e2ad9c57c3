"""Segment membership as conditions read it: the cache table first, SQL on a miss.

`user_segment_memberships` holds members only, each with a `valid_until`. For a
message's users and the segments its triggers mention, one query reads the
still-valid rows; users without one (cold or expired cache) are evaluated on the
spot with the segment's SQL condition, in one statement per segment, and the
answer is written back (members upserted with a fresh valid_until, stale rows of
non-members deleted). A cold cache is never read as "not a member". Static
segments are never computed: their rows are the truth.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import cast, delete, func, or_, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.models import User, UserSegmentMembership
from workers.rules.conditions import Node, parse
from workers.rules.sql_backend import compile_sql


@dataclass(frozen=True)
class SegmentInfo:
    id: uuid.UUID
    name: str
    kind: str
    condition: Node  # parsed once, when the definitions are loaded
    ttl: dt.timedelta


def segment_info(row: Any) -> SegmentInfo:
    """From a user_segments row; raises ConditionError for invalid stored conditions."""
    return SegmentInfo(row.id, row.name, row.kind, parse(row.conditions, allow_event=False),
                       dt.timedelta(seconds=row.ttl_seconds))


class MembershipResolver:
    """Answers `is_member(user, segment)` for one message, from a batched prefetch."""

    def __init__(self, session: Session, now: dt.datetime,
                 segments: Mapping[str, SegmentInfo]) -> None:
        self.session = session
        self.now = now
        self.segments = segments  # by name and by id; a ref naming none has no members
        self.members: set[tuple[uuid.UUID, uuid.UUID]] = set()
        self.known: set[tuple[uuid.UUID, uuid.UUID]] = set()

    def prefetch(self, user_ids: Iterable[uuid.UUID], refs: Iterable[str]) -> None:
        """Resolve every (user, segment) pair not known yet, in a few set-based queries."""
        users = sorted(set(user_ids))
        segments = {self.segments[r].id: self.segments[r] for r in refs if r in self.segments}
        pending = [(u, s) for s in segments for u in users if (u, s) not in self.known]
        if not pending:
            return
        valid = self.session.execute(
            select(UserSegmentMembership.user_id, UserSegmentMembership.segment_id).where(
                UserSegmentMembership.user_id == func.any(
                    cast(sorted({u for u, _ in pending}), ARRAY(PG_UUID))),
                UserSegmentMembership.segment_id.in_({s for _, s in pending}),
                or_(UserSegmentMembership.valid_until.is_(None),
                    UserSegmentMembership.valid_until > self.now),
            )
        ).all()
        self.members.update((r.user_id, r.segment_id) for r in valid)
        for segment_id, segment in segments.items():
            cold = [u for u, s in pending if s == segment_id and (u, s) not in self.members]
            if cold and segment.kind == "dynamic":
                self._evaluate(segment, cold)
        self.known.update(pending)

    def reevaluate(self, user_ids: Iterable[uuid.UUID]) -> None:
        """Recompute these users' memberships of every dynamic segment and write them back."""
        users = sorted(set(user_ids))
        for segment in {s.id: s for s in self.segments.values()}.values():
            if segment.kind == "dynamic":
                self._evaluate(segment, users)
                self.known.update((u, segment.id) for u in users)

    def is_member(self, user_id: uuid.UUID, ref: str) -> bool:
        """Membership of one user; resolved on the spot if the prefetch did not cover it."""
        segment = self.segments.get(ref)
        if segment is None:
            return False
        if (user_id, segment.id) not in self.known:
            self.prefetch([user_id], [ref])
        return (user_id, segment.id) in self.members

    def _evaluate(self, segment: SegmentInfo, user_ids: list[uuid.UUID]) -> None:
        """Compute membership of `user_ids` now, and write the answer back to the cache."""
        condition = compile_sql(segment.condition, now=self.now)
        members = set(self.session.execute(
            select(User.id).where(User.id == func.any(cast(user_ids, ARRAY(PG_UUID))), condition)
        ).scalars())
        self.members.update((u, segment.id) for u in members)
        if members:
            stmt = pg_insert(UserSegmentMembership).values([
                {"user_id": u, "segment_id": segment.id, "evaluated_at": self.now,
                 "valid_until": self.now + segment.ttl}
                for u in sorted(members)
            ])
            self.session.execute(stmt.on_conflict_do_update(
                index_elements=["user_id", "segment_id"],
                set_={"evaluated_at": stmt.excluded.evaluated_at,
                      "valid_until": stmt.excluded.valid_until},
            ))
        gone = [u for u in user_ids if u not in members]
        if gone:
            self.session.execute(delete(UserSegmentMembership).where(
                UserSegmentMembership.segment_id == segment.id,
                UserSegmentMembership.user_id == func.any(cast(gone, ARRAY(PG_UUID))),
            ))
