"""Workflow tasks (workflows queue): one BPMN node per step, timers, the stuck-step reaper."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

import structlog

from workers.base_task import FleetTask
from workers.batches import FleetBatches
from workers.broker import queue_depths
from workers.celery_app import app
from workers.engine import batch, dispatch, stepper, timers
from workers.events.exits import exit_when_met
from workers.log import get_logger
from workers.queues import ACTIONS, WORKFLOWS, TaskNames
from workers.sends.gateway import drop_deferred
from workers.settings import get_settings

log = get_logger(__name__)

# What a step's exit needs from above the engine (layer rule): the workflows' exit_when,
# and the send records of the calls an exit drops. Installed where steps run.
stepper.HOOKS = stepper.ExitHooks(exit_when=exit_when_met, drop_sends=drop_deferred)


@app.task(base=FleetBatches, bind=True, name=TaskNames.STEP, acks_late=True,
          flush_every=get_settings().step_batch_size,
          flush_interval=get_settings().step_batch_wait_ms / 1000)
def step(self: FleetBatches, requests: list[Any]) -> dict[str, Any]:
    """`workflows.step(execution_id, expected_version)`: one BPMN node per message.

    The worker buffers step messages and runs each buffer in one transaction
    (`workers.engine.batch`); a message is acknowledged once its step is committed,
    re-published or dead-lettered.
    """
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_name=self.name, messages=len(requests))
    report = batch.run(requests)
    if report.split or report.republished or report.dead_lettered:
        log.warning("steps.batch", **asdict(report))
    else:
        log.debug("steps.batch", **asdict(report))
    return asdict(report)


@app.task(base=FleetTask, bind=True, name=TaskNames.WAKE_DUE_TIMERS,
          workspace_scope="each")
def wake_due_timers(self: FleetTask, limit: int = 1000) -> int:
    """Beat, every few seconds: step every execution whose timer is due."""
    grace = timers.SWEEP_GRACE if get_settings().timer_message_horizon else dt.timedelta(0)
    due = timers.claim_due_timers(self.session, dt.datetime.now(dt.UTC), limit, grace)
    self.after_commit(lambda: dispatch.send_steps(due))
    if due:
        log.info("timers.woken", count=len(due))
    return len(due)


@app.task(base=FleetTask, bind=True, name=TaskNames.REAP_STUCK,
          workspace_scope="each")
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
