"""Maintenance tasks run by the beat."""

from __future__ import annotations

import datetime as dt

from db.partitions import ensure_partitions_ahead
from workers.base_task import FleetTask
from workers.celery_app import app
from workers.log import get_logger
from workers.queues import TaskNames

log = get_logger(__name__)


@app.task(base=FleetTask, bind=True, name=TaskNames.ENSURE_PARTITIONS)
def ensure_partitions(self: FleetTask) -> list[str]:
    """Create this period's and the next partitions; move stray default rows into them."""
    created = ensure_partitions_ahead(self.session.connection(), dt.datetime.now(dt.UTC).date(),
                                      split_stray_rows=True)
    log.info("partitions.ensured", created=created)
    return created


@app.task(base=FleetTask, bind=True, name=TaskNames.RELAY_OUTBOX)
def relay_outbox(self: FleetTask, limit: int = 500) -> int:
    """Publish pending outbox rows (beat, every few seconds)."""
    from workers.events.outbox import relay_outbox as relay
    from workers.producer import publish_batch

    published = relay(self.session, publish_batch, limit)
    if published:
        log.info("outbox.relayed", published=published)
    return published


@app.task(base=FleetTask, bind=True, name=TaskNames.METRICS_DAILY)
def metrics_daily(self: FleetTask, day: str | None = None) -> int:
    """Upsert one day's metrics (default: yesterday, UTC); safe to rerun."""
    from workers.reports.metrics import aggregate_day

    target = dt.date.fromisoformat(day) if day else dt.datetime.now(dt.UTC).date() - dt.timedelta(1)
    result = aggregate_day(self.session, target)
    log.info("metrics.aggregated", day=str(target), rows=result.rows, written=result.written,
             removed=result.removed)
    return result.rows
