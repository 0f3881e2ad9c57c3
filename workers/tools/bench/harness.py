"""A scratch fleet for benchmarks: its own database and broker prefix, a real worker.

The database is created on the configured server (DATABASE_URL or the embedded
one), migrated, and dropped at the end, so a benchmark never touches real data.
A benchmark that needs what a fleet runs beside the measured worker (another
queue's worker, the beat) starts it here too, with the same settings.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from db.admin import create_database, drop_database
from db.config import to_sqlalchemy_url
from db.migrate import upgrade
from workers.broker import delete_prefixed_keys
from workers.celery_app import create_app
from workers.processes import celery_argv
from workers.queues import worker_options
from workers.settings import Settings


class BenchEnvironment:
    def __init__(self, queues: str, concurrency: int, log_dir: Path | None = None, *,
                 kind: str = "bench", broker_url: str | None = None,
                 database_url: str | None = None, env: dict[str, str] | None = None) -> None:
        """`broker_url` / `database_url` override the configured servers (the scratch database
        is made on that server); `env` adds settings for every process."""
        self.tag = uuid.uuid4().hex[:8]
        self.queues = queues
        self.concurrency = concurrency
        base = Settings()
        admin_url = database_url or base.database_url
        if admin_url is None or (broker_url or base.broker_url) is None:
            raise RuntimeError(f"no servers: run through `fleet {kind}`, which starts them")
        self.admin_url = admin_url
        self.database = f"fleet_{kind}_{self.tag}"
        self.log_dir = log_dir or base.home / kind
        self.env = dict(os.environ)
        # Behind a pooler (FLEET_DB_POOLER) the scratch database is made, migrated and
        # dropped through DATABASE_DIRECT_URL; every URL the processes get names it (the
        # configured servers' extra URLs mean nothing on a `database_url` of the caller's).
        self.direct_admin_url = admin_url
        for name in ("DATABASE_DIRECT_URL", "DATABASE_READ_URL"):
            if database_url is not None:
                self.env.pop(name, None)
            elif self.env.get(name):
                if name == "DATABASE_DIRECT_URL":
                    self.direct_admin_url = self.env[name]
                self.env[name] = self._scratch(self.env[name])
        self.pooler = base.db_pooler
        self.env.update({
            "DATABASE_URL": self._scratch(self.admin_url),
            "CELERY_BROKER_URL": broker_url or base.broker_url or "",
            "FLEET_BROKER_KEY_PREFIX": f"fleet-{kind}-{self.tag}:",
            "FLEET_LOG_LEVEL": "WARNING",
            **(env or {}),
        })
        self.hostname = f"bench-{self.tag}@localhost"
        self.worker: subprocess.Popen[bytes] | None = None
        self.extras: dict[str, subprocess.Popen[bytes]] = {}  # other workers, the beat
        self.engine: Engine
        self.app: Celery

    def _scratch(self, url: str) -> str:
        return make_url(url).set(database=self.database).render_as_string(hide_password=False)

    def __enter__(self) -> Self:
        create_database(self.direct_admin_url, self.database)
        upgrade(to_sqlalchemy_url(self._scratch(self.direct_admin_url)))
        # Psycopg prepares nothing behind a pooler (db/session.py says why).
        self.engine = create_engine(to_sqlalchemy_url(self.env["DATABASE_URL"]), connect_args=(
            {"prepare_threshold": None} if self.pooler else {}))
        self.app = create_app(self.settings())
        return self

    def settings(self) -> Settings:
        """The scratch fleet's settings, as its processes read them from the environment."""
        values = {k.removeprefix("FLEET_").lower(): v for k, v in self.env.items()
                  if k.startswith("FLEET_")}
        # Validated as the constructor would read them (the aliased URLs by their variable
        # names), but from this dict instead of os.environ.
        return Settings.model_validate({**values, "DATABASE_URL": self.env["DATABASE_URL"],
                                        "CELERY_BROKER_URL": self.env["CELERY_BROKER_URL"]})

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}-{self.tag}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        return proc

    def start_worker(self) -> None:
        self.worker = self._spawn("worker", celery_argv(
            "worker", "-Q", self.queues, "-n", self.hostname, "-c", str(self.concurrency),
            *worker_options(self.queues), "--include", "tasks.bench",  # only bench workers
            "--without-mingle", "--without-gossip", "--loglevel", "WARNING"))
        self.wait(lambda: bool(self.app.control.ping(destination=[self.hostname], timeout=0.5)),
                  60)

    def start_queue_worker(self, queue: str, concurrency: int = 1) -> None:
        """A fleet worker on `queue` alone, beside the measured one (not CPU-metered)."""
        hostname = f"bench-{queue}-{self.tag}@localhost"
        self.extras[f"worker-{queue}"] = self._spawn(f"worker-{queue}", celery_argv(
            "worker", "-Q", queue, "-n", hostname, "-c", str(concurrency),
            *worker_options(queue), "--without-mingle", "--without-gossip",
            "--loglevel", "WARNING"))
        self.wait(lambda: bool(self.app.control.ping(destination=[hostname], timeout=0.5)), 60)

    def start_beat(self) -> None:
        """The fleet's own `celery beat`: its schedule and its locked scheduler, as deployed."""
        self.extras["beat"] = self._spawn("beat", celery_argv(
            "beat", "--schedule", str(self._beat_schedule()), "--loglevel", "WARNING"))
        self.wait(lambda: any(self.log_dir.glob(f"{self._beat_schedule().name}*")), 60)

    def _beat_schedule(self) -> Path:
        return self.log_dir / f"celerybeat-schedule-{self.tag}"

    def stop_extras(self) -> None:
        """Stop the other workers and the beat (warm shutdown, then kill); drop beat's file."""
        for proc in self.extras.values():
            _stop(proc)
        self.extras.clear()
        for path in self.log_dir.glob(f"{self._beat_schedule().name}*"):
            path.unlink()

    def pause_consumer(self, queue: str) -> None:
        self.app.control.cancel_consumer(queue, destination=[self.hostname], reply=True)

    def resume_consumer(self, queue: str) -> None:
        self.app.control.add_consumer(queue, destination=[self.hostname], reply=True)

    def queue_length(self, queue: str) -> int:
        # A pooled connection: connecting anew on every poll cost the worker ~25% of a core.
        with self.app.pool.acquire(block=True) as conn:
            channel = conn.default_channel
            if hasattr(channel, "_size"):  # Redis: kombu's virtual channel sums the priority lists
                return int(channel._size(queue))
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            except ChannelError:
                return 0

    def queue_empty(self, queue: str) -> bool:
        return self.queue_length(queue) == 0

    def scalar(self, sql: Any, params: dict[str, Any] | None = None) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sql, params or {}).scalar()

    def scalars(self, sql: Any, params: dict[str, Any] | None = None) -> Iterator[Any]:
        with self.engine.connect() as conn:
            yield from conn.execute(sql, params or {}).scalars()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"bench worker exited; see {self.log_dir}")
            if dead := [name for name, proc in self.extras.items() if proc.poll() is not None]:
                raise RuntimeError(f"bench {', '.join(dead)} exited; see {self.log_dir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"benchmark step did not finish within {timeout}s")
            time.sleep(0.02)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_extras()
        if self.worker is not None:
            _stop(self.worker)
        self.engine.dispose()
        delete_prefixed_keys(self.env["CELERY_BROKER_URL"], self.env["FLEET_BROKER_KEY_PREFIX"])
        drop_database(self.direct_admin_url, self.database)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
