"""Event ingest tasks (events queue): unpack the messages, call the ingest service."""

from __future__ import annotations

from typing import Any

import structlog

from workers.base_task import FleetTask
from workers.batches import FleetBatches
from workers.celery_app import app
from workers.engine import dispatch
from workers.events.envelope import with_message_ids
from workers.events.ingest import IngestResult, ingest
from workers.events.micro_batch import (
    FLUSH_EVERY,
    FLUSH_INTERVAL,
    ingest_durably,
    message_event,
)
from workers.log import get_logger
from workers.producer import publish_batch
from workers.queues import TaskNames
from workers.rules.triggers import process_triggers

log = get_logger(__name__)


def _logged(result: IngestResult) -> dict[str, int]:
    log.info("events.ingested", accepted=result.accepted, duplicates=result.duplicates,
             rejected=result.rejected, evaluated=result.evaluated, matched=result.matched,
             started=len(result.started), woken=len(result.woken))
    return {"accepted": result.accepted, "rejected": result.rejected,
            "duplicates": result.duplicates, "evaluated": result.evaluated,
            "matched": result.matched}


@app.task(base=FleetBatches, bind=True, name=TaskNames.INGEST, acks_late=True,
          flush_every=FLUSH_EVERY, flush_interval=FLUSH_INTERVAL)
def ingest_one(self: FleetBatches, requests: list[Any]) -> dict[str, int] | None:
    """One event per message; the worker ingests buffered messages in one transaction."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_name=self.name, messages=len(requests))
    result = ingest_durably([message_event(r) for r in requests], self.name, publish_batch)
    if result is None:
        return None
    dispatch.send_ingest_followups([result])
    return _logged(result)


@app.task(base=FleetTask, bind=True, name=TaskNames.INGEST_BATCH)
def ingest_batch(self: FleetTask, events: Any) -> dict[str, int]:
    """A batch per message; a non-list body is dead-lettered as one bad event.

    Envelopes without an event_id get ids derived from the message id and their
    index, so a redelivered batch is deduplicated.
    """
    raws = with_message_ids(events if isinstance(events, list) else [events], self.request.id)
    result = ingest(self.session, raws, source=self.name, triggers=process_triggers())
    self.after_commit(lambda: dispatch.send_ingest_followups([result]))
    return _logged(result)
