"""Maintenance tasks run by the beat."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict

from db.partitions import ensure_partitions_ahead
from db.session import get_engine
from workers.base_task import FleetTask
from workers.broker import queue_depths
from workers.celery_app import app
from workers.events import outbox
from workers.log import get_logger
from workers.producer import publish_batch
from workers.queues import EVENTS, TaskNames
from workers.reports.metrics import aggregate_day, days_to_aggregate, record_day
from workers.retention import run_retention
from workers.settings import get_settings

log = get_logger(__name__)


@app.task(base=FleetTask, bind=True, name=TaskNames.ENSURE_PARTITIONS,
          workspace_scope="all")
def ensure_partitions(self: FleetTask) -> list[str]:
    """Create this period's and the next partitions; move stray default rows into them."""
    created = ensure_partitions_ahead(self.session.connection(), dt.datetime.now(dt.UTC).date(),
                                      split_stray_rows=True)
    log.info("partitions.ensured", created=created)
    return created


RELAY_BUDGET_SECONDS = 5.0  # one run's publishing; the beat's next run goes on from there


@app.task(base=FleetTask, bind=True, name=TaskNames.RELAY_OUTBOX,
          workspace_scope="each")
def relay_outbox(self: FleetTask, limit: int = 500) -> int:
    """Publish pending outbox rows (beat, every few seconds), after confirming older ones.

    A backlog (a refresh's 100,000 segment entries) is published batch after batch,
    each committed with its rows marked, for up to RELAY_BUDGET_SECONDS a run.
    """
    settings = get_settings()
    confirmed, again = outbox.confirm_published(
        self.session, dt.timedelta(seconds=settings.outbox_confirm_seconds),
        lambda: queue_depths(settings.broker_url or "", settings.broker_key_prefix,
                             (EVENTS,))[EVENTS] > 0)
    if again:
        log.warning("outbox.republishing", events=again, confirmed=confirmed)
    started = time.monotonic()
    published = batch = outbox.relay_outbox(self.session, publish_batch, limit)
    while batch == limit and time.monotonic() - started < RELAY_BUDGET_SECONDS:
        self.session.commit()  # these rows are published: mark them before the next batch
        batch = outbox.relay_outbox(self.session, publish_batch, limit)
        published += batch
    if published:
        log.info("outbox.relayed", published=published)
    return published


@app.task(base=FleetTask, bind=True, name=TaskNames.METRICS_DAILY,
          workspace_scope="each")
def metrics_daily(self: FleetTask, day: str | None = None) -> list[str]:
    """Upsert one day's metrics; by default every day not done yet up to yesterday (UTC).

    A beat that was down overnight (or for a week) catches up each missed day
    once; a rerun of a day is an idempotent upsert.
    """
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(1)
    days = [dt.date.fromisoformat(day)] if day else days_to_aggregate(self.session, yesterday)
    for target in days:
        result = aggregate_day(self.session, target)
        record_day(self.session, result)
        log.info("metrics.aggregated", day=str(target), rows=result.rows, written=result.written,
                 removed=result.removed)
    return [str(d) for d in days]


@app.task(base=FleetTask, bind=True, name=TaskNames.RETENTION, soft_time_limit=3000,
          workspace_scope="all",
          time_limit=3300)
def retention(self: FleetTask, dry_run: bool = False) -> dict[str, object]:
    """Nightly: archive and drop expired partitions, delete expired rows in batches."""
    settings = get_settings()
    report = run_retention(get_engine(), settings.archive_dir or settings.home / "archive",
                           dry_run=dry_run)
    return asdict(report)
