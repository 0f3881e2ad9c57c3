"""Messages Celery refuses before any task runs, captured into the dead-letter table.

Celery acks an undecodable message (bad content type, broken JSON, invalid UTF-8)
and rejects one naming an unknown task or lacking task headers, logging only.
Here each becomes a dead letter with the reason and the exact body, so poison
input is visible, counted and replayable instead of silently gone. The queue is
never blocked: if the database is unreachable too, the body goes to the log.
"""

from __future__ import annotations

import json
from typing import Any

from celery.signals import task_rejected, task_unknown
from celery.worker.consumer import Consumer

from db.session import session_scope
from workers.dead_letters import record_dead_letter
from workers.log import get_logger

log = get_logger(__name__)


def _body(message: Any) -> bytes:
    body = getattr(message, "body", b"")
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    return bytes(body or b"")


def capture(source: str, reason: str, message: Any) -> None:
    """Record a refused message; never raises (the consumer must go on)."""
    try:
        headers = dict(getattr(message, "headers", None) or {})
        with session_scope() as session:
            record_dead_letter(
                session, source=source, reason=f"{reason} (headers: {json.dumps(headers, default=str)[:500]})",
                raw=_body(message), error_type="RejectedMessage",
            )
    except Exception as exc:  # noqa: BLE001 - the queue must not stop for this
        log.critical("message.dead_letter_failed", source=source, reason=reason,
                     error=repr(exc), body=_body(message)[:4096].decode("utf-8", "replace"))


class FleetConsumer(Consumer):
    """Celery's consumer, with undecodable messages dead-lettered before the ack."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        capture("broker:undecodable", f"{type(exc).__name__}: {exc}", message)
        super().on_decode_error(message, exc)


@task_unknown.connect
def _unknown_task(message: Any = None, exc: Exception | None = None, name: str | None = None,
                  **_: Any) -> None:
    capture("broker:unknown_task", f"no task named {name!r}", message)


@task_rejected.connect
def _rejected(message: Any = None, exc: Exception | None = None, **_: Any) -> None:
    reason = f"{type(exc).__name__}: {exc}" if exc else "not a task message (no task headers)"
    capture("broker:rejected", reason, message)
