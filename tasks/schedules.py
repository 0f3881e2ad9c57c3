"""Scheduled audience journeys (segments queue): the beat's sweep and the runs it sends.

On the segments queue, beside the refresh: a run reads members with the same
set-based SQL over `users` and memberships, and the queue keeps it off
`maintenance`, whose timer sweeps and reaper must never wait behind a run over a
million users, and off the `workflows`/`actions` hot path. A run message does
batches for up to RUN_BUDGET_SECONDS, each committed (then its first steps sent),
and sends the next message for the rest: a long run takes turns with refreshes.
A message that fails after some of its batches committed is retried with its first
count, which has moved on, so the retry does nothing; the beat's sweep sends the run
again once its heartbeat is `runs.STALE_AFTER` old (as for a killed worker).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from functools import partial

from workers.base_task import FleetTask
from workers.celery_app import app
from workers.engine import dispatch
from workers.log import get_logger
from workers.queues import TaskNames
from workers.schedules import runs

log = get_logger(__name__)
RUN_BUDGET_SECONDS = 5.0  # well below runs.STALE_AFTER: a live run never looks dead


def send_run(message: runs.RunMessage) -> None:
    """Send a run's next message (the beat's sweep, the run itself, `fleet schedule run`)."""
    run.delay(str(message.run_id), message.batches)


@app.task(base=FleetTask, bind=True, name=TaskNames.START_DUE_SCHEDULES,
          workspace_scope="each")
def start_due_schedules(self: FleetTask, stale_seconds: float | None = None) -> int:
    """Beat: start due schedules' runs; send again runs whose heartbeat stopped (a dead worker)."""
    now = dt.datetime.now(dt.UTC)
    older_than = runs.STALE_AFTER if stale_seconds is None else dt.timedelta(seconds=stale_seconds)
    started = runs.start_due(self.session, now)
    resumed = runs.resume_stale(self.session, now, older_than)
    for message in started + resumed:
        self.after_commit(partial(send_run, message))
    if started or resumed:
        log.info("schedules.swept", started=len(started), resumed=len(resumed))
    return len(started) + len(resumed)


@app.task(base=FleetTask, bind=True, name=TaskNames.RUN_SCHEDULE)
def run(self: FleetTask, run_id: str, batches: int) -> str:
    """Batches of one run from the `batches` count it expects (a copy does nothing)."""
    deadline = time.monotonic() + RUN_BUDGET_SECONDS
    started = 0
    while True:
        batch = runs.run_batch(self.session, uuid.UUID(run_id), batches,
                               dt.datetime.now(dt.UTC))
        started += len(batch.started)
        if batch.status != "more" or time.monotonic() > deadline:
            break
        self.session.commit()  # this batch's starts and cursor, before its steps go out
        dispatch.send_steps((execution_id, 0) for execution_id in batch.started)
        batches = batch.batches
    self.after_commit(partial(dispatch.send_steps,
                              [(execution_id, 0) for execution_id in batch.started]))
    if batch.status == "more":
        self.after_commit(partial(send_run, runs.RunMessage(uuid.UUID(run_id), batch.batches)))
    log.info("schedule.run", run_id=run_id, status=batch.status, batches=batch.batches,
             started=started)
    return batch.status
