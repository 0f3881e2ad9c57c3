"""Ingest single-event messages in micro-batches: one transaction for many messages.

`events.ingest` carries one event per message, the common case for producers. A
transaction per message spends most of its time on fixed costs (round trips, the
commit's WAL flush), so the events worker buffers these messages (celery-batches:
up to `FLUSH_EVERY` messages or `FLUSH_INTERVAL` seconds) and ingests each buffer in
one transaction, acknowledging the messages only after it returns.

celery-batches acknowledges a buffer even if its function raised, so this function
never returns without the events being safe: committed; or, past the retry bound,
handed to `events.ingest_batch` (whose retries and dead letters apply); or, if even
that publish fails, the pool process exits, so no message is acknowledged and the
broker delivers them again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery_batches import Batches

from db.session import session_scope
from workers.base_task import backoff_delay
from workers.errors import is_outage, is_transient
from workers.events.envelope import with_message_ids
from workers.events.ingest import IngestResult, ingest
from workers.log import get_logger
from workers.rejected import GuardedStrategy
from workers.rules.triggers import process_triggers
from workers.settings import get_settings

log = get_logger(__name__)


class FleetBatches(GuardedStrategy, Batches):  # type: ignore[misc]
    """celery-batches' task, refusing expired, far-ETA and misrouted messages like FleetTask."""


FLUSH_EVERY = 100  # messages per transaction at most
FLUSH_INTERVAL = 0.02  # seconds a lone message waits for company
MAX_RETRY_DELAY = 30.0  # the pool process sleeps between attempts: keep it short


def message_event(request: Any) -> Any:
    """The event a buffered `events.ingest` request carries (None if it carries none).

    Without an event_id it gets one derived from the message id, so a redelivery is
    deduplicated; the id then travels with the event if it is handed off.
    """
    event = request.args[0] if request.args else (request.kwargs or {}).get("event")
    return with_message_ids([event], getattr(request, "id", None))[0]


def ingest_durably(raws: Sequence[Any], source: str,
                   hand_off: Callable[[list[Any]], None]) -> IngestResult | None:
    """Ingest `raws` in one transaction, retrying transient failures; never loses them.

    An outage (the database unreachable) is handed off at once: `events.ingest_batch`
    waits it out with backoff in the broker instead of in this pool process, which
    would hold every buffered message meanwhile.
    """
    settings = get_settings()
    for attempt in range(settings.task_max_retries + 1):
        try:
            with session_scope() as session:
                return ingest(session, raws, source=source, triggers=process_triggers())
        except Exception as exc:
            if not is_transient(exc) or is_outage(exc) or attempt == settings.task_max_retries:
                log.error("events.micro_batch_failed", error=repr(exc), events=len(raws))
                break
            delay = backoff_delay(attempt, settings.retry_backoff_base,
                                  min(settings.retry_backoff_max, MAX_RETRY_DELAY))
            log.warning("events.micro_batch_retry", error=repr(exc), attempt=attempt + 1,
                        delay=round(delay, 3))
            time.sleep(delay)
    try:
        hand_off(list(raws))
    except Exception as exc:  # the events are neither stored nor re-published: do not ack
        log.critical("events.micro_batch_unsafe", error=repr(exc), events=len(raws))
        os._exit(70)
    return None
