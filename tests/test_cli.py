"""The `fleet` command as a user runs it: services, migrate, and the whole fleet via `dev`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from tests.helpers import ROOT, SERVERS, wait_for
from workers.dev.embedded import EmbeddedServices
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
    try:
        assert fleet("services", "status", env=env, check=False).returncode == 1
    finally:
        EmbeddedServices(tmp_path / "fleet").discard()  # as root, files outside tmp_path too


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
        said = "".join(lines)  # what it is doing while it starts, before it is ready
        assert "migrating the database" in said and "starting a worker per queue" in said, said
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


def _no_urls(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env["FLEET_HOME"] = str(home)
    return env


def _servers_of(home: Path) -> list[psutil.Process]:
    """Processes that serve from this home folder (or its folder outside, as root)."""
    places = (str(home), str(EmbeddedServices(home).server_root))
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(place in cmdline for place in places):
            found.append(proc)
    return found


@pytest.mark.parametrize("command", [("status",), ("migrate",), ("dlq", "list")])
def test_without_urls_a_command_says_what_is_missing_and_starts_nothing(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    home = tmp_path / "fleet"
    done = fleet(*command, env=_no_urls(home), check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    missing = "DATABASE_URL is" if command == ("migrate",) else \
        "DATABASE_URL and CELERY_BROKER_URL are"
    assert f"{missing} not set and no embedded servers run under {home}" in message, message
    assert 'eval "$(fleet services env)"' in message
    assert not (home / "services.json").exists()
    assert not EmbeddedServices(home).server_root.exists()
    assert _servers_of(home) == []


def test_stopped_embedded_servers_are_reported_not_restarted(tmp_path: Path) -> None:
    home = tmp_path / "fleet"
    home.mkdir()
    (home / "services.json").write_text(
        json.dumps({"postgres_port": free_port(), "redis_port": free_port()}))
    env = _no_urls(home)
    env["DATABASE_URL"] = SERVERS.database_url
    done = fleet("status", env=env, check=False)
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert (f"CELERY_BROKER_URL is not set and the embedded servers recorded in "
            f"{home / 'services.json'} are not running") in message, message
    assert _servers_of(home) == []


def test_a_set_url_is_never_replaced_by_the_embedded_one(tmp_path: Path) -> None:
    """services.json names a live server, DATABASE_URL a dead one: the command uses (and
    fails on) DATABASE_URL; with only DATABASE_URL set, `fleet migrate` needs no broker."""
    admin = urllib.parse.urlsplit(SERVERS.admin_url)
    home = tmp_path / "fleet"
    home.mkdir()
    (home / "services.json").write_text(
        json.dumps({"postgres_port": admin.port, "redis_port": free_port()}))
    env = dict(_no_urls(home), DATABASE_URL="postgresql://postgres@127.0.0.1:9/postgres")
    done = fleet("migrate", env=env, check=False)
    assert done.returncode != 0 and "port 9 failed" in done.stderr, \
        done.stderr[-2000:]
    env = dict(_no_urls(tmp_path / "elsewhere"), DATABASE_URL=SERVERS.database_url)
    done = fleet("migrate", env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "elsewhere" / "services.json").exists()
