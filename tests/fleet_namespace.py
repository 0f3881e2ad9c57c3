"""A broker namespace of its own and the real worker processes started on it.

Shared by the worker tests that need several workers side by side
(tests/test_send_gateway_workers.py, tests/test_split_workers.py).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from celery import Celery

from db.session import session_scope
from tests.helpers import WorkerProcess, wait_for
from tests.workflow_helpers import execution
from workers.engine import control
from workers.queues import TaskNames

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
