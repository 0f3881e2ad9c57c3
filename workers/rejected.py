"""Messages Celery refuses before any task runs, captured into the dead-letter table.

Celery acks an undecodable message (bad content type, broken JSON, invalid UTF-8),
rejects one naming an unknown task or lacking task headers, and drops one past its
`expires`, logging only. Here each becomes a dead letter with the reason and the
exact body before it is acked, so poison input is visible, counted and replayable
instead of silently gone. If the dead letter cannot be stored (the database is
down) the message goes back to the queue after a pause, never acked unrecorded.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Collection
from typing import Any

from celery.worker.consumer import Consumer

from db import tenancy
from db.models import DEFAULT_WORKSPACE_ID
from db.session import session_scope
from workers.boundary import consumed_queues, misrouted
from workers.dead_letters import record_dead_letter
from workers.log import get_logger
from workers.settings import get_settings

log = get_logger(__name__)


def _body(message: Any) -> bytes:
    body = getattr(message, "body", b"")
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    return bytes(body or b"")


def capture(source: str, reason: str, message: Any) -> bool:
    """Record a refused message; False (and the body logged) if it cannot be stored."""
    try:
        headers = dict(getattr(message, "headers", None) or {})
        owner = tenancy.parse_header(headers.get(tenancy.HEADER)) or DEFAULT_WORKSPACE_ID
        with tenancy.workspace(owner), session_scope() as session:
            record_dead_letter(
                session, source=source, reason=f"{reason} (headers: {json.dumps(headers, default=str)[:500]})",
                raw=_body(message), error_type="RejectedMessage",
            )
    except Exception as exc:  # noqa: BLE001 - the consumer must go on
        log.critical("message.dead_letter_failed", source=source, reason=reason,
                     error=repr(exc), body=_body(message)[:4096].decode("utf-8", "replace"))
        return False
    _unstored[0] = 0
    return True


_unstored = [0]  # consecutive messages that could not be dead-lettered (a counter, not a log)


def give_back(message: Any) -> None:
    """Requeue a message whose dead letter could not be stored, after a growing pause.

    The pause (0.1 s doubling to 5 s while the database stays unreachable) blocks
    this consumer: nothing could be stored meanwhile anyway, and without it a
    requeued message would come back hundreds of times a second.
    """
    _unstored[0] += 1
    time.sleep(min(0.1 * 2 ** min(_unstored[0] - 1, 6), 5.0))
    message.reject(requeue=True)


def _refuse(source: str, reason: str, message: Any) -> bool:
    """Dead-letter a message before Celery acks or rejects it; False if it was given back."""
    if capture(source, reason, message):
        return True
    give_back(message)
    return False


def _when(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return None  # Celery itself refuses it as an invalid task
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def eta_of(message: Any) -> dt.datetime | None:
    """The message's ETA (aware), or None when it has none or none Celery could read."""
    return _when((getattr(message, "headers", None) or {}).get("eta"))


def refusal(message: Any, horizon: float, now: dt.datetime | None = None,
            consuming: Collection[str] | None = None) -> tuple[str, str] | None:
    """Why a task message must not run here (source, reason), or None.

    - past its `expires`: Celery would drop it with only a log line;
    - an ETA further ahead than the visibility timeout: the worker would hold it in
      memory, and Redis would deliver it again (and again) before it is due;
    - sent to a queue that is not its task's own (a producer publishing an internal
      task to the events queue).
    """
    headers = getattr(message, "headers", None) or {}
    now = now or dt.datetime.now(dt.UTC)
    expires = _when(headers.get("expires"))
    if expires is not None and expires < now:
        return "broker:expired", f"expired at {expires.isoformat()} before it could run"
    eta = _when(headers.get("eta"))
    if eta is not None and (eta - now).total_seconds() > horizon:
        return "broker:eta", (f"ETA {eta.isoformat()} is more than the visibility timeout "
                              f"({horizon:.0f} s) ahead: it would be delivered again before it is due")
    reason = misrouted(str(headers.get("task", "")), getattr(message, "delivery_info", None),
                       consuming)
    return ("broker:misrouted", reason) if reason else None


class GuardedStrategy:
    """Task mixin: refused messages (see `refusal`) are dead-lettered, then acked, not run."""

    def start_strategy(self, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
        handler: Callable[..., Any] = super().start_strategy(app, consumer, **kwargs)  # type: ignore[misc]
        horizon = float(get_settings().visibility_timeout)

        def guarded(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                    **kw: Any) -> Any:
            refused = refusal(message, horizon, consuming=consumed_queues(consumer))
            if refused is None:
                return handler(message, body, ack, reject, callbacks, **kw)
            if _refuse(*refused, message):
                message.ack()
            return None

        return guarded


class FleetConsumer(Consumer):
    """Celery's consumer, with refused messages dead-lettered before they are acked."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if _refuse("broker:undecodable", f"{type(exc).__name__}: {exc}", message):
            super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if _refuse("broker:rejected", "not a task message (no task headers)", message):
            super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (getattr(message, "headers", None) or {}).get("task")
        if _refuse("broker:unknown_task", f"no task named {name!r} in this worker", message):
            super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if _refuse("broker:rejected", f"{type(exc).__name__}: {exc}", message):
            super().on_invalid_task(body, message, exc)
