"""Seed 002's transactional outbox, for producers that share the fleet's database.

A producer writes its event in its own transaction (`add_to_outbox`); the relay
publishes pending rows in one batch message and marks them published in the same
transaction. If the relay dies between publishing and committing, the rows are
published again later and ingest's event_id dedupe makes that a no-op downstream:
an event is never lost between a commit and the broker, and takes effect once.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import EventOutbox
from workers.events.envelope import build_event
from workers.queues import TaskNames

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
