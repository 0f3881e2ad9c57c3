"""Workflow tasks (workflows queue): one BPMN node per step, timers, the stuck-step reaper."""

from __future__ import annotations

import datetime as dt
import uuid

import structlog

from workers.base_task import FleetTask
from workers.broker import queue_depths
from workers.celery_app import app
from workers.engine import dispatch, stepper, timers
from workers.log import get_logger
from workers.queues import ACTIONS, WORKFLOWS, TaskNames
from workers.settings import get_settings

log = get_logger(__name__)


@app.task(base=FleetTask, bind=True, name=TaskNames.STEP)
def step(self: FleetTask, execution_id: str, expected_version: int) -> str:
    """Run the execution's next node if `expected_version` is current; chain what follows."""
    structlog.contextvars.bind_contextvars(execution_id=execution_id)
    result = stepper.step(self.session, uuid.UUID(execution_id), expected_version)
    if result.next_version is not None:
        version = result.next_version
        self.after_commit(lambda: dispatch.send_step(uuid.UUID(execution_id), version))
    if result.action_key is not None:
        key = result.action_key
        self.after_commit(lambda: dispatch.send_action(key))
    if result.outcome == "noop":
        log.info("step.noop", reason=result.reason)
    return result.outcome


@app.task(base=FleetTask, bind=True, name=TaskNames.WAKE_DUE_TIMERS)
def wake_due_timers(self: FleetTask, limit: int = 1000) -> int:
    """Beat, every few seconds: step every execution whose timer is due."""
    due = timers.claim_due_timers(self.session, dt.datetime.now(dt.UTC), limit)
    self.after_commit(lambda: dispatch.send_steps(due))
    if due:
        log.info("timers.woken", count=len(due))
    return len(due)


@app.task(base=FleetTask, bind=True, name=TaskNames.REAP_STUCK)
def reap_stuck(self: FleetTask, limit: int = 1000) -> int:
    """Beat: re-send steps that were sent long ago and never ran (lost message, killed worker)."""
    settings = get_settings()
    backlog = sum(queue_depths(settings.broker_url or "", settings.broker_key_prefix,
                               (WORKFLOWS, ACTIONS)).values())
    older_than = timers.stuck_cutoff(self.session,
                                     dt.timedelta(seconds=settings.stuck_step_seconds), backlog)
    stuck = timers.claim_stuck(
        self.session, dt.datetime.now(dt.UTC), older_than, limit,
        max_resends=settings.stuck_step_max_resends,
        retry_chain=dt.timedelta(seconds=settings.operator_retry_chain_seconds))
    self.after_commit(lambda: dispatch.send_steps(stuck))
    if stuck:
        log.warning("steps.reaped", count=len(stuck), backlog=backlog,
                    older_than_s=round(older_than.total_seconds(), 1))
    return len(stuck)
