"""Prometheus metrics: counters the workers increment, gauges the exporter computes per scrape.

Counters and histograms. A prefork worker is many processes, so they use
prometheus_client's multiprocess mode: `enable_worker_metrics` (connected to
`worker_init` in workers/signals.py, so only `celery worker` processes do it) makes
every pool process write its values to a file of its own under the metrics folder
(FLEET_METRICS_DIR; default PROMETHEUS_MULTIPROC_DIR when set, else
FLEET_HOME/metrics). `fleet exporter` on the same machine sums the files. The values
come from Celery's task_prerun / task_postrun signals (task name, state and return
value), so the task modules carry no metrics code:

    fleet_events_ingested_total            events.ingest[_batch] "accepted"
    fleet_events_duplicate_total           ... "duplicates" (when the task returns it)
    fleet_events_dead_lettered_total       ... "rejected" (bad envelopes sent to dead_letters)
    fleet_trigger_evaluations_total        ... "evaluated" (when the task returns it)
    fleet_trigger_matches_total            ... "matched" (when the task returns it)
    fleet_workflow_steps_total{outcome}    workflows.step's outcome; "error" when it failed
    fleet_workflow_step_seconds{outcome}   run time of one step: its share of its batch (histogram)
    fleet_workflow_step_batch_size         step messages run in one transaction (histogram)
    fleet_sends_total{channel,outcome}     actions.run's send decision (workers/sends/gateway.py)
    fleet_task_retries_total{task}         transient errors retried
    fleet_tasks_dead_lettered_total{task}  fleet tasks that failed for good (dead-lettered)

Gauges, computed by `FleetCollector` on each scrape from PostgreSQL and the broker
(workers/health.py): fleet_database_up, fleet_broker_up, fleet_executions{status},
fleet_executions_stalled, fleet_dead_letters_pending, fleet_outbox_backlog,
fleet_outbox_oldest_age_seconds, fleet_timer_lag_seconds, fleet_partitions_missing{table},
fleet_queue_depth{queue}.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import states
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from workers.base_task import FleetTask
from workers.broker import queue_depths
from workers.health import fleet_database_figures, monitor_engine
from workers.log import get_logger
from workers.queues import QUEUE_NAMES, TaskNames
from workers.settings import Settings

log = get_logger(__name__)

INGEST_TASKS = frozenset({TaskNames.INGEST, TaskNames.INGEST_BATCH})
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def metrics_dir(settings: Settings) -> Path:
    """The folder worker processes write their counters to and the exporter reads."""
    configured = settings.metrics_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(configured or settings.home / "metrics").resolve()


class WorkerMetrics:
    """The counters and histograms one worker process increments."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.events_ingested = counter("fleet_events_ingested",
                                       "Events accepted by ingest (new event_ids).")
        self.events_duplicate = counter("fleet_events_duplicate",
                                        "Events ingest skipped as already seen (same event_id).")
        self.events_dead_lettered = counter(
            "fleet_events_dead_lettered", "Events ingest rejected and wrote to dead_letters.")
        self.trigger_evaluations = counter("fleet_trigger_evaluations",
                                           "Trigger conditions evaluated against an event.")
        self.trigger_matches = counter("fleet_trigger_matches",
                                       "Trigger evaluations whose conditions were met.")
        self.steps = counter("fleet_workflow_steps",
                             "workflows.step runs by outcome (completed, waiting, noop, failed, "
                             "error: the task itself failed).", ("outcome",))
        self.step_seconds = Histogram("fleet_workflow_step_seconds",
                                      "Run time of one workflows.step task, by outcome.",
                                      ("outcome",), buckets=STEP_BUCKETS, registry=registry)
        self.step_batch_size = Histogram(
            "fleet_workflow_step_batch_size", "Step messages run in one transaction.",
            buckets=BATCH_BUCKETS, registry=registry)
        self.sends = counter("fleet_sends",
                             "Sends decided by the send gateway, by channel and outcome (sent, "
                             "suppressed, capped, deferred, held_out).", ("channel", "outcome"))
        self.task_retries = counter("fleet_task_retries",
                                    "Task runs that hit a transient error and were retried.",
                                    ("task",))
        self.tasks_dead_lettered = counter(
            "fleet_tasks_dead_lettered",
            "Fleet task runs that failed for good; their message is in dead_letters.", ("task",))

    def record(self, task: str, state: str, retval: Any, seconds: float | None,
               fleet_task: bool = True) -> None:
        """Count one finished task run (what task_postrun reports)."""
        if state == states.SUCCESS:
            if task in INGEST_TASKS and isinstance(retval, dict):
                for metric, key in ((self.events_ingested, "accepted"),
                                    (self.events_duplicate, "duplicates"),
                                    (self.events_dead_lettered, "rejected"),
                                    (self.trigger_evaluations, "evaluated"),
                                    (self.trigger_matches, "matched")):
                    amount = retval.get(key)
                    if isinstance(amount, int) and amount > 0:
                        metric.inc(amount)
            elif task == TaskNames.STEP and isinstance(retval, dict):
                self._step_batch(retval, seconds)
            elif task == TaskNames.RUN_ACTION and isinstance(retval, dict):
                channel, outcome = retval.get("channel"), retval.get("send_outcome")
                if isinstance(channel, str) and isinstance(outcome, str):
                    self.sends.labels(channel, outcome).inc()
        elif state == states.RETRY:
            self.task_retries.labels(task).inc()
        elif state == states.FAILURE and fleet_task:
            # FleetTask dead-letters before it lets an exception out (workers/base_task.py).
            self.tasks_dead_lettered.labels(task).inc()
            if task == TaskNames.STEP:
                self._step("error", seconds)

    def _step(self, outcome: str, seconds: float | None) -> None:
        self.steps.labels(outcome).inc()
        if seconds is not None:
            self.step_seconds.labels(outcome).observe(seconds)

    def _step_batch(self, report: dict[str, Any], seconds: float | None) -> None:
        """A buffer of steps (`workers.engine.batch.BatchReport`): each step gets its share."""
        outcomes = report.get("outcomes") or {}
        steps = sum(n for n in outcomes.values() if isinstance(n, int))
        if steps:
            self.step_batch_size.observe(steps)
        share = seconds / steps if seconds is not None and steps else None
        for outcome, count in outcomes.items():
            for _ in range(count if isinstance(count, int) else 0):
                self._step(str(outcome), share)
        for metric, key in ((self.task_retries, "republished"),
                            (self.tasks_dead_lettered, "dead_lettered")):
            amount = report.get(key)
            if isinstance(amount, int) and amount > 0:
                metric.labels(TaskNames.STEP).inc(amount)


_metrics: WorkerMetrics | None = None
_directory: Path | None = None
_started: dict[str, float] = {}


def enable_worker_metrics(settings: Settings) -> Path:
    """Make this worker (and the pool processes it forks) write metrics to the metrics folder.

    prometheus_client picks single- or multi-process values when it is first imported,
    and the `celery` command imports it (through Flower's plugin) before the app is
    loaded, so the choice is switched here, before any fleet metric exists.
    """
    global _directory, _metrics
    directory = metrics_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    _directory, _metrics = directory, None
    return directory


def worker_metrics() -> WorkerMetrics | None:
    """This process's metrics once `enable_worker_metrics` ran (None elsewhere: beat, CLI)."""
    global _metrics
    if _directory is None:
        return None
    if _metrics is None:
        _metrics = WorkerMetrics()
    return _metrics


def on_task_prerun(task_id: str | None = None, **_: Any) -> None:
    if _directory is not None and task_id:
        _started[task_id] = time.perf_counter()


def on_task_postrun(task_id: str | None = None, task: Any = None, retval: Any = None,
                    state: str | None = None, **_: Any) -> None:
    started = _started.pop(task_id, None) if task_id else None
    metrics = worker_metrics()
    if metrics is None or task is None or state is None:
        return
    seconds = time.perf_counter() - started if started is not None else None
    try:
        metrics.record(task.name, state, retval, seconds, fleet_task=isinstance(task, FleetTask))
    except Exception as exc:  # metrics never fail a task
        log.warning("metrics.record_failed", error=repr(exc), task_name=task.name)


def on_process_exit(pid: int | None = None, **_: Any) -> None:
    """A pool process ended: drop its live-gauge files (its counters stay in the sums)."""
    if _directory is not None:
        mark_process_dead(pid or os.getpid(), str(_directory))


# ------------------------------------------------------------------------ exporter


def _gauge(name: str, doc: str, value: float | None = None,
           labels: dict[str, float] | None = None, label: str = "") -> GaugeMetricFamily:
    if labels is None:
        return GaugeMetricFamily(name, doc, value=value)
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, amount in labels.items():
        family.add_metric([key], amount)
    return family


class FleetCollector(Collector):
    """Gauges read from PostgreSQL and the broker on every scrape; a down server is a 0 `up`."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self._engine = engine

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = monitor_engine(self.settings, read=True)  # the replica, if any
        return self._engine

    def collect(self) -> Iterator[Metric]:
        now = dt.datetime.now(dt.UTC)
        try:
            figures = fleet_database_figures(lambda: Session(self.engine()), now)
        except Exception as exc:
            log.warning("metrics.database_unavailable", error=repr(exc))
            figures = None
        yield _gauge("fleet_database_up", "1 if PostgreSQL answered this scrape.",
                     float(figures is not None))
        if figures is not None:
            yield _gauge("fleet_executions", "Workflow executions by status.",
                         labels={k: float(v) for k, v in figures.executions.items()},
                         label="status")
            yield _gauge("fleet_executions_stalled", "Active executions marked stalled: "
                         "nothing ready, due, awaited or in flight.", float(figures.stalled))
            yield _gauge("fleet_dead_letters_pending", "Dead letters not yet replayed or "
                         "discarded.", float(figures.dead_letters_pending))
            yield _gauge("fleet_outbox_backlog", "Outbox rows waiting for the relay.",
                         float(figures.outbox_backlog))
            oldest = figures.outbox_oldest
            yield _gauge("fleet_outbox_oldest_age_seconds", "Age of the oldest pending outbox "
                         "row (0 when none).",
                         max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
            yield _gauge("fleet_timer_lag_seconds", "Now minus the oldest due wake_at of an "
                         "active execution (0 when none is due).", figures.timer_lag)
            yield _gauge("fleet_partitions_missing", "Expected partitions (now and ahead, "
                         "DEFAULT) that do not exist, by partitioned table.",
                         labels={p.table: float(len(p.missing)) for p in figures.partitions},
                         label="table")
        try:
            depths: dict[str, int] | None = queue_depths(
                self.settings.broker_url or "", self.settings.broker_key_prefix, QUEUE_NAMES)
        except Exception as exc:
            log.warning("metrics.broker_unavailable", error=repr(exc))
            depths = None
        yield _gauge("fleet_broker_up", "1 if the broker answered this scrape.",
                     float(depths is not None))
        if depths is not None:
            yield _gauge("fleet_queue_depth", "Messages waiting in a queue (not yet taken "
                         "by a worker).", labels={k: float(v) for k, v in depths.items()},
                         label="queue")


def exporter_registry(settings: Settings) -> CollectorRegistry:
    """The workers' counters (summed over the metrics folder) plus the fleet gauges."""
    registry = CollectorRegistry()
    directory = metrics_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    MultiProcessCollector(registry, path=str(directory))
    registry.register(FleetCollector(settings))
    return registry
