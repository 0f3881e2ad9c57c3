"""The fleet behind PgBouncer in transaction pooling mode (Debian's pgbouncer, started here).

A server connection serves other clients between our transactions, so nothing may live
in a session: psycopg's prepared statements (the problem is shown first, then that the
fleet's engine avoids it), the `options` startup parameter (refused: the statement
timeout and UTC are set in each transaction instead), session SETs, session advisory
locks (the beat's lock goes over DATABASE_DIRECT_URL, as do migrations). Then real
workers ingest events and run workflow steps through the pooler.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from db import tenancy
from db.migrate import upgrade
from db.partitions import range_containing, split_default
from db.session import build_engine, session_scope, without_statement_timeout
from tests.fleet_namespace import Fleet, own_fleet
from tests.helpers import ROOT, SERVERS, TRIGGER_CACHE_SECONDS, wait_for, worker_env
from tests.pg_servers import PgBouncer, pgbouncer_binary
from tests.workflow_helpers import deploy
from workers.beat import LOCK_KEY
from workers.broker import delete_prefixed_keys
from workers.producer import send_event
from workers.retention import run_retention

pytestmark = [pytest.mark.servers,
              pytest.mark.skipif(pgbouncer_binary() is None,
                                 reason="pgbouncer is not installed and could not be "
                                        "(apt-get install -y pgbouncer needs root and apt)")]


def _server() -> tuple[str, int]:
    url = make_url(SERVERS.admin_url)
    return url.host or "127.0.0.1", url.port or 5432


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    host, port = _server()
    with PgBouncer(host, port, pool_size=4) as started:
        yield started


def _pooled(url: str, timeout_ms: int = 60_000) -> Engine:
    """The fleet's engine behind the pooler, as FLEET_DB_POOLER=pgbouncer builds it."""
    return build_engine(url, pooler="pgbouncer", statement_timeout_ms=timeout_ms)


def _value(engine: Engine, sql: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar()


# --------------------------------------------------------------------------- the problem


def test_the_pooler_refuses_the_direct_startup_options(bouncer: PgBouncer) -> None:
    """Why FLEET_DB_POOLER exists: the direct engine's `options` cannot pass PgBouncer."""
    direct = build_engine(bouncer.url(SERVERS.database), pooler=None,
                          statement_timeout_ms=60_000)
    with pytest.raises(OperationalError, match="unsupported startup parameter: options"):
        _value(direct, "SELECT 1")
    direct.dispose()


def _prepared_then_moved(engine: Engine) -> None:
    """Client A runs a statement in more transactions than psycopg's threshold (5): psycopg
    prepares it on the server connection it had. Client B then holds that connection in a
    transaction, so A's next run gets another server connection, which never saw it."""
    query = text("SELECT CAST(:i AS int)")
    with engine.connect() as a, engine.connect() as b:
        for i in range(8):
            assert a.execute(query, {"i": i}).scalar() == i
            a.commit()
        b.execute(text("SELECT 1"))  # B's transaction stays open
        assert a.execute(query, {"i": 99}).scalar() == 99
        a.commit()
        b.rollback()


def test_prepared_statements_break_behind_a_transaction_pooler(bouncer: PgBouncer) -> None:
    """psycopg's defaults through PgBouncer 1.18: the statement A prepared is missing."""
    defaults = create_engine(make_url(bouncer.url(SERVERS.database))
                             .set(drivername="postgresql+psycopg"))
    with pytest.raises(DBAPIError, match=r'prepared statement "_pg3_\d+" does not exist'):
        _prepared_then_moved(defaults)
    defaults.dispose()


def test_the_fleet_engine_prepares_nothing_behind_the_pooler(bouncer: PgBouncer) -> None:
    engine = _pooled(bouncer.url(SERVERS.database))
    _prepared_then_moved(engine)
    errors: list[BaseException] = []

    def client(n: int) -> None:  # several clients, many transactions each, shared servers
        try:
            for i in range(40):
                with engine.begin() as conn:
                    assert conn.execute(text("SELECT CAST(:i AS int) + :n /* pooled */"),
                                        {"i": i, "n": n}).scalar() == i + n
                    assert not conn.execute(text(  # (the previous test's may be left there)
                        "SELECT count(*) FROM pg_prepared_statements "
                        "WHERE statement LIKE '%/* pooled */%'")).scalar()
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    assert not errors, errors[0]


# --------------------------------------------------------------------------- session state


def test_each_transaction_sets_the_timeout_and_utc_and_leaves_nothing(
        fresh_database: str, tmp_path: Path) -> None:
    """One server connection (pool_size=1) whose defaults are not the fleet's (a 42 s timeout
    on the database, New York time from the pooler): each fleet transaction gets its own
    timeout and UTC; retention's unbounded COPY and a session without a timeout run in
    it; afterwards the connection still has its defaults, so nothing leaked."""
    name = make_url(fresh_database).database
    upgrade(fresh_database)
    with create_engine(fresh_database, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" SET statement_timeout = \'42s\''))
    host, port = _server()
    with PgBouncer(host, port, databases={
            "one": f"dbname={name} pool_size=1 timezone=America/New_York"}) as single:
        raw_url = single.url("one")

        def defaults() -> tuple[str, str]:
            with psycopg.connect(raw_url, autocommit=True) as raw:
                timeout = raw.execute("SHOW statement_timeout").fetchone()
                zone = raw.execute("SHOW TimeZone").fetchone()
            assert timeout is not None and zone is not None
            return str(timeout[0]), str(zone[0])

        assert defaults() == ("42s", "America/New_York")
        engine = _pooled(raw_url, timeout_ms=1500)
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "1500ms"
            assert conn.execute(text("SHOW TimeZone")).scalar() == "UTC"
            now = conn.execute(text("SELECT now()")).scalar_one()
            assert now.utcoffset() == dt.timedelta(0) and str(now.tzinfo) == "UTC"
            with pytest.raises(DBAPIError, match="statement timeout"):
                conn.execute(text("SELECT pg_sleep(3)"))
        assert defaults() == ("42s", "America/New_York")

        with without_statement_timeout(Session(engine)) as session:
            for _ in range(2):  # every transaction of the session, not just the first
                assert session.execute(text("SHOW statement_timeout")).scalar() == "0"
                session.commit()
        assert defaults() == ("42s", "America/New_York")

        # Retention through the pooler: DETACH (SET LOCAL lock_timeout), the archive's COPY
        # (SET LOCAL statement_timeout = 0), DROP.
        old = dt.datetime.now(dt.UTC) - dt.timedelta(days=800)
        with tenancy.all_workspaces():  # partitions are the owner's (db/tenancy.py)
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO lifecycle_events (event_type, event_data, "
                                  "created_at) VALUES ('old.event', '{}', :c)"), {"c": old})
                split_default(conn, "lifecycle_events")
            report = run_retention(engine, tmp_path)
        assert report.archived == (range_containing("lifecycle_events", old.date()).name,)
        assert defaults() == ("42s", "America/New_York")
        engine.dispose()


# Session state a transaction pooler would carry to another client, or lose.
_SESSION_SQL = {
    "session advisory lock": re.compile(r"pg_(try_)?advisory_lock(_shared)?\s*\(", re.I),
    "LISTEN": re.compile(r"[\"']\s*(UN)?LISTEN\s", re.I),
    "cursor WITH HOLD": re.compile(r"\bWITH\s+HOLD\b", re.I),
    "prepared on purpose": re.compile(r"\bprepare\s*=\s*True|[\"']\s*PREPARE\s", re.I),
    "session set_config": re.compile(r"set_config\s*\([^)]*,\s*false\s*\)", re.I),
    "temporary table kept past commit": re.compile(
        r"CREATE\s+(TEMP|TEMPORARY)\s+TABLE(?![\s\S]{0,200}?ON\s+COMMIT\s+DROP)", re.I),
}
_ALLOWED = {("workers/beat.py", "session advisory lock")}  # DATABASE_DIRECT_URL


def _gucs(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {name.lower() for name in conn.execute(text("SELECT name FROM pg_settings")).scalars()}


def test_no_session_state_outlives_a_transaction(engine: Engine) -> None:
    """A static guard over the code that runs on DATABASE_URL: a SET of a server setting
    without LOCAL, a session advisory lock, LISTEN, a held cursor, a kept temporary table or
    a statement prepared on purpose fails here (the beat's lock has its own connection)."""
    session_set = re.compile(r"[\"']\s*SET\s+(?:SESSION\s+)?([A-Za-z_.]+)\s*(?:=|TO\b)", re.I)
    gucs = _gucs(engine)
    found: list[str] = []
    for path in sorted(p for folder in ("db", "workers", "tasks") for p in (ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        source = path.read_text()
        for match in session_set.finditer(source):
            if match.group(1).lower() in gucs:
                found.append(f"{relative}: session {match.group(0).strip()!r} (use SET LOCAL)")
        for what, pattern in _SESSION_SQL.items():
            if (relative, what) not in _ALLOWED and pattern.search(source):
                found.append(f"{relative}: {what}")
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------- real workers


@pytest.fixture(scope="module")
def pooled_fleet(bouncer: PgBouncer) -> Iterator[Fleet]:
    """Events and workflows workers whose DATABASE_URL is the pooler (DATABASE_DIRECT_URL
    the server itself); this process writes definitions directly."""
    with own_fleet("pgbouncer", "events,workflows", DATABASE_URL=bouncer.url(SERVERS.database),
                   FLEET_DB_POOLER="pgbouncer",
                   DATABASE_DIRECT_URL=SERVERS.database_url) as fleet:
        yield fleet


def _transactions(bouncer: PgBouncer) -> int:
    return sum(int(str(row["total_xact_count"])) for row in bouncer.admin("SHOW STATS")
               if row["database"] == SERVERS.database)


def test_events_are_ingested_and_workflows_stepped_through_the_pooler(
        bouncer: PgBouncer, pooled_fleet: Fleet) -> None:
    event_type = f"pgb.e{uuid.uuid4().hex[:10]}"
    workflow = deploy("batch_linear.bpmn")  # two script tasks: a few steps per execution
    with session_scope() as session:
        session.execute(text(
            "INSERT INTO triggers (name, event_type, conditions, workflow_id) "
            "SELECT :n, :e, CAST(:c AS jsonb), id FROM workflows WHERE name = :w"),
            {"n": f"t-{event_type}", "e": event_type, "w": workflow,
             "c": json.dumps({"field": "event.data.n", "op": "gte", "value": 0})})
    time.sleep(3 * TRIGGER_CACHE_SECONDS)
    before = _transactions(bouncer)
    users = [f"{uuid.uuid4().hex[:10]}@pgbouncer.example" for _ in range(20)]
    sent = [send_event(event_type, user=user, data={"n": i}, via=pooled_fleet.app)
            for i in range(10) for user in users]

    def done() -> bool:
        """Every event ingested; each user's executions (the trigger's re-entry rule decides
        how many) started and completed."""
        with session_scope() as session:
            ingested = session.execute(text(
                "SELECT count(*) FROM lifecycle_events WHERE event_id = ANY(:ids)"),
                {"ids": sent}).scalar_one()
            users_done, unfinished = session.execute(text(
                "SELECT count(DISTINCT x.user_id), count(*) FILTER (WHERE x.status <> 'completed') "
                "FROM workflow_executions x JOIN workflows w ON w.id = x.workflow_id "
                "WHERE w.name = :w"), {"w": workflow}).one()
        return ingested == len(sent) and users_done == len(users) and unfinished == 0
    wait_for(done, timeout=90,
             message="every event ingested and its executions completed, through PgBouncer")
    with session_scope() as session:
        dead = session.execute(text("SELECT count(*) FROM dead_letters WHERE event_id = ANY(:ids)"),
                               {"ids": sent}).scalar_one()
    assert dead == 0
    logs = "".join(worker.log() for worker in pooled_fleet.workers)
    assert "prepared statement" not in logs and "unsupported startup parameter" not in logs
    assert _transactions(bouncer) - before > len(sent) // 10  # the workers' went through it


# --------------------------------------------------------------------------- direct URLs


def _beat(tmp_path: Path, name: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat", "--loglevel",
             "INFO", "--schedule", str(tmp_path / f"{name}-schedule")],
            stdout=out, stderr=subprocess.STDOUT, env=worker_env(**env), cwd=ROOT)
    return proc, log


@contextlib.contextmanager
def _running(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def _lock_holder(engine: Engine) -> tuple[str, int] | None:
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT a.application_name, a.client_port FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) = :k"), {"k": LOCK_KEY}).first()
    return None if row is None else (str(row[0]), int(row[1]))


def test_the_beat_leads_on_its_direct_connection(bouncer: PgBouncer, engine: Engine,
                                                 tmp_path: Path) -> None:
    prefix = f"fleet-test-pgb-beat-{uuid.uuid4().hex[:6]}:"
    env = {"DATABASE_URL": bouncer.url(SERVERS.database), "FLEET_DB_POOLER": "pgbouncer",
           "FLEET_BROKER_KEY_PREFIX": prefix}
    try:
        refused, refused_log = _beat(tmp_path, "no-direct", **env)
        with _running(refused):
            assert refused.wait(timeout=60) != 0
        assert "needs DATABASE_DIRECT_URL" in refused_log.read_text()

        env["DATABASE_DIRECT_URL"] = SERVERS.database_url
        (first, first_log), (second, second_log) = (_beat(tmp_path, "a", **env),
                                                   _beat(tmp_path, "b", **env))
        with _running(first, second):
            wait_for(lambda: "beat.lock_acquired" in first_log.read_text() + second_log.read_text()
                     and "beat.standby" in first_log.read_text() + second_log.read_text(),
                     timeout=60, message="one beat to lead and the other to stand by")
            holder = wait_for(lambda: _lock_holder(engine), message="the lock's holder")
            assert holder is not None
            pooled_ports = {int(str(s["local_port"])) for s in bouncer.admin("SHOW SERVERS")}
            assert holder[0] == "lifecycle-fleet-beat" and holder[1] not in pooled_ports
    finally:
        delete_prefixed_keys(SERVERS.broker_url, prefix)


def test_migrations_use_the_direct_url(fresh_database: str) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:9/nowhere"  # nothing listens on port 9
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "migrate"], capture_output=True, text=True,
        timeout=120, cwd=ROOT, env=worker_env(
            DATABASE_URL=unreachable, FLEET_DB_POOLER="pgbouncer",
            DATABASE_DIRECT_URL=fresh_database.replace("postgresql+psycopg://", "postgresql://")))
    assert done.returncode == 0, done.stderr
    with create_engine(fresh_database).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
