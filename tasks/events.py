"""Event ingest tasks (events queue): unpack the message, call the ingest service."""

from __future__ import annotations

from typing import Any

import structlog

from workers.base_task import FleetTask
from workers.celery_app import app
from workers.engine import dispatch
from workers.events.ingest import IngestResult, ingest
from workers.log import get_logger
from workers.queues import TaskNames
from workers.rules.triggers import process_triggers

log = get_logger(__name__)


def _run(task: FleetTask, raws: list[Any]) -> dict[str, int]:
    if len(raws) == 1 and isinstance(raws[0], dict):
        structlog.contextvars.bind_contextvars(event_id=raws[0].get("event_id"))
    result: IngestResult = ingest(task.session, raws, source=task.name, triggers=process_triggers())
    log.info("events.ingested", accepted=result.accepted, duplicates=result.duplicates,
             rejected=result.rejected, evaluated=result.evaluated, matched=result.matched,
             started=len(result.started), woken=len(result.woken))
    task.after_commit(lambda: dispatch.send_ingest_followups([result]))
    return {"accepted": result.accepted, "rejected": result.rejected}


@app.task(base=FleetTask, bind=True, name=TaskNames.INGEST)
def ingest_one(self: FleetTask, event: Any) -> dict[str, int]:
    """One event per message."""
    return _run(self, [event])


@app.task(base=FleetTask, bind=True, name=TaskNames.INGEST_BATCH)
def ingest_batch(self: FleetTask, events: Any) -> dict[str, int]:
    """A batch per message; a non-list body is dead-lettered as one bad event."""
    return _run(self, events if isinstance(events, list) else [events])
