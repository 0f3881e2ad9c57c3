"""The fleet's health figures and checks, shared by `fleet status`, `fleet health` and the exporter.

Every figure is one query or one broker call with a short timeout, so a probe or a
scrape answers within seconds even when a server is down. The database figures take
a Session (any engine); the broker's (ping, queue depths) are in workers/broker.py.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from db import tenancy
from db.models import ACTIVE_EXECUTION_STATUSES, ExecutionStatus, sql_list
from db.partitions import Coverage, coverage
from db.session import build_engine
from workers import workspaces
from workers.broker import ping_broker
from workers.engine.timers import oldest_due_timer
from workers.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

TIMEOUT = 3.0  # seconds for one connection attempt to PostgreSQL (the broker's: workers/broker.py)
MAX_TIMER_LAG = 120.0  # the beat wakes due timers every 5 s: two minutes late means it is not
MAX_DEAD_LETTERS = 100
MAX_STALLED = 0  # a stalled execution never goes on by itself: one is already a failure


# ------------------------------------------------------------------------- database


def monitor_engine(settings: Settings, pool_size: int = 1, *, read: bool = False) -> Engine:
    """A small engine with short connect and statement timeouts, for probes and scrapes;
    `read`: on the replica when DATABASE_READ_URL is set (the exporter's gauges)."""
    database = settings.database
    return build_engine(
        database.read_sqlalchemy_url if read else database.sqlalchemy_url,
        pooler=database.pooler, statement_timeout_ms=10_000,
        application_name="lifecycle-fleet-monitor", connect_timeout=int(TIMEOUT),
        pool_size=pool_size, max_overflow=0)


@dataclass(frozen=True)
class DatabaseFigures:
    executions: dict[str, int]  # every status, 0 when none
    stalled: int  # active executions the stepper found unable to go on (stalled_at set)
    dead_letters_pending: int
    outbox_backlog: int
    outbox_oldest: dt.datetime | None
    oldest_due_timer: dt.datetime | None
    timer_lag: float  # seconds: now - oldest due wake_at, 0 when nothing is due
    partitions: list[Coverage]

    @property
    def partitions_missing(self) -> list[str]:
        return [name for part in self.partitions for name in part.missing]


def database_figures(session: Session, now: dt.datetime | None = None) -> DatabaseFigures:
    """What PostgreSQL says about the fleet's backlog, in a handful of queries."""
    now = now or dt.datetime.now(dt.UTC)
    counts: dict[str, int] = {str(status): int(n) for status, n in session.execute(text(
        "SELECT status, count(*) FROM workflow_executions GROUP BY status")).all()}
    executions = {status.value: counts.pop(status.value, 0) for status in ExecutionStatus}
    executions.update(counts)
    # The partial index idx_executions_stalled holds only the stalled rows.
    stalled = session.execute(text(
        "SELECT count(*) FROM workflow_executions WHERE stalled_at IS NOT NULL "
        f"AND status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)})")).scalar_one()
    dead = session.execute(text(
        "SELECT count(*) FROM dead_letters WHERE status = 'pending'")).scalar_one()
    outbox = session.execute(text(
        "SELECT count(*), min(created_at) FROM event_outbox WHERE status = 'PENDING'")).one()
    oldest = oldest_due_timer(session, now)
    return DatabaseFigures(
        executions=executions, stalled=int(stalled), dead_letters_pending=int(dead), outbox_backlog=int(outbox[0]),
        outbox_oldest=outbox[1], oldest_due_timer=oldest,
        timer_lag=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
        partitions=coverage(session.connection(), now.date()),
    )


def fleet_database_figures(open_session: Callable[[], AbstractContextManager[Session]],
                           now: dt.datetime | None = None) -> DatabaseFigures:
    """Every workspace's figures added up, each read under its own workspace (as the
    application role a transaction sees one workspace: db/tenancy.py)."""
    now = now or dt.datetime.now(dt.UTC)
    with tenancy.all_workspaces(), open_session() as session:
        ids = workspaces.all_ids(session)
    parts = []
    for workspace_id in ids:
        with tenancy.workspace(workspace_id), open_session() as session:
            parts.append(database_figures(session, now))
    if not parts:
        raise RuntimeError("no workspace exists (is the database migrated?)")
    executions: dict[str, int] = {}
    for part in parts:
        for status, count in part.executions.items():
            executions[status] = executions.get(status, 0) + count
    outbox = [p.outbox_oldest for p in parts if p.outbox_oldest is not None]
    timers = [p.oldest_due_timer for p in parts if p.oldest_due_timer is not None]
    oldest = min(timers) if timers else None
    return DatabaseFigures(
        executions=executions, stalled=sum(p.stalled for p in parts),
        dead_letters_pending=sum(p.dead_letters_pending for p in parts),
        outbox_backlog=sum(p.outbox_backlog for p in parts),
        outbox_oldest=min(outbox) if outbox else None, oldest_due_timer=oldest,
        timer_lag=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
        partitions=parts[0].partitions)  # the catalog's: the same in every workspace


# --------------------------------------------------------------------------- workers


def workers_by_queue(app: Celery, timeout: float = 1.0) -> dict[str, list[str]]:
    """Worker hostnames answering within `timeout`, by the queue they consume."""
    replies: dict[str, list[dict[str, Any]]] = app.control.inspect(timeout=timeout).active_queues() or {}
    by_queue: dict[str, list[str]] = {}
    for hostname, queues in sorted(replies.items()):
        for queue in queues or []:
            by_queue.setdefault(queue["name"], []).append(hostname)
    return by_queue


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not checked (what it needs is down)
    detail: str

    @property
    def label(self) -> str:
        return {True: "ok", False: "FAIL", None: "skip"}[self.ok]

    def line(self) -> str:
        return f"{self.label:<5} {self.name:<13} {self.detail}"


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - started) * 1000


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def run_checks(settings: Settings, *, app: Celery | None = None, queues: Sequence[str] = (),
               worker_timeout: float = 1.0, max_timer_lag: float = MAX_TIMER_LAG,
               max_dead_letters: int = MAX_DEAD_LETTERS,
               max_stalled: int = MAX_STALLED) -> list[Check]:
    """Every health check, in order: database, broker, workers (when `queues` and `app` are
    given), partitions, timer lag, dead letters, stalled executions. The fleet is healthy
    when none failed."""
    checks: list[Check] = []
    figures: DatabaseFigures | None = None
    try:
        engine = monitor_engine(settings)
        try:
            with tenancy.all_workspaces(), Session(engine) as session:
                version, ms = _timed(lambda: session.execute(text("SHOW server_version")).scalar())
            figures = fleet_database_figures(lambda: Session(engine))
        finally:
            engine.dispose()
        checks.append(Check("database", True, f"PostgreSQL {version} ({ms:.0f} ms)"))
    except Exception as exc:  # any failure is the answer
        checks.append(Check("database", False, _error(exc)))

    broker_ok = False
    try:
        if not settings.broker_url:
            raise RuntimeError("CELERY_BROKER_URL is not set and no embedded server was started")
        answer, ms = _timed(lambda: ping_broker(settings.broker_url or ""))
        broker_ok = True
        checks.append(Check("broker", True, f"{maybe_sanitize_url(settings.broker_url)} "
                                            f"{answer} ({ms:.0f} ms)"))
    except Exception as exc:
        checks.append(Check("broker", False, _error(exc)))

    if queues and app is not None:
        if not broker_ok:
            checks.append(Check("workers", None, "broker unreachable"))
        else:
            seen = workers_by_queue(app, worker_timeout)
            missing = [queue for queue in queues if not seen.get(queue)]
            detail = ", ".join(f"{queue} {len(seen.get(queue, []))}" for queue in queues)
            if missing:
                detail += f"; no worker answered for {', '.join(missing)}"
            checks.append(Check("workers", not missing, detail))

    if figures is None:
        for name in ("partitions", "timer lag", "dead letters", "stalled"):
            checks.append(Check(name, None, "database unreachable"))
        return checks
    missing_parts = figures.partitions_missing
    checks.append(Check("partitions", not missing_parts,
                        f"missing {', '.join(missing_parts)}" if missing_parts
                        else f"{len(figures.partitions)} tables covered"))
    lag = figures.timer_lag
    checks.append(Check("timer lag", lag <= max_timer_lag,
                        f"{lag:.1f}s (max {max_timer_lag:g}s)" + (
                            f", oldest due {figures.oldest_due_timer:%Y-%m-%d %H:%M:%S}"
                            if figures.oldest_due_timer else "")))
    dead = figures.dead_letters_pending
    checks.append(Check("dead letters", dead <= max_dead_letters,
                        f"{dead} pending (max {max_dead_letters})"))
    checks.append(Check("stalled", figures.stalled <= max_stalled,
                        f"{figures.stalled} executions (max {max_stalled})"))
    return checks
