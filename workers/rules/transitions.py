"""Segment entries and exits: which memberships are watched, and how their writers serialise.

A user *enters* a segment when a membership row is inserted and *exits* it when the
row is deleted: every writer (the refresh sweep, the identify re-evaluation, the
lazy evaluation of a cold cache, a static add or remove, a stage change) reports
those rows from its own `RETURNING`, so each change of the stored state is one
transition, seen by exactly one transaction. The callers turn them into
`segment.entered` / `segment.exited` events in the outbox, in the same transaction
(workers/events/outbox.py `add_segment_transitions`), so a transition commits with
its event or not at all.

Only *watched* segments (an enabled trigger names them in `triggers.segment_id`)
report transitions: a refresh of an unwatched segment writes no event.

Locking, for watched segments only. The refresh computes membership from a
snapshot of `users`; an identify committing after that snapshot but before the
refresh's writes would otherwise be overwritten with the older answer (a spurious
exit, or an entry for a user who no longer matches). So the refresh holds the
segment's transaction-scoped advisory lock exclusively, and every other writer
holds it shared before it writes that segment's rows. Either the refresh starts
after the writer committed (and its statements, each with a new snapshot, read the
writer's attributes), or the writer waits for the refresh to commit and then
evaluates on top of it. Writers take their shared locks in segment-id order and
the refresh takes one lock, so the order is total: no deadlock. Transaction-scoped
locks survive a transaction-pooling PgBouncer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from workers.event_types import SEGMENT_ENTERED, SEGMENT_EXITED


@dataclass(frozen=True)
class Transition:
    """One change of a user's stored membership of a watched segment."""

    user_id: uuid.UUID
    segment_id: uuid.UUID
    entered: bool

    @property
    def event_type(self) -> str:
        return SEGMENT_ENTERED if self.entered else SEGMENT_EXITED


WATCHED_SQL = text(
    "SELECT segment_id, array_agg(DISTINCT event_type) AS kinds FROM triggers "
    "WHERE enabled AND segment_id IS NOT NULL "
    "AND (CAST(:segment AS uuid) IS NULL OR segment_id = CAST(:segment AS uuid)) "
    "GROUP BY segment_id")


def watched_segments(session: Session, segment_id: uuid.UUID | None = None
                     ) -> dict[uuid.UUID, frozenset[str]]:
    """The segments enabled triggers watch (or just `segment_id`), with the events they want."""
    return {row.segment_id: frozenset(row.kinds)
            for row in session.execute(WATCHED_SQL, {"segment": segment_id})}


def lock_for_writes(session: Session, segment_ids: Iterable[uuid.UUID], *,
                    exclusive: bool = False) -> None:
    """Take the watched segments' write locks (shared, or the refresh's exclusive one)."""
    ids = sorted(set(segment_ids))
    if not ids:
        return
    fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    session.execute(text(
        f"SELECT {fn}(hashtextextended('segment:' || k.id, 0)) "
        "FROM unnest(CAST(:ids AS uuid[])) WITH ORDINALITY AS k(id, n) ORDER BY k.n"),
        {"ids": ids})


def transitions(segment_id: uuid.UUID, watch: frozenset[str], entered: Iterable[uuid.UUID],
                exited: Iterable[uuid.UUID]) -> list[Transition]:
    """The transitions of one segment that its triggers want."""
    found = []
    if SEGMENT_ENTERED in watch:
        found += [Transition(u, segment_id, True) for u in entered]
    if SEGMENT_EXITED in watch:
        found += [Transition(u, segment_id, False) for u in exited]
    return found

