"""Least-privilege roles: the app role writes rows, only the migrator changes the schema.

Every check logs in as the role itself (a real connection), on a scratch database of
its own. Roles are cluster-wide, so each test names its roles uniquely and drops
them at the end, after the database that holds their objects and grants.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from db.admin import create_database, drop_database
from db.config import to_sqlalchemy_url
from db.migrate import upgrade
from db.models import DEFAULT_WORKSPACE_ID
from db.partitions import ensure_partitions_ahead
from db.roles import drop_roles, ensure_roles, roles_sql
from tests.helpers import SERVERS

pytestmark = pytest.mark.servers

INSUFFICIENT_PRIVILEGE = "42501"


@dataclass
class Scratch:
    name: str
    admin_url: str  # superuser, on the scratch database
    app: str
    migrator: str
    password: str

    def url_as(self, role: str) -> str:
        url = make_url(to_sqlalchemy_url(self.admin_url))
        return url.set(username=role, password=self.password).render_as_string(hide_password=False)

    @contextmanager
    def connect(self, role: str | None = None) -> Iterator[Connection]:
        engine = create_engine(self.url_as(role) if role else to_sqlalchemy_url(self.admin_url))
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()


@pytest.fixture()
def scratch() -> Iterator[Scratch]:
    tag = uuid.uuid4().hex[:10]
    name = f"fleet_roles_{tag}"
    url = create_database(SERVERS.admin_url, name)
    db = Scratch(name=name, admin_url=url, app=f"fleet_app_t{tag}", migrator=f"fleet_mig_t{tag}",
                 password=uuid.uuid4().hex)
    try:
        yield db
    finally:
        drop_database(SERVERS.admin_url, name)
        engine = create_engine(to_sqlalchemy_url(SERVERS.admin_url))
        try:
            with engine.connect() as conn:
                drop_roles(conn, db.app, db.migrator)
        finally:
            engine.dispose()


def _ensure(db: Scratch) -> None:
    with db.connect() as conn:
        ensure_roles(conn, db.app, db.migrator, app_password=db.password,
                     migrator_password=db.password)


def _refused(conn: Connection, sql: str) -> None:
    """`sql` fails for lack of privilege (and the connection stays usable)."""
    with pytest.raises(DBAPIError) as info:
        with conn.begin_nested():
            conn.execute(text(sql))
    assert info.value.orig is not None
    assert info.value.orig.sqlstate == INSUFFICIENT_PRIVILEGE, f"{sql}: {info.value.orig}"


def _in_default_workspace(conn: Connection) -> None:
    """Row-level security binds the app role: its rows are a workspace's (db/tenancy.py)."""
    conn.execute(text("SELECT set_config('app.current_tenant_id', :w, false)"),
                 {"w": str(DEFAULT_WORKSPACE_ID)})


def _only_the_migrator_sees_every_workspace(db: Scratch) -> None:
    """Row-level security: the owner (migrations, partition maintenance) sees every
    workspace's rows; the application role, one workspace's, even unfiltered."""
    with db.connect(db.migrator) as conn:
        other = conn.execute(text(
            "INSERT INTO workspaces (name) VALUES ('roles-other') RETURNING id")).scalar_one()
        for workspace in (DEFAULT_WORKSPACE_ID, other):
            conn.execute(text(
                "INSERT INTO users (email, current_lifecycle_stage, workspace_id) "
                "VALUES ('same@example.com', 'Acquisition', :w)"), {"w": workspace})
        conn.commit()
        assert conn.execute(text(
            "SELECT count(DISTINCT workspace_id) FROM users WHERE email = 'same@example.com'"
        )).scalar() == 2
    with db.connect(db.app) as conn:
        _in_default_workspace(conn)
        assert set(conn.execute(text("SELECT DISTINCT workspace_id FROM users")).scalars()) \
            == {DEFAULT_WORKSPACE_ID}


def _app_writes_rows(db: Scratch) -> None:
    """As the app role: INSERT/SELECT/UPDATE/DELETE, a partitioned table, sequences."""
    with db.connect(db.app) as conn:
        assert conn.execute(text("SELECT current_user")).scalar() == db.app
        _in_default_workspace(conn)
        user_id = conn.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage) VALUES (:e, 'Acquisition') "
            "RETURNING id"), {"e": f"{uuid.uuid4().hex}@example.com"}).scalar()
        conn.execute(text("UPDATE users SET attributes = '{\"plan\": \"pro\"}' WHERE id = :u"),
                     {"u": user_id})
        # lifecycle_events is partitioned and takes its id from a sequence.
        now = dt.datetime.now(dt.UTC)
        for created in (now, now - dt.timedelta(days=40), dt.datetime(1999, 1, 1, tzinfo=dt.UTC)):
            conn.execute(text(
                "INSERT INTO lifecycle_events (event_type, user_id, lifecycle_stage, event_data, "
                "created_at) VALUES ('user.signed_up', :u, 'Acquisition', '{}', :c)"),
                {"u": user_id, "c": created})
        conn.execute(text(
            "INSERT INTO metrics_daily (metric_date, lifecycle_stage, metric_name, metric_value) "
            "VALUES (CURRENT_DATE, 'Acquisition', 'signups', 1)"))
        assert conn.execute(text("SELECT count(*) FROM lifecycle_events WHERE user_id = :u"),
                            {"u": user_id}).scalar() == 3
        assert conn.execute(text(
            "SELECT count(DISTINCT tableoid) FROM lifecycle_events WHERE user_id = :u"),
            {"u": user_id}).scalar() >= 2  # rows landed in more than one partition
        conn.execute(text("DELETE FROM metrics_daily WHERE metric_name = 'signups'"))
        # A SQL function of the schema (from migration 0002) may be called.
        assert conn.execute(text("SELECT fleet_try_timestamptz('nonsense')")).scalar() is None
        conn.commit()


def _app_cannot_change_schema(db: Scratch) -> None:
    with db.connect(db.app) as conn:
        partition = conn.execute(text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'lifecycle_events'::regclass ORDER BY 1 LIMIT 1")).scalar()
        for sql in (
            "ALTER TABLE users ADD COLUMN hacked integer",
            "ALTER TABLE lifecycle_events ALTER COLUMN event_type TYPE text",
            "CREATE TABLE intruder (id integer)",
            "CREATE INDEX idx_intruder ON users (updated_at)",
            "CREATE TABLE lifecycle_events_2199_01 PARTITION OF lifecycle_events "
            "FOR VALUES FROM ('2199-01-01') TO ('2199-02-01')",
            f"ALTER TABLE lifecycle_events DETACH PARTITION {partition}",
            f"DROP TABLE {partition}",
            "DROP TABLE users",
            "DROP TABLE lifecycle_events",
            "TRUNCATE users CASCADE",
            "CREATE FUNCTION intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "DROP FUNCTION fleet_try_timestamptz(text)",
            f'SET ROLE "{db.migrator}"',
        ):
            _refused(conn, sql)
        conn.rollback()


def _everything_owned_by(db: Scratch, role: str) -> None:
    with db.connect() as conn:
        others = conn.execute(text(
            "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c "
            "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'S', 'v') "
            "AND c.relowner <> CAST(:r AS regrole)"), {"r": role}).all()
        assert others == []
        functions = conn.execute(text(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
            "AND proowner <> CAST(:r AS regrole)"), {"r": role}).all()
        assert functions == []
        assert conn.execute(text(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'"
        )).scalar() == role


def test_migrations_run_as_the_migrator_and_the_app_role_only_touches_rows(
    scratch: Scratch,
) -> None:
    _ensure(scratch)  # roles first, on an empty database: the production order
    upgrade(scratch.url_as(scratch.migrator))  # `fleet migrate` with the migrator's URL
    _everything_owned_by(scratch, scratch.migrator)
    _app_writes_rows(scratch)
    _app_cannot_change_schema(scratch)
    _only_the_migrator_sees_every_workspace(scratch)

    # Default privileges: a table a later migration creates is usable by the app at once,
    # and so is a partition that maintenance (running as the migrator) creates.
    with scratch.connect(scratch.migrator) as conn:
        conn.execute(text("CREATE TABLE future_things (id bigserial PRIMARY KEY, note text)"))
        created = ensure_partitions_ahead(conn, dt.date(2150, 1, 1))
        conn.commit()
        assert created
    with scratch.connect(scratch.app) as conn:
        _in_default_workspace(conn)
        conn.execute(text("INSERT INTO future_things (note) VALUES ('hello')"))
        assert conn.execute(text("SELECT note FROM future_things")).scalar() == "hello"
        assert conn.execute(text("SELECT count(*) FROM lifecycle_events_2150_01")).scalar() == 0
        conn.commit()
        _refused(conn, "ALTER TABLE future_things ADD COLUMN hacked integer")
        _refused(conn, "DROP TABLE future_things")


def test_ensure_roles_takes_over_a_database_migrated_by_another_role(scratch: Scratch) -> None:
    upgrade(to_sqlalchemy_url(scratch.admin_url))  # migrated as the superuser, as before roles
    _ensure(scratch)
    _ensure(scratch)  # idempotent
    _everything_owned_by(scratch, scratch.migrator)
    _app_writes_rows(scratch)
    _app_cannot_change_schema(scratch)
    # The migrator can now change the schema (it owns every table and partition).
    with scratch.connect(scratch.migrator) as conn:
        conn.execute(text("ALTER TABLE users ADD COLUMN scratch_column integer"))
        conn.execute(text("ALTER TABLE users DROP COLUMN scratch_column"))
        conn.commit()


def test_role_names_are_checked() -> None:
    with pytest.raises(ValueError):
        roles_sql('app"; DROP TABLE users; --', "fleet_migrator")
    with pytest.raises(ValueError):
        roles_sql("same", "same")
