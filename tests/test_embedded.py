"""The embedded servers a fresh machine gets: start, reuse, stop, restart with data kept;
as root in a folder closed to others; and the size-capped logs of the supervised fleet."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from workers.dev import embedded
from workers.dev.embedded import PG_INSTALL, PG_SYSTEM_USER, EmbeddedServices
from workers.dev.ports import LOCAL_PORT_RANGE, free_port
from workers.dev.supervisor import ProcessSpec, Supervisor


def test_start_reuse_stop_restart(tmp_path: Path) -> None:
    services = EmbeddedServices(tmp_path / "home")
    try:
        state = services.start()
        with psycopg.connect(state.database_url) as conn:
            conn.execute("CREATE TABLE kept (v int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        assert redis.Redis.from_url(state.broker_url).ping()
        assert services.start() == state  # running servers are reused, not restarted
        assert all(info["running"] for info in services.status().values())

        services.stop()
        assert not any(info["running"] for info in services.status().values())

        again = services.start()
        assert again.postgres_port == state.postgres_port
        with psycopg.connect(again.database_url) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == (42,)
    finally:
        services.discard()
    assert not services.server_root.exists()


def _modes(paths: list[Path]) -> dict[Path, int]:
    return {path: path.stat().st_mode for path in paths}


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_ports_are_outside_the_ephemeral_range_and_a_restart_keeps_its_port() -> None:
    """A server restarted under its clients' URL must get its port back: free ports come
    from outside the range outgoing connections use, and `exact` never moves."""
    low = int(LOCAL_PORT_RANGE.read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(port < low for port in ports)
    port = ports.pop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        assert embedded._listening_port(port, exact=False) != port  # a first start moves
        with pytest.raises(RuntimeError, match="still taken"):
            embedded._listening_port(port, exact=True, wait=0.5)
    assert embedded._listening_port(port, exact=True, wait=0.5) == port


def test_as_root_in_a_closed_folder_the_server_files_go_elsewhere_and_no_mode_changes() -> None:
    closed = Path(tempfile.mkdtemp(prefix="fleet-closed-"))  # mode 0700, like a clone in /root
    home = closed / "fleet"
    watched = [closed, *closed.parents, PG_INSTALL, *PG_INSTALL.parents]
    before = _modes(watched)
    services = EmbeddedServices(home)
    try:
        assert stat.S_IMODE(closed.stat().st_mode) == 0o700
        state = services.start()
        assert services.pgdata.is_relative_to(services.server_root)
        assert not services.pgdata.is_relative_to(closed)
        note = services.outside_note()
        assert note is not None and str(services.server_root) in note
        root = services.server_root.stat()
        assert stat.S_IMODE(root.st_mode) == 0o700
        import pwd

        assert root.st_uid == pwd.getpwnam(PG_SYSTEM_USER).pw_uid
        with psycopg.connect(state.database_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pid = services.postgres_pid()
        assert pid is not None and psutil.Process(pid).username() == PG_SYSTEM_USER
        assert redis.Redis.from_url(state.broker_url).ping()
        assert _modes(watched) == before, "a folder's permissions were changed"
    finally:
        services.discard()
        shutil.rmtree(closed, ignore_errors=True)
    assert not services.server_root.exists()
    assert _modes([p for p in watched if p.exists()]) == {
        p: m for p, m in before.items() if p.exists()}


def test_supervised_logs_rotate_at_their_cap(tmp_path: Path) -> None:
    """A chatty process keeps at most cap × (backups + 1) bytes, in whole lines."""
    line = "x" * 99
    chatter = ProcessSpec("chatty", [sys.executable, "-c",
                                     f"import sys\nfor i in range(5000): print({line!r})"])
    supervisor = Supervisor([chatter], tmp_path, dict(os.environ), log_max_bytes=50_000,
                            log_backups=2)
    supervisor.start()
    supervisor.procs["chatty"].wait(timeout=60)
    supervisor.stop()
    logs = sorted(tmp_path.glob("chatty.log*"))
    assert [p.name for p in logs] == ["chatty.log", "chatty.log.1", "chatty.log.2"]
    assert all(p.stat().st_size <= 50_000 for p in logs)
    assert all(p.read_text().splitlines() == [line] * (p.stat().st_size // 100) for p in logs)
    assert (tmp_path / "chatty.log.2").stat().st_size == 50_000  # full files roll over
