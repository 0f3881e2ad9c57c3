"""Seed 002's transactional outbox, for producers that share the fleet's database.

A producer writes its event in its own transaction (`add_to_outbox`); the relay
publishes pending rows in one batch message and marks them published in the same
transaction. If the relay dies between publishing and committing, the rows are
published again later and ingest's event_id dedupe makes that a no-op downstream:
an event is never lost between a commit and the broker, and takes effect once.

A message the broker accepted can still be lost on its way to a worker: kombu's
Redis transport pops a message (BRPOP) before it records it as unacknowledged, so
a broker restart in between drops it. `confirm_published` closes that gap for
outbox producers: a published row whose event never reached `event_inbox` (or the
dead-letter table) goes back to PENDING and is published again.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from db.models import EventOutbox
from workers.events.envelope import build_event
from workers.queues import TaskNames
from workers.rules.transitions import Transition

MAX_PUBLISH_ATTEMPTS = 10


def add_to_outbox(session: Session, event_type: str, *, user: str | uuid.UUID,
                  data: Mapping[str, Any] | None = None, event_id: uuid.UUID | None = None,
                  occurred_at: dt.datetime | None = None) -> uuid.UUID:
    """Write one validated event into the outbox, in the caller's transaction."""
    event = build_event(event_type, user=user, data=data, event_id=event_id,
                        occurred_at=occurred_at)
    session.add(EventOutbox(
        event_id=event.event_id,
        topic=TaskNames.INGEST_BATCH,
        partition_key=event.user,
        headers={"event_type": event.event_type},
        payload=event.to_message(),
    ))
    return event.event_id


def add_segment_transitions(session: Session, transitions: Sequence[Transition],
                            now: dt.datetime | None = None) -> int:
    """Write `segment.entered` / `segment.exited` events for these transitions, in one statement.

    Called in the transaction that changed the memberships, so an entry or exit is
    published if and only if it committed. Each event is `{segment, segment_id}` about
    its user, with a fresh event_id kept in the row (a re-publish is a duplicate).
    """
    if not transitions:
        return 0
    occurred = (now or dt.datetime.now(dt.UTC)).isoformat()
    session.execute(text(
        "INSERT INTO event_outbox (event_id, topic, partition_key, headers, payload) "
        "SELECT k.id, :topic, CAST(k.user_id AS text), jsonb_build_object('event_type', k.type), "
        "  jsonb_build_object('event_id', CAST(k.id AS text), 'event_type', k.type, "
        "    'user', CAST(k.user_id AS text), 'occurred_at', CAST(:occurred AS text), "
        "    'data', jsonb_build_object('segment', s.name, 'segment_id', CAST(s.id AS text))) "
        # The volatile id keeps the subquery from being flattened: one id per row.
        "FROM (SELECT gen_random_uuid() AS id, u.* FROM unnest(CAST(:users AS uuid[]), "
        "  CAST(:segments AS uuid[]), CAST(:types AS text[])) AS u(user_id, segment_id, type)) k "
        "JOIN user_segments s ON s.id = k.segment_id"),
        {"topic": TaskNames.INGEST_BATCH, "occurred": occurred,
         "users": [t.user_id for t in transitions], "segments": [t.segment_id for t in transitions],
         "types": [t.event_type for t in transitions]})
    return len(transitions)


def relay_outbox(session: Session, publish: Callable[[list[dict[str, Any]]], None],
                 limit: int = 500) -> int:
    """Publish up to `limit` pending rows as one batch and mark them; returns the count.

    Rows are claimed with FOR UPDATE SKIP LOCKED, so several relays never publish
    the same row at once. A failed publish counts an attempt on each row and leaves
    it pending; after MAX_PUBLISH_ATTEMPTS a row is marked FAILED with the error.
    """
    rows = session.execute(
        select(EventOutbox.id, EventOutbox.payload)
        .where(EventOutbox.status == "PENDING")
        .order_by(EventOutbox.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return 0
    ids = [r.id for r in rows]
    try:
        publish([r.payload for r in rows])
    except Exception as exc:  # the broker is down: count it and try again next run
        session.execute(
            update(EventOutbox).where(EventOutbox.id.in_(ids)).values(
                retry_count=EventOutbox.retry_count + 1,
                error_message=str(exc)[:2000],
            )
        )
        session.execute(
            update(EventOutbox)
            .where(EventOutbox.id.in_(ids), EventOutbox.retry_count >= MAX_PUBLISH_ATTEMPTS)
            .values(status="FAILED")
        )
        raise
    session.execute(
        update(EventOutbox).where(EventOutbox.id.in_(ids)).values(
            status="PUBLISHED", published_at=dt.datetime.now(dt.UTC), error_message=None,
        )
    )
    return len(rows)


def confirm_published(session: Session, older_than: dt.timedelta,
                      events_queued: Callable[[], bool], limit: int = 5000) -> tuple[int, int]:
    """Confirm published rows whose event arrived; put the others back to PENDING.

    Looks only at rows published more than `older_than` ago and not yet confirmed
    (a partial index keeps that set small). A row is confirmed when its event_id is
    in the inbox (ingested, or a duplicate of an ingested one) or in dead_letters
    (rejected); otherwise it is published again, which ingest's dedupe makes safe
    if the first message was only late. After MAX_PUBLISH_ATTEMPTS it is FAILED.
    Nothing is judged while `events_queued()`: behind a backlog an event is late,
    not lost (asked only when some row is due, so the relay rarely asks the broker).
    Returns (confirmed, republished).
    """
    due = session.execute(text(
        "SELECT EXISTS (SELECT 1 FROM event_outbox WHERE status = 'PUBLISHED' "
        "AND confirmed_at IS NULL AND published_at < now() - make_interval(secs => :age))"),
        {"age": older_than.total_seconds()}).scalar_one()
    if not due or events_queued():
        return 0, 0
    rows = session.execute(text(
        "WITH due AS (SELECT id, event_id FROM event_outbox "
        "  WHERE status = 'PUBLISHED' AND confirmed_at IS NULL "
        "  AND published_at < now() - make_interval(secs => :age) "
        "  ORDER BY published_at LIMIT :limit FOR UPDATE SKIP LOCKED), "
        "seen AS (SELECT due.id, EXISTS (SELECT 1 FROM event_inbox i WHERE i.event_id = due.event_id) "
        "  OR EXISTS (SELECT 1 FROM dead_letters l WHERE l.event_id = due.event_id) AS arrived "
        "  FROM due) "
        "UPDATE event_outbox o SET "
        "  confirmed_at = CASE WHEN seen.arrived THEN now() END, "
        "  status = CASE WHEN seen.arrived THEN 'PUBLISHED' "
        "    WHEN o.retry_count + 1 >= :max THEN 'FAILED' ELSE 'PENDING' END, "
        "  retry_count = o.retry_count + CASE WHEN seen.arrived THEN 0 ELSE 1 END, "
        "  error_message = CASE WHEN seen.arrived THEN o.error_message "
        "    ELSE :why END "
        "FROM seen WHERE o.id = seen.id RETURNING seen.arrived"),
        {"age": older_than.total_seconds(), "limit": limit, "max": MAX_PUBLISH_ATTEMPTS,
         "why": f"not received by the fleet {older_than.total_seconds():.0f} s after publishing"},
    ).scalars().all()
    confirmed = sum(1 for arrived in rows if arrived)
    return confirmed, len(rows) - confirmed
