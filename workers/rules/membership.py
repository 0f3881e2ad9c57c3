"""Segment membership as conditions read it: the cache table first, SQL on a miss.

`user_segment_memberships` holds members, `segment_exclusions` users evaluated as
not members, each row with a `valid_until`. For a message's users and the segments
its triggers mention, one query reads the still-valid rows of both; users with
neither (cold or expired cache) are evaluated on the spot with the segment's SQL
condition and the answer is written back to both tables, in one statement per
segment. A cold cache is never read as "not a member". Static segments are never
computed: their membership rows are the truth.

For watched segments (workers/rules/transitions.py) each evaluation takes the
segment's shared write lock first and collects the rows it inserted or deleted in
`transitions`, which the caller writes to the outbox in the same transaction.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import cast, delete, exists, func, literal, literal_column, select, text
from sqlalchemy.dialects.postgresql import ARRAY, TIMESTAMP
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.models import SegmentExclusion as X
from db.models import User
from db.models import UserSegmentMembership as M
from workers.rules.conditions import Node, parse
from workers.rules.sql_backend import compile_sql
from workers.rules.transitions import Transition, lock_for_writes, transitions

TS = TIMESTAMP(timezone=True)


@dataclass(frozen=True)
class SegmentInfo:
    id: uuid.UUID
    name: str
    kind: str
    condition: Node  # parsed once, when the definitions are loaded
    ttl: dt.timedelta
    watch: frozenset[str] = frozenset()  # the transition events enabled triggers want


def segment_info(row: Any, watch: frozenset[str] = frozenset()) -> SegmentInfo:
    """From a user_segments row; raises ConditionError for invalid stored conditions."""
    return SegmentInfo(row.id, row.name, row.kind, parse(row.conditions, allow_event=False),
                       dt.timedelta(seconds=row.ttl_seconds), watch)


# Joined with unnest(:users), not `user_id = ANY(:users)`: once prepared, PostgreSQL's
# generic plan compares each row with every element of an ANY parameter.
PREFETCH = text(
    "SELECT m.user_id, m.segment_id, true AS member FROM user_segment_memberships m "
    "JOIN unnest(CAST(:users AS uuid[])) AS k(user_id) ON m.user_id = k.user_id "
    "WHERE m.segment_id = ANY(CAST(:segments AS uuid[])) "
    "AND (m.valid_until IS NULL OR m.valid_until > :now) "
    "UNION ALL "
    "SELECT x.user_id, x.segment_id, false FROM segment_exclusions x "
    "JOIN unnest(CAST(:users AS uuid[])) AS k(user_id) ON x.user_id = k.user_id "
    "WHERE x.segment_id = ANY(CAST(:segments AS uuid[])) AND x.valid_until > :now")


class MembershipResolver:
    """Answers `is_member(user, segment)` for one message, from a batched prefetch."""

    def __init__(self, session: Session, now: dt.datetime,
                 segments: Mapping[str, SegmentInfo]) -> None:
        self.session = session
        self.now = now
        self.segments = segments  # by name and by id; a ref naming none has no members
        self.members: set[tuple[uuid.UUID, uuid.UUID]] = set()
        self.known: set[tuple[uuid.UUID, uuid.UUID]] = set()
        self.transitions: list[Transition] = []  # of watched segments, for the outbox

    def prefetch(self, user_ids: Iterable[uuid.UUID], refs: Iterable[str]) -> None:
        """Resolve every (user, segment) pair not known yet, in a few set-based queries."""
        users = sorted(set(user_ids))
        segments = {self.segments[r].id: self.segments[r] for r in refs if r in self.segments}
        pending = [(u, s) for s in segments for u in users if (u, s) not in self.known]
        if not pending:
            return
        valid = self.session.execute(PREFETCH, {
            "users": sorted({u for u, _ in pending}), "segments": sorted({s for _, s in pending}),
            "now": self.now}).all()
        cached = {(r.user_id, r.segment_id) for r in valid}
        self.members.update((r.user_id, r.segment_id) for r in valid if r.member)
        for segment_id, segment in segments.items():
            cold = [u for u, s in pending if s == segment_id and (u, s) not in cached]
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
        """Compute membership of `user_ids` now and write both answers back, in one statement.

        The statement returns, per user, whether it is a member and whether this
        write inserted (entered) or deleted (exited) its membership row.
        """
        if segment.watch:
            lock_for_writes(self.session, [segment.id])
        condition = compile_sql(segment.condition, now=self.now)
        until = literal(self.now + segment.ttl, TS)
        now = literal(self.now, TS)
        # NULL (a missing attribute) is "not a member", as in a WHERE clause.
        member = func.coalesce(condition, literal(False))
        evaluated = select(User.id.label("user_id"), member.label("member")).where(
            User.id == func.any(cast(user_ids, ARRAY(PG_UUID)))).cte("evaluated")
        members = select(evaluated.c.user_id, literal(segment.id), now, until) \
            .where(evaluated.c.member)
        excluded = select(evaluated.c.user_id, literal(segment.id), now, until) \
            .where(~evaluated.c.member)
        columns = ["user_id", "segment_id", "evaluated_at", "valid_until"]
        add_m = pg_insert(M).from_select(columns, members)
        add_x = pg_insert(X).from_select(columns, excluded)
        refresh = {"evaluated_at": now, "valid_until": until}
        # xmax = 0 on a row an upsert returns: the row was inserted, not updated.
        added = add_m.on_conflict_do_update(index_elements=["user_id", "segment_id"],
                                            set_=refresh) \
            .returning(M.user_id, literal_column("xmax = 0").label("inserted")) \
            .cte("add_members")
        dropped = delete(M).where(M.segment_id == segment.id, M.user_id.in_(
            select(evaluated.c.user_id).where(~evaluated.c.member))) \
            .returning(M.user_id).cte("drop_members")
        entered = exists().where(added.c.user_id == evaluated.c.user_id, added.c.inserted)
        exited = exists().where(dropped.c.user_id == evaluated.c.user_id)
        statement = select(evaluated.c.user_id, evaluated.c.member, entered, exited).add_cte(
            added,
            add_x.on_conflict_do_update(index_elements=["user_id", "segment_id"], set_=refresh)
            .cte("add_exclusions"),
            dropped,
            delete(X).where(X.segment_id == segment.id, X.user_id.in_(
                select(evaluated.c.user_id).where(evaluated.c.member))).cte("drop_exclusions"),
        )
        rows = self.session.execute(statement).all()
        for user_id, member, _, _ in rows:
            if member:
                self.members.add((user_id, segment.id))
            else:
                self.members.discard((user_id, segment.id))
        self.transitions += transitions(segment.id, segment.watch,
                                        entered=[r[0] for r in rows if r[2]],
                                        exited=[r[0] for r in rows if r[3]])
