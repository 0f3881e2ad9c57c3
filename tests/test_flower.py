"""`fleet flower` against the session's broker: it sees the real worker and the fleet's tasks."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis

from tests.helpers import ROOT, SERVERS, WorkerProcess, wait_for, worker_env
from workers.broker import delete_prefixed_keys
from workers.dev.ports import free_port
from workers.queues import MAINTENANCE, TaskNames

pytestmark = pytest.mark.servers
AUTH = ("ops", f"pw-{uuid.uuid4().hex[:8]}")


@contextmanager
def running_flower(**env: str) -> Iterator[str]:
    """`fleet flower` (which execs `celery -A workers.celery_app flower`) with `env`; its URL."""
    port = free_port()
    environment = worker_env(FLEET_FLOWER_PORT=str(port), **env)
    if "FLEET_FLOWER_BASIC_AUTH" not in env:
        environment.pop("FLEET_FLOWER_BASIC_AUTH", None)
    log_path = SERVERS.home / f"flower-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workers.cli.main", "flower"],
                                env=environment, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"flower exited: {log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{base}/healthcheck", timeout=2).text == "OK"
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, timeout=60, interval=0.25, message="Flower to answer")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def flower() -> Iterator[str]:
    """Flower with basic auth on the session's broker."""
    with running_flower(FLEET_FLOWER_BASIC_AUTH=":".join(AUTH)) as base:
        yield base


@contextmanager
def private_flower(**env: str) -> Iterator[tuple[str, Callable[[], int]]]:
    """Flower on a key prefix nothing consumes; yields its URL and the maintenance queue's length.

    A task Flower accepted stays in that queue: its length says whether it was sent.
    """
    prefix = f"fleet-test-flower-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(SERVERS.broker_url)
    try:
        with running_flower(FLEET_BROKER_KEY_PREFIX=prefix, **env) as base:
            yield base, lambda: int(client.llen(f"{prefix}{MAINTENANCE}"))
    finally:
        client.close()
        delete_prefixed_keys(SERVERS.broker_url, prefix)


def _api(base: str, path: str, **params: Any) -> Any:
    response = httpx.get(f"{base}{path}", params=params, auth=AUTH, timeout=10)
    response.raise_for_status()
    return response.json()


def _tasks(base: str, **params: Any) -> list[dict[str, Any]]:
    return list(_api(base, "/api/tasks", **params).values())


def test_api_needs_the_credentials(flower: str) -> None:
    assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{flower}/api/tasks", auth=("ops", "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"{flower}/api/workers", auth=AUTH, timeout=10).status_code == 200


def test_flower_sees_the_worker_and_the_fleets_tasks(flower: str,
                                                     celery_worker: WorkerProcess) -> None:
    from workers.producer import send_event, send_events

    workers = wait_for(lambda: celery_worker.hostname in (w := _api(flower, "/api/workers",
                                                                    refresh=1)) and w,
                       timeout=30, interval=0.5, message="Flower to list the session's worker")
    assert TaskNames.INGEST in workers[celery_worker.hostname]["registered"]

    # Flower only knows tasks whose events it received: wait until its event
    # consumer is listening (a probe task shows up) before sending the real ones.
    def probe_seen() -> bool:
        marker = str(send_event("flower.probed", user=f"probe-{uuid.uuid4().hex[:8]}@example.com"))
        try:
            return wait_for(lambda: any(marker in (t.get("args") or "") for t in _tasks(
                flower, taskname=TaskNames.INGEST)), timeout=2, interval=0.2)
        except pytest.fail.Exception:
            return False

    wait_for(probe_seen, timeout=60, interval=0, message="Flower to receive task events")

    tag = uuid.uuid4().hex[:10]
    event_ids = {str(send_event("flower.checked", user=f"flower-{tag}-{i}@example.com",
                                data={"i": i}))
                 for i in range(3)}  # one event per message: micro-batched by the worker
    send_events([{"event_type": "flower.checked", "user": f"flower-{tag}-{i}@example.com"}
                 for i in range(7)])  # one message of seven events
    seen: list[tuple[str, str, str]] = []

    def done() -> bool:
        tasks = _tasks(flower)
        seen[:] = [(t["name"], t["state"], t.get("args") or "") for t in tasks]
        singles = [t for t in tasks if t["name"] == TaskNames.INGEST and any(
            event_id in (t.get("args") or "") for event_id in event_ids)]
        batches = [t for t in tasks if t["name"] == TaskNames.INGEST_BATCH
                   and t.get("args") == "[7 events]"]
        if len(singles) == 3 and len(batches) == 1 and all(
                t["state"] == "SUCCESS" for t in singles + batches):
            mine[:] = singles + batches
            return True
        return False

    mine: list[dict[str, Any]] = []
    try:
        wait_for(done, timeout=60, interval=0.5)
    except pytest.fail.Exception:
        pytest.fail(f"Flower shows these tasks (name, state, args): {seen}")
    for task in mine:
        assert task["worker"] == celery_worker.hostname
        assert "'accepted':" in (task["result"] or "")
    # Flower shows the arguments the producer describes: ids, never the user's data.
    assert {t["args"] for t in mine if t["name"] == TaskNames.INGEST} == {
        f"[event {event_id}]" for event_id in event_ids}


CSRF = {"Content-Type": "text/plain", "Origin": "http://evil.example"}  # a form post from any page
RETENTION = f"/api/task/async-apply/{TaskNames.RETENTION}"


def test_without_credentials_flower_changes_nothing() -> None:
    """A page open in a browser on this machine used to run maintenance.retention through it."""
    with private_flower() as (base, queued):
        for headers in (CSRF, {"Content-Type": "application/json"}):
            response = httpx.post(f"{base}{RETENTION}", content="{}", headers=headers, timeout=10)
            assert response.status_code == 403, response.text
        for path in ("/api/task/revoke/x", "/api/worker/shutdown/x", "/api/worker/pool/grow/x",
                     "/api/worker/queue/add-consumer/x", f"/api/task/send-task/{TaskNames.RETENTION}"):
            assert httpx.post(f"{base}{path}", content="{}", headers=CSRF, timeout=10).status_code == 403
        assert queued() == 0  # never sent, so never run
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 200  # reads stay open


def test_with_credentials_cross_site_requests_are_refused() -> None:
    with private_flower(FLEET_FLOWER_BASIC_AUTH=":".join(AUTH)) as (base, queued):
        assert httpx.post(f"{base}{RETENTION}", content="{}", headers={"Content-Type": "text/plain"},
                          timeout=10).status_code == 401
        for headers in (CSRF, {"Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"},
                        {"Content-Type": "text/plain", "Sec-Fetch-Site": "same-site"},
                        {"Content-Type": "text/plain", "Origin": "null"}):
            response = httpx.post(f"{base}{RETENTION}", content="{}", headers=headers, auth=AUTH,
                                  timeout=10)
            assert response.status_code == 403, (headers, response.text)
        assert queued() == 0
        # The operator's own request (same origin, credentials) is what gets through.
        own = {"Content-Type": "application/json", "Origin": base, "Sec-Fetch-Site": "same-origin"}
        response = httpx.post(f"{base}{RETENTION}", content="{}", headers=own, auth=AUTH, timeout=10)
        assert response.status_code == 200, response.text
        assert queued() == 1
