"""The `fleet` command as a user runs it: services, migrate, and the whole fleet via `dev`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from tests.helpers import ROOT, wait_for
from workers.dev.ports import free_port
from workers.queues import QUEUE_NAMES

FLEET = [sys.executable, "-m", "workers.cli.main"]


def fleet(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEET, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=180, check=check)


def test_services_env_status_stop_without_urls(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env["FLEET_HOME"] = str(tmp_path / "fleet")
    try:
        out = fleet("services", "env", env=env).stdout
        urls = dict(re.findall(r"(DATABASE_URL|CELERY_BROKER_URL)=(\S+)", out))
        assert urls["DATABASE_URL"].startswith("postgresql://")
        assert urls["CELERY_BROKER_URL"].startswith("redis://")
        fleet("migrate", env=env)
        with psycopg.connect(urls["DATABASE_URL"]) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
        assert {"users", "workflow_executions", "lifecycle_events", "dead_letters"} <= tables
        assert fleet("services", "status", env=env).returncode == 0
    finally:
        fleet("services", "stop", env=env)
    assert fleet("services", "status", env=env, check=False).returncode == 1


@pytest.mark.servers
def test_dev_runs_every_process_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    from workers.celery_app import app

    env = dict(os.environ, FLEET_HOME=str(tmp_path / "fleet"), FLEET_FLOWER_PORT=str(free_port()))
    started = time.monotonic()
    proc = subprocess.Popen([*FLEET, "dev"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "fleet ready" in line or "Error" in line:
                break
        assert any("fleet ready" in line for line in lines), "".join(lines)
        print(f"fleet dev ready after {time.monotonic() - started:.1f}s")
        children = psutil.Process(proc.pid).children(recursive=True)
        replies = app.control.ping(timeout=2)
        hostnames = {name for reply in replies for name in reply}
        for queue in QUEUE_NAMES:
            assert any(h.startswith(f"{queue}@") for h in hostnames), hostnames
        flower = f"http://127.0.0.1:{env['FLEET_FLOWER_PORT']}"
        assert httpx.get(f"{flower}/healthcheck", timeout=5).text == "OK"
        wait_for(lambda: len(httpx.get(f"{flower}/api/workers?refresh=1", timeout=10).json()) >= 5,
                 message="Flower to see the workers")
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, rest
    assert "fleet stopped" in rest
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
