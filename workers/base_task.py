"""The base class of every fleet task: one transaction, bound log context, retry policy.

A task body uses `self.session` (opened on first use, committed when the body
returns, rolled back when it raises) and `self.after_commit(fn)` to send follow-up
work only once its rows are committed (DESIGN decision 3). Failures are sorted by
`workers.errors.is_transient`: transient ones are retried with exponential backoff
and full jitter up to a bound (a larger one while the database or broker is
unreachable: `is_outage`); permanent ones, and transient ones past the bound, are
written to the dead-letter table with the task's arguments, never dropped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import structlog
from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.session import new_session, session_scope
from workers.dead_letters import record_dead_letter
from workers.errors import PoisonMessage, is_outage, is_transient
from workers.log import get_logger
from workers.settings import get_settings

log = get_logger(__name__)


@dataclass
class _UnitOfWork:
    session: Session | None = None
    after_commit: list[Callable[[], None]] = field(default_factory=list)


_current: ContextVar[_UnitOfWork | None] = ContextVar("fleet_task_unit", default=None)


def backoff_delay(retries: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**retries)]."""
    return random.uniform(0, min(cap, base * (2**retries)))


class FleetTask(Task):  # type: ignore[misc]
    """Base task: see the module docstring. Subclass through `@app.task(base=FleetTask)`."""

    abstract = True

    @property
    def session(self) -> Session:
        """This run's session; its transaction commits when the task body returns."""
        unit = _current.get()
        if unit is None:
            raise RuntimeError("FleetTask.session is only available while the task runs")
        if unit.session is None:
            unit.session = new_session()
        return unit.session

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this run's transaction has committed (e.g. send a task)."""
        unit = _current.get()
        if unit is None:
            raise RuntimeError("FleetTask.after_commit is only available while the task runs")
        unit.after_commit.append(callback)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(task_id=self.request.id, task_name=self.name)
        if self._is_poison(args, kwargs):
            return None
        unit = _UnitOfWork()
        token = _current.set(unit)
        try:
            result = self._run_in_transaction(unit, args, kwargs)
            for callback in unit.after_commit:
                callback()
            return result
        except (Retry, Reject, Ignore):
            raise
        except Exception as exc:
            self._on_error(exc, args, kwargs)
            raise
        finally:
            _current.reset(token)
            structlog.contextvars.clear_contextvars()

    def _is_poison(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """A message that keeps coming back because its worker died (OOM, kill) is dead-lettered.

        With `task_reject_on_worker_lost` such a message is requeued every time its
        process dies; past `FLEET_MAX_REDELIVERIES` it is recorded instead of run.
        """
        delivery = self.request.delivery_info or {}
        if not delivery.get("redelivered") or not self.request.id:
            return False
        with session_scope() as session:
            count = session.execute(text(
                "INSERT INTO task_redeliveries (task_id, task_name) VALUES (:i, :n) "
                "ON CONFLICT (task_id) DO UPDATE SET redeliveries = "
                "task_redeliveries.redeliveries + 1, last_seen = now() RETURNING redeliveries"),
                {"i": self.request.id, "n": self.name}).scalar_one()
        limit = get_settings().max_redeliveries
        log.warning("task.redelivered", redeliveries=count, limit=limit)
        if count <= limit:
            return False
        self._dead_letter(PoisonMessage(f"redelivered {count} times: its worker died running it "
                                        f"each time (out of memory? killed?)"),
                          args, kwargs, transient=False)
        return True

    def _run_in_transaction(self, unit: _UnitOfWork, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> Any:
        try:
            result = super().__call__(*args, **kwargs)
            if unit.session is not None:
                unit.session.commit()
            return result
        except BaseException:
            if unit.session is not None:
                unit.session.rollback()
            raise
        finally:
            if unit.session is not None:
                unit.session.close()

    def _on_error(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Retry a transient error within the bound; otherwise dead-letter. Raises to retry."""
        settings = get_settings()
        retries = self.request.retries or 0
        limit = settings.outage_max_retries if is_outage(exc) else settings.task_max_retries
        if is_transient(exc) and retries < limit:
            delay = backoff_delay(retries, settings.retry_backoff_base, settings.retry_backoff_max)
            log.warning("task.retry", error=repr(exc), retries=retries + 1, countdown=round(delay, 3))
            try:
                raise self.retry(exc=exc, countdown=delay, max_retries=limit)
            except (Retry, Reject):
                raise
            except Exception as send_error:
                # The retry could not be published (broker down): put the message
                # back rather than ack it, so the work is not lost.
                log.error("task.retry_send_failed", error=repr(send_error))
                raise Reject(reason=repr(send_error), requeue=True) from exc
        self._dead_letter(exc, args, kwargs, transient=is_transient(exc))

    def _dead_letter(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any],
                     transient: bool) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if transient:
            reason = f"gave up after {self.request.retries or 0} retries: {reason}"
        raw = json.dumps(
            {"task": self.name, "id": self.request.id, "args": list(args), "kwargs": kwargs},
            default=str,
        )
        try:
            with session_scope() as session:
                dead_letter_id = record_dead_letter(
                    session, source=self.name, reason=reason, raw=raw,
                    error_type=type(exc).__qualname__,
                )
        except Exception as db_error:
            # Cannot record it: leave the message on the queue instead of dropping it.
            log.error("task.dead_letter_failed", error=repr(db_error), reason=reason)
            raise Reject(reason=repr(db_error), requeue=True) from exc
        log.error("task.dead_lettered", dead_letter_id=dead_letter_id, reason=reason)
