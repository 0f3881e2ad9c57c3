"""Helpers shared by the tests: the session's servers, a real worker process, polling."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
# Test workers re-read trigger definitions this often (production default: 2 s).
TRIGGER_CACHE_SECONDS = 0.3


class Servers:
    """What pytest_configure set up, for the fixtures and for the teardown."""

    home: Path
    embedded: object | None = None
    admin_url: str
    database_url: str
    broker_url: str
    database: str


SERVERS = Servers()


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class WorkerProcess:
    """A real `celery worker` subprocess on the session's broker and database."""

    def __init__(self, queues: str, concurrency: int = 2, **env: str) -> None:
        from workers.celery_app import app
        from workers.queues import worker_options

        self.app = app
        self.hostname = f"test-{uuid.uuid4().hex[:8]}@localhost"
        self.log_path = SERVERS.home / f"{self.hostname}.log"
        argv = [
            sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "-Q", queues, "-n", self.hostname, "-c", str(concurrency),
            "--include", "tests.worker_tasks", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip", *worker_options(queues),
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=worker_env(**env), cwd=ROOT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_path.read_text()[-3000:]}")
            if self.app.control.ping(destination=[self.hostname], timeout=0.5):
                return
        raise RuntimeError(f"worker not ready: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1,
             message: str = "") -> T:
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)
