"""The base class of every fleet task: one transaction, bound log context, retry policy.

A task body uses `self.session` (opened on first use, committed when the body
returns, rolled back when it raises) and `self.after_commit(fn)` to send follow-up
work only once its rows are committed (docs/architecture.md, decision 3). A failure
is retried or given up on as `workers.retry_policy` decides; given up on, it is
written to the dead-letter table with the task's arguments, never dropped.

The ack rule (docs/architecture.md, decision 11) holds on every path: a message is
acknowledged only once its effect or its dead letter is committed. When neither can be stored
(PostgreSQL stopped, refusing connections) the message is published again with a
backoff delay for as long as that lasts; with the broker down too it is requeued.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NoReturn

import structlog
from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from sqlalchemy import text
from sqlalchemy.orm import Session

from db import tenancy
from db.models import DEFAULT_WORKSPACE_ID
from db.session import new_session, session_scope
from workers import workspaces
from workers.dead_letters import record_dead_letter, storable_key
from workers.errors import PoisonMessage, is_outage
from workers.log import get_logger
from workers.rejected import GuardedStrategy
from workers.retry_policy import OUTAGE_RETRIES, GiveUp, RetryLater, RetryPolicy, outage_retries
from workers.settings import get_settings

log = get_logger(__name__)

# Longest pause before a message goes back to the broker when nothing can be stored.
REQUEUE_PAUSE_MAX = 5.0


def _combined(results: list[Any]) -> Any:
    """One result of a body run in each workspace: counts add up, lists join."""
    if all(isinstance(r, int) and not isinstance(r, bool) for r in results):
        return sum(results)
    if all(isinstance(r, list) for r in results):
        return [item for r in results for item in r]
    return results


@dataclass
class _UnitOfWork:
    session: Session | None = None
    after_commit: list[Callable[[], None]] = field(default_factory=list)


_current: ContextVar[_UnitOfWork | None] = ContextVar("fleet_task_unit", default=None)


class FleetTask(GuardedStrategy, Task):
    """Base task: see the module docstring. Subclass through `@app.task(base=FleetTask)`.

    Messages past their `expires`, with an ETA beyond the visibility timeout or on
    another task's queue are dead-lettered before they run (`workers.rejected`).
    """

    abstract = True
    # Which workspace the body works in (db/tenancy.py): "message", the one its
    # `fleet_workspace` header names (absent: the default workspace, as every message
    # published before workspaces existed); "each", run once per workspace, each in a
    # transaction of its own (the beat's sweeps); "all", no workspace at all (partition
    # maintenance and retention, which run as the owner role).
    workspace_scope: str = "message"

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
        try:
            with self._scope():
                if self._is_poison(args, kwargs):
                    return None
                if self.workspace_scope == "each":
                    return self._in_each_workspace(args, kwargs)
                return self._run_unit(args, kwargs)
        except (Retry, Reject, Ignore):
            raise
        except Exception as exc:
            with tenancy.workspace(self._dead_letter_workspace()):
                self._on_error(exc, args, kwargs)
            raise
        finally:
            structlog.contextvars.clear_contextvars()

    def _scope(self) -> AbstractContextManager[object]:
        """Enter the workspace the body works in (see `workspace_scope`); "each" enters
        every workspace in turn later (`_in_each_workspace`)."""
        if self.workspace_scope in ("all", "each"):
            return tenancy.all_workspaces()
        header = getattr(self.request, tenancy.HEADER, None)
        if header is None:
            return tenancy.workspace(DEFAULT_WORKSPACE_ID)
        workspace_id = tenancy.parse_header(header)
        if workspace_id is None:
            raise PoisonMessage(f"the {tenancy.HEADER} header {str(header)[:80]!r} is not a "
                                "workspace id")
        structlog.contextvars.bind_contextvars(workspace_id=str(workspace_id))
        return tenancy.workspace(workspace_id)

    def _dead_letter_workspace(self) -> uuid.UUID:
        """Where a failure of this message is recorded: its workspace when it names one,
        else the default workspace (the installation's own)."""
        return tenancy.parse_header(getattr(self.request, tenancy.HEADER, None)) \
            or DEFAULT_WORKSPACE_ID

    def _run_unit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The body in one transaction, then its after-commit callbacks."""
        unit = _UnitOfWork()
        token = _current.set(unit)
        try:
            result = self._run_in_transaction(unit, args, kwargs)
            for callback in unit.after_commit:
                callback()
            return result
        finally:
            _current.reset(token)

    def _in_each_workspace(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The body once per workspace, each in its own transaction. One workspace's
        failure does not stop the others; the first is raised once all have run (the
        sweeps are idempotent, so a retry redoes the others harmlessly)."""
        with session_scope() as session:
            ids = workspaces.all_ids(session)
        results: list[Any] = []
        failure: Exception | None = None
        for workspace_id in ids:
            try:
                with tenancy.workspace(workspace_id):
                    results.append(self._run_unit(args, kwargs))
            except (Retry, Reject, Ignore):
                raise
            except Exception as exc:
                log.warning("task.workspace_failed", workspace_id=str(workspace_id),
                            error=repr(exc))
                failure = failure or exc
        if failure is not None:
            raise failure
        return _combined(results)

    def _is_poison(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """A message that keeps coming back because its worker died (OOM, kill) is dead-lettered.

        With `task_reject_on_worker_lost` such a message is requeued every time its
        process dies; past `FLEET_MAX_REDELIVERIES` it is recorded instead of run.
        The count's own write fails like any other (database down): the caller's
        error handling then retries the message, never acks it unrecorded.
        """
        delivery = self.request.delivery_info or {}
        if not delivery.get("redelivered") or not self.request.id:
            return False
        with session_scope() as session:
            count = session.execute(text(
                "INSERT INTO task_redeliveries (task_id, task_name) VALUES (:i, :n) "
                "ON CONFLICT (task_id) DO UPDATE SET redeliveries = "
                "task_redeliveries.redeliveries + 1, last_seen = now() RETURNING redeliveries"),
                {"i": storable_key(str(self.request.id)), "n": storable_key(self.name)},
            ).scalar_one()
        limit = get_settings().max_redeliveries
        log.warning("task.redelivered", redeliveries=count, limit=limit)
        if count <= limit:
            return False
        self._dead_letter(PoisonMessage(f"redelivered {count} times: its worker died running it "
                                        f"each time (out of memory? killed?)"),
                          args, kwargs, GiveUp(transient=False))
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
        """Retry a transient error within its bound, else dead-letter; raises to retry.

        Returns only once the dead letter is committed (the caller re-raises, Celery
        records the failure and acks). Whatever cannot be stored is retried instead:
        the message is never acknowledged without its effect or its dead letter.
        """
        policy = RetryPolicy.from_settings()
        retries = self.request.retries or 0
        outages = outage_retries(vars(self.request), retries)
        decision = policy.decide(exc, retries, outages)
        if isinstance(decision, RetryLater):
            log.warning("task.retry", error=repr(exc), retries=retries + 1)
            self._retry_later(exc, retries, decision.delay, outages + is_outage(exc))
        try:
            self._dead_letter(exc, args, kwargs, decision)
        except Exception as db_error:
            # Not even the dead letter stores (the database is down): come back later
            # (counted as a retry, fleet_task_retries_total).
            log.error("task.dead_letter_failed", error=repr(db_error), reason=repr(exc))
            self._retry_later(db_error, retries, policy.backoff(outages), outages + 1)

    def _retry_later(self, exc: Exception, retries: int, delay: float,
                     outages: int) -> NoReturn:
        """Publish this message again after `delay` seconds, with `outages` of its retries
        counted as outages (workers.retry_policy); if that fails, requeue it."""
        try:
            # max_retries=None would mean the task's default (3): the bound is ours.
            raise self.retry(exc=exc, countdown=delay, max_retries=retries + 1,
                             headers={**(self.request.headers or {}), OUTAGE_RETRIES: outages})
        except (Retry, Reject):
            raise
        except Exception as send_error:
            # The broker is unreachable too: put the message back rather than ack it,
            # after a pause so that a fast loop of redeliveries cannot start.
            log.error("task.retry_send_failed", error=repr(send_error))
            time.sleep(min(delay, REQUEUE_PAUSE_MAX))
            raise Reject(reason=repr(send_error), requeue=True) from exc

    def _dead_letter(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any],
                     decision: GiveUp) -> None:
        """Commit a dead letter with the task's message; raises if it cannot be stored."""
        reason = f"{type(exc).__name__}: {exc}"
        if decision.transient:
            reason = f"gave up after {self.request.retries or 0} retries: {reason}"
        raw = json.dumps(
            {"task": self.name, "id": self.request.id, "args": list(args), "kwargs": kwargs},
            default=str,
        )
        with session_scope() as session:
            dead_letter_id = record_dead_letter(
                session, source=self.name, reason=reason, raw=raw,
                error_type=type(exc).__qualname__,
            )
        log.error("task.dead_lettered", dead_letter_id=dead_letter_id, reason=reason)
