"""celery-exporter (danihodovic), as deploy/ runs it, on the session's broker and worker.

Celery's own task and worker metrics come from the maintained exporter, not from
counters of ours: this starts it against the test broker with the session's key prefix
(what compose and Kubernetes pass it), publishes an event and reads `/metrics`.

It is not installable from PyPI (the `celery-exporter` name there is an unrelated 2021
package whose build fails), so it runs from its `celery-exporter` binary when one is on
PATH (its release binary) or from its image when a Docker daemon answers; with
neither the test is skipped and says so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import SERVERS, WorkerProcess, wait_for

IMAGE = os.environ.get("CELERY_EXPORTER_IMAGE", "danihodovic/celery-exporter")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", "info"], capture_output=True, timeout=30)
    return done.returncode == 0


def _exporter_argv(port: int) -> list[str]:
    """The arguments deploy/ gives the exporter (the broker URL goes in CE_BROKER_URL)."""
    prefix = os.environ["FLEET_BROKER_KEY_PREFIX"]
    return [f"--broker-transport-option=global_keyprefix={prefix}",
            "--queues=events,workflows,actions,segments,maintenance",
            "--retry-interval=5", f"--port={port}", "--host=127.0.0.1"]


@pytest.fixture()
def celery_exporter() -> Iterator[str]:
    """A running celery-exporter on the session's broker; yields its /metrics URL."""
    port = _free_port()
    env = {**os.environ, "CE_BROKER_URL": SERVERS.broker_url}
    binary = shutil.which("celery-exporter")
    if binary:
        argv = [binary, *_exporter_argv(port)]
    elif _docker_answers():
        argv = ["docker", "run", "--rm", "--network=host", "-e", "CE_BROKER_URL",
                f"--name=fleet-test-celery-exporter-{uuid.uuid4().hex[:8]}",
                IMAGE, *_exporter_argv(port)]
    else:
        pytest.skip("celery-exporter cannot run here: it is not installable from PyPI (the "
                    "`celery-exporter` package there is an unrelated one whose build fails), "
                    "no `celery-exporter` binary is on PATH and no Docker daemon answers for "
                    f"its image {IMAGE}")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: _scrape(url) is not None, timeout=120, message="celery-exporter up")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


def _samples(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


@pytest.mark.servers
def test_celery_exporter_reports_the_fleets_workers_and_tasks(
        celery_exporter: str, celery_worker: WorkerProcess) -> None:
    from workers.producer import send_event

    send_event("user.signed_up", user=f"exporter-{uuid.uuid4().hex[:10]}@example.com")

    def metrics() -> str | None:
        text = _scrape(celery_exporter) or ""
        up = [s for s in _samples(text, "celery_worker_up") if s.endswith(" 1.0")]
        sent = [s for s in _samples(text, "celery_task_sent_total")
                if 'name="events.ingest' in s and not s.endswith(" 0.0")]
        succeeded = [s for s in _samples(text, "celery_task_succeeded_total")
                     if 'name="events.ingest' in s and not s.endswith(" 0.0")]
        return text if up and sent and succeeded else None

    wait_for(metrics, timeout=90, message="celery_worker_up and events.ingest counters")
