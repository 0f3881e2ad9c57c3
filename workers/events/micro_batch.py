"""Ingest single-event messages in micro-batches: one transaction for many messages.

`events.ingest` carries one event per message, the common case for producers. A
transaction per message spends most of its time on fixed costs (round trips, the
commit's WAL flush), so the events worker buffers these messages (celery-batches:
up to `FLUSH_EVERY` messages or `FLUSH_INTERVAL` seconds) and ingests each buffer in
one transaction, acknowledging the messages only after it returns.

celery-batches acknowledges a buffer even if its function raised, so this function
never returns without the events being safe: committed; or, once the retry policy
(`workers.retry_policy`, the tasks' own, waiting in this process) gives up, handed
to `events.ingest_batch`, whose retries and dead letters apply; or, if even that
publish fails, the pool process exits, so no message is acknowledged and the broker
delivers them again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from db import tenancy
from db.models import DEFAULT_WORKSPACE_ID
from db.session import session_scope
from workers.events.envelope import with_message_ids
from workers.events.ingest import IngestResult, ingest
from workers.log import get_logger
from workers.retry_policy import GiveUp, RetryPolicy
from workers.rules.triggers import process_triggers

log = get_logger(__name__)


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
    would hold every buffered message meanwhile (`RetryPolicy.in_process`).
    """
    policy = RetryPolicy.from_settings().in_process(MAX_RETRY_DELAY)
    retries = 0
    while True:
        try:
            # A producer's message names no workspace: its events name theirs (ingest).
            with tenancy.workspace(DEFAULT_WORKSPACE_ID), session_scope() as session:
                return ingest(session, raws, source=source, triggers=process_triggers())
        except Exception as exc:
            decision = policy.decide(exc, retries)
            if isinstance(decision, GiveUp):
                log.error("events.micro_batch_failed", error=repr(exc), events=len(raws))
                break
            retries += 1
            log.warning("events.micro_batch_retry", error=repr(exc), attempt=retries,
                        delay=round(decision.delay, 3))
            time.sleep(decision.delay)
    try:
        hand_off(list(raws))
    except Exception as exc:  # the events are neither stored nor re-published: do not ack
        log.critical("events.micro_batch_unsafe", error=repr(exc), events=len(raws))
        os._exit(70)
    return None
