"""A broker namespace of its own and the real worker processes started on it.

Shared by the worker tests that run on a namespace of their own (`own_fleet`, a module
fixture's body; `per_test` stops what one test started): the send gateway, splits,
goal exits, schedules and segment triggers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from celery import Celery

from db.session import session_scope
from tests.helpers import SERVERS, WorkerProcess, wait_for
from tests.workflow_helpers import execution
from workers.broker import delete_prefixed_keys
from workers.celery_app import create_app
from workers.engine import control
from workers.queues import TaskNames
from workers.settings import Settings

STARTUP_SECONDS = 90  # a worker's start on a busy two-core machine


@dataclass
class Fleet:
    """A broker namespace, a Celery app that sends to it, and the workers started on it."""

    prefix: str
    app: Celery
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_workers(self, queues: str, count: int = 1, **env: str) -> list[WorkerProcess]:
        """`count` workers of `queues`, started side by side; returns once all are ready."""
        started = [WorkerProcess(queues, concurrency=2, FLEET_BROKER_KEY_PREFIX=self.prefix, **env)
                   for _ in range(count)]
        self.workers += started
        for worker in started:
            _wait_ready(worker)
        return started

    def start(self, workflow: str, users: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """One execution per user (one transaction), their first steps sent together."""
        with session_scope() as session:
            ids = [control.start(session, workflow, user) for user in users]
        with self.app.producer_or_acquire() as producer:
            for execution_id in ids:
                self.app.send_task(TaskNames.STEP, args=[str(execution_id), 0],
                                   producer=producer)
        return ids

    def wake_timers_until(self, execution_id: uuid.UUID, status: str,
                          timeout: float) -> None:
        """tests.workflow_helpers.wake_timers_until, sending the sweep to this namespace."""
        last_sent = 0.0

        def done() -> bool:
            nonlocal last_sent
            if execution(execution_id).status == status:
                return True
            if time.monotonic() - last_sent > 0.25:
                self.app.send_task(TaskNames.WAKE_DUE_TIMERS)
                last_sent = time.monotonic()
            return False
        wait_for(done, timeout=timeout, interval=0.05,
                 message=f"execution {execution_id} to be {status} (waking timers)")

    def stop(self, since: int = 0) -> None:
        """Stop the workers started after the first `since` of them (side by side: faster)."""
        for worker in self.workers[since:]:
            if worker.proc.poll() is None:
                worker.proc.terminate()
        for worker in self.workers[since:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=30)
            worker.stop()  # closes its log (and kills one that would not stop)
        del self.workers[since:]


def _wait_ready(worker: WorkerProcess) -> None:
    wait_for(lambda: " ready." in worker.log(), timeout=STARTUP_SECONDS,
             message=f"worker {worker.hostname} to start")


@contextlib.contextmanager
def own_fleet(tag: str, queues: str, **env: str) -> Iterator[Fleet]:
    """A fleet on a namespace of its own, with a worker of `queues` (and `env`) started;
    its workers stopped and its broker keys deleted afterwards (a module fixture's body)."""
    prefix = f"{os.environ['FLEET_BROKER_KEY_PREFIX']}{tag}-{uuid.uuid4().hex[:6]}:"
    fleet = Fleet(prefix, create_app(Settings(database_url=SERVERS.database_url,
                                              broker_url=SERVERS.broker_url,
                                              broker_key_prefix=prefix)))
    try:
        fleet.start_workers(queues, 1, **env)
        yield fleet
    finally:
        fleet.stop()
        delete_prefixed_keys(SERVERS.broker_url, prefix)


def per_test(module_fleet: Fleet) -> Iterator[Fleet]:
    """The module's fleet for one test; the workers the test starts are stopped after it."""
    before = len(module_fleet.workers)
    try:
        yield module_fleet
    finally:
        module_fleet.stop(since=before)
