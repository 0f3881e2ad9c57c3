"""Replay of dead letters: send them again, corrected if need be."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import DeadLetter
from workers.celery_app import app
from workers.producer import publish_batch


def replay(session: Session, dead_letter_id: int, corrected: Any | None = None) -> str:
    """Send a dead letter again and mark it replayed; returns the task name it went to.

    Rejected events go back through ingest (as a batch of one, so a still-bad
    payload is dead-lettered again rather than failing the message). Failed task
    messages (payload {"task", "args", "kwargs"}) are re-sent to their task.
    """
    letter = session.execute(
        select(DeadLetter).where(DeadLetter.id == dead_letter_id).with_for_update()
    ).scalar_one_or_none()
    if letter is None:
        raise LookupError(f"no dead letter {dead_letter_id}")
    # Sent before the status commits: if the commit fails the letter stays pending and
    # a second replay is deduped by event_id; the other order could lose the replay.
    if corrected is None and letter.raw_size is not None and letter.raw_size > len(letter.raw_payload):
        raise ValueError(f"dead letter {dead_letter_id} kept only {len(letter.raw_payload)} of its "
                         f"{letter.raw_size} bytes: replay it with a corrected payload")
    body = corrected if corrected is not None else letter.payload
    if isinstance(body, dict) and {"task", "args"} <= body.keys() and corrected is None:
        app.send_task(body["task"], args=body["args"], kwargs=body.get("kwargs") or {})
        target = str(body["task"])
    else:
        publish_batch([body if body is not None else letter.raw_payload.decode("utf-8", "replace")])
        target = "events.ingest_batch"
    session.execute(
        update(DeadLetter).where(DeadLetter.id == dead_letter_id).values(
            status="replayed", replay_count=DeadLetter.replay_count + 1,
            replayed_at=func.now(),
        )
    )
    return target
