"""A whole scratch fleet to hurt: a worker per busy queue and a beat, on a database of its own.

Built on the benchmarks' scratch environment (its own database on the configured
server, its own broker key prefix, dropped at the end) with the timings shortened
so that recovery is seen in seconds: messages of a killed worker come back after
FLEET_VISIBILITY_TIMEOUT, and a lost step is re-sent once it is
FLEET_STUCK_STEP_SECONDS old (the reaper then sweeps every quarter of that).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from workers.dev.supervisor import ProcessSpec, Supervisor, beat_spec
from workers.processes import celery_argv
from workers.queues import ACTIONS, EVENTS, MAINTENANCE, WORKFLOWS, worker_options
from workers.tools.bench.harness import BenchEnvironment

QUEUES = (EVENTS, WORKFLOWS, ACTIONS, MAINTENANCE)
FAST_RECOVERY = {
    "FLEET_VISIBILITY_TIMEOUT": "12",
    "FLEET_RETRY_BACKOFF_BASE": "0.2",
    "FLEET_RETRY_BACKOFF_MAX": "2",
    "FLEET_STUCK_STEP_SECONDS": "8",
    "FLEET_OUTBOX_CONFIRM_SECONDS": "10",
    "FLEET_TRIGGER_CACHE_SECONDS": "0.5",
    "FLEET_WEBHOOK_TIMEOUT": "5",
}


class ChaosFleet(BenchEnvironment):
    """`with ChaosFleet() as fleet: fleet.start(); fleet.kill_worker(EVENTS); ...`"""

    def __init__(self, *, concurrency: int = 2, broker_url: str | None = None,
                 database_url: str | None = None, log_dir: Path | None = None,
                 kind: str = "chaos", env: dict[str, str] | None = None) -> None:
        super().__init__(",".join(QUEUES), concurrency, log_dir, kind=kind,
                         broker_url=broker_url, database_url=database_url,
                         env={**FAST_RECOVERY, **(env or {})})
        self.log_dir = self.log_dir / self.tag
        self.supervisor: Supervisor | None = None
        self.kills: list[str] = []
        self._previous_sigterm: Any = None

    def _worker(self, queue: str) -> ProcessSpec:
        hostname = f"{queue}-{self.tag}@localhost"
        return ProcessSpec(
            name=f"worker-{queue}",
            argv=celery_argv("worker", "-Q", queue, "-n", hostname, "-c", str(self.concurrency),
                             *worker_options(queue), "--without-mingle", "--without-gossip",
                             "--loglevel", "WARNING"),
            ready=lambda: self._answers(hostname),
        )

    def _answers(self, hostname: str) -> bool:
        try:
            return bool(self.app.control.ping(destination=[hostname], timeout=0.5))
        except Exception:  # the broker restarting or still loading its data: not yet
            return False

    def start(self, timeout: float = 90) -> None:
        """Start the fleet; a SIGTERM to this process from now on stops it (SystemExit)."""
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        specs = [self._worker(queue) for queue in QUEUES] + [beat_spec(self.log_dir, "WARNING")]
        self.supervisor = Supervisor(specs, self.log_dir, self.env)
        self.supervisor.start()
        self.supervisor.wait_ready(timeout)

    @property
    def sup(self) -> Supervisor:
        if self.supervisor is None:
            raise RuntimeError("the fleet is not started")
        return self.supervisor

    def kill_worker(self, queue: str) -> None:
        """kill -9 of the worker's main process and its pool (a lost pod), then start it again."""
        name = f"worker-{queue}"
        self.sup.kill(name)
        self.kills.append(f"{name} main")
        self.sup.restart(name)

    def kill_pool_child(self, queue: str) -> bool:
        """kill -9 of one pool process; the main process replaces it. False if none was busy."""
        main = psutil.Process(self.sup.procs[f"worker-{queue}"].pid)
        children = main.children()
        if not children:
            return False
        os.kill(children[0].pid, signal.SIGKILL)
        self.kills.append(f"worker-{queue} child")
        return True

    def wait_workers(self, timeout: float = 60) -> None:
        """Until every worker answers a ping again (after restarts)."""
        self.sup.wait_ready(timeout)

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of each worker, main process plus pool, in MiB."""
        out: dict[str, float] = {}
        for name, proc in self.sup.procs.items():
            try:
                root = psutil.Process(proc.pid)
                total = root.memory_info().rss + sum(
                    c.memory_info().rss for c in root.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
            out[name] = round(total / 2**20, 1)
        return out

    def depths(self) -> dict[str, int]:
        return {queue: self.queue_length(queue) for queue in (EVENTS, WORKFLOWS, ACTIONS)}

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if dead := self.sup.dead():
                raise RuntimeError(f"{', '.join(dead)} died; logs in {self.log_dir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not after {timeout:.0f}s; logs in {self.log_dir}")
            time.sleep(0.25)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.supervisor is not None:
            self.supervisor.stop(grace=20)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        super().__exit__(exc_type, exc, tb)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # Unwinds through ChaosFleet.__exit__, which stops the workers and drops the database.
    raise SystemExit(128 + signum)
