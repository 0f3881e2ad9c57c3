"""Servers a test starts for itself beside the session's PostgreSQL: a PgBouncer in
transaction mode in front of it, a PostgreSQL of its own, a streaming replica.

Both binaries refuse to run as root; as root they run as the `postgres` system user
(Debian's server package makes it), in folders made for it. Every server listens on
127.0.0.1 on a free port, without a Unix socket, and is stopped and deleted on exit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

from workers.dev.ports import free_port

SERVER_USER = "postgres"  # the OS user servers run as when the tests run as root
PGBOUNCER_PATHS = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


def _server_user() -> str | None:
    return SERVER_USER if os.geteuid() == 0 else None


def _folder(prefix: str) -> Path:
    """A fresh 0700 folder the servers' user owns."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if (user := _server_user()) is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def _run(argv: list[str], timeout: float = 60) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          user=_server_user(), cwd="/", check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")


def _wait_connectable(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@functools.cache
def pgbouncer_binary() -> str | None:
    """pgbouncer's path; as root, `apt-get install -y pgbouncer` is tried once if it is absent."""
    found = shutil.which("pgbouncer") or next(
        (p for p in PGBOUNCER_PATHS if Path(p).exists()), None)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "pgbouncer"], capture_output=True,
                       timeout=600, check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("pgbouncer") or next(
            (p for p in PGBOUNCER_PATHS if Path(p).exists()), None)
    return found


def server_bindir(url: str) -> Path:
    """The binaries of the server's major version (Debian: /usr/lib/postgresql/N/bin)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None
    major = int(row[0]) // 10000
    for candidate in (Path(f"/usr/lib/postgresql/{major}/bin"),
                      Path(f"/usr/pgsql-{major}/bin")):
        if (candidate / "pg_ctl").exists():
            return candidate
    raise RuntimeError(f"no PostgreSQL {major} server binaries found")


class PgBouncer:
    """`pgbouncer` in transaction pooling mode in front of host:port, trust auth.

    `databases` adds named entries (alias -> connection parameters, e.g.
    `dbname=x pool_size=1`); every other database name passes through as it is.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 5432, *, pool_size: int = 4,
                 databases: dict[str, str] | None = None) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise FileNotFoundError("pgbouncer is not installed")
        self.binary = binary
        self.server = f"host={host} port={port}"
        self.pool_size = pool_size
        self.databases = databases or {}
        self.port = 0
        self.home: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        assert self.home is not None
        return (self.home / "pgbouncer.log").read_text(errors="replace")

    def __enter__(self) -> Self:
        self.home = _folder("fleet-pgbouncer-")
        self.port = free_port()
        lines = ["[databases]",
                 *(f"{alias} = {self.server} {params}" for alias, params in self.databases.items()),
                 f"* = {self.server}",
                 "[pgbouncer]", "listen_addr = 127.0.0.1", f"listen_port = {self.port}",
                 "unix_socket_dir =", "auth_type = trust", f"auth_file = {self.home / 'users.txt'}",
                 "pool_mode = transaction", f"default_pool_size = {self.pool_size}",
                 "max_client_conn = 500", "admin_users = postgres", f"pidfile = {self.home / 'pid'}"]
        (self.home / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        (self.home / "users.txt").write_text('"postgres" ""\n')  # trust: names must be listed
        argv = [self.binary, str(self.home / "pgbouncer.ini")]
        if (user := _server_user()) is not None:
            argv[1:1] = ["-u", user]
        with open(self.home / "pgbouncer.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            _wait_connectable(self.url("pgbouncer"), timeout=15)
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def admin(self, command: str) -> list[dict[str, object]]:
        """A command of the admin console (SHOW STATS, SHOW POOLS, …) as rows."""
        with psycopg.connect(self.url("pgbouncer"), autocommit=True) as conn:
            cur = conn.execute(command, prepare=False)
            names = [c.name for c in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.home is not None and not os.environ.get("FLEET_TEST_KEEP_LOGS"):
            shutil.rmtree(self.home, ignore_errors=True)


class ReplicationRefused(RuntimeError):
    """The primary does not let pg_basebackup connect (pg_hba.conf, max_wal_senders, wal_level)."""


class PostgresServer:
    """A PostgreSQL server of the test's own: `initdb` (a primary that allows replication)
    or `basebackup` (a hot standby streaming from a primary)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.home = _folder("fleet-pg-")
        self.data = self.home / "data"
        self.port = free_port()
        self._running = False

    # ------------------------------------------------------------------ making one

    @classmethod
    def initdb(cls, bindir: Path) -> PostgresServer:
        server = cls(bindir)
        try:
            _run([str(bindir / "initdb"), "-D", str(server.data), "--auth=trust", "-U", "postgres",
                  "--encoding=utf8", "--locale=C"], timeout=120)
        except Exception:
            server.discard()
            raise
        return server

    @classmethod
    def basebackup(cls, bindir: Path, host: str, port: int) -> PostgresServer:
        """A copy of the primary at host:port, set up to stream from it (`-R`)."""
        server = cls(bindir)
        try:
            _run([str(bindir / "pg_basebackup"), "-h", host, "-p", str(port), "-U", "postgres",
                  "-D", str(server.data), "-R", "-X", "stream", "--checkpoint=fast"], timeout=300)
        except RuntimeError as exc:
            server.discard()
            text = str(exc)
            if any(s in text for s in ("pg_hba.conf", "replication", "wal_level", "wal senders")):
                raise ReplicationRefused(text) from None
            raise
        return server

    # ------------------------------------------------------------------ running it

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> Self:
        # Debian keeps postgresql.conf and pg_hba.conf outside the data folder, so a copy
        # of its server has neither: the command line and a trust pg_hba.conf of our own.
        hba = self.home / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n"
                       "local replication all trust\nhost replication all 127.0.0.1/32 trust\n")
        conf = self.data / "postgresql.conf"
        if not conf.exists():
            conf.write_text("")
        if (user := _server_user()) is not None:
            entry = pwd.getpwnam(user)
            for path in (hba, conf):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k '' -c hba_file={hba} "
                   "-c wal_level=replica -c max_wal_senders=5 -c hot_standby=on "
                   "-c max_connections=50 -c shared_buffers=32MB -c fsync=off")
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-o", options,
              "-l", str(self.home / "server.log"), "start"], timeout=90)
        self._running = True
        _wait_connectable(self.url())
        return self

    def stop(self) -> None:
        if self._running:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast",
                      "stop"], timeout=60)
            self._running = False

    def discard(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start() if not self._running else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.discard()


@contextlib.contextmanager
def streaming_replica(bindir: Path, host: str, port: int) -> Iterator[PostgresServer]:
    """A started hot standby of host:port; stopped and deleted afterwards."""
    with PostgresServer.basebackup(bindir, host, port) as replica:
        with psycopg.connect(replica.url(), autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        assert row is not None and row[0], "the copy is not a standby"
        yield replica
