"""Workspaces are kept apart by PostgreSQL (row-level security), not by the fleet's code.

Two workspaces get the same data through the fleet's own paths (a real worker ingesting
producers' events, deployed workflows and triggers, executions stepped to the end).
Then a real login as the application role `fleet_app` runs deliberately unfiltered
SELECT, UPDATE and DELETE statements on every table with a policy, inside workspace A:
it sees and changes A's rows only. Without a tenant it sees nothing and writes
nothing. The owner (the migrator, here the superuser) sees both, as migrations and
partition maintenance must. And the fleet itself fails closed: a transaction begun
without a workspace raises, a message naming an unknown workspace is dead-lettered.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from db import tenancy
from db.models import DEFAULT_WORKSPACE_ID
from db.session import session_scope
from tests.helpers import SERVERS, TRIGGER_CACHE_SECONDS, WorkerProcess, wait_for
from tests.workflow_helpers import BPMN
from workers import workspaces
from workers.definitions import deploy_workflow
from workers.producer import send_event

pytestmark = pytest.mark.servers

# Tables without workspace rows, and why: everything else must have `workspace_id` and
# the policy (checked against the live schema, so a new table cannot be forgotten).
GLOBAL_TABLES = {
    "alembic_version": "Alembic's own",
    "workspaces": "the workspaces themselves (names and ids, read by every transaction)",
    "task_redeliveries": "Celery task ids, global",
    "maintenance_runs": "the nightly jobs' days (per-workspace jobs carry their id in `job`)",
}


def _tables(conn: Connection) -> dict[str, tuple[bool, bool, bool]]:
    """Every table of the schema (partitions included): (has workspace_id, RLS on, policy)."""
    rows = conn.execute(text(
        "SELECT c.relname, "
        "  EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid "
        "          AND a.attname = 'workspace_id' AND NOT a.attisdropped), "
        "  c.relrowsecurity, "
        "  EXISTS (SELECT 1 FROM pg_policies p WHERE p.schemaname = 'public' "
        "          AND p.tablename = c.relname AND p.policyname = :p) "
        "FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace "
        "AND c.relkind IN ('r', 'p')"), {"p": tenancy.POLICY})
    return {name: (has, rls, policy) for name, has, rls, policy in rows}


def test_every_table_but_the_global_ones_is_a_workspace_table_under_the_policy(
        engine: Engine) -> None:
    with engine.connect() as conn:
        tables = _tables(conn)
    assert set(GLOBAL_TABLES) <= set(tables)
    unsecured = {name: state for name, state in tables.items()
                 if name not in GLOBAL_TABLES and state != (True, True, True)}
    assert not unsecured, ("tables without workspace_id, row-level security or the "
                           f"{tenancy.POLICY} policy: {unsecured}")
    assert not any(tables[name][0] for name in GLOBAL_TABLES)


# --------------------------------------------------------------------------- the data


@pytest.fixture(scope="module")
def app_login(engine: Engine) -> Iterator[Engine]:
    """An engine that logs in as `fleet_app` itself (trust auth on the test server)."""
    with engine.begin() as conn:
        conn.execute(text(f'ALTER ROLE "{tenancy.APP_ROLE}" LOGIN'))
        conn.execute(text(f'GRANT CONNECT ON DATABASE "{SERVERS.database}" '
                          f'TO "{tenancy.APP_ROLE}"'))
    url = make_url(engine.url).set(username=tenancy.APP_ROLE, password=None)
    login = create_engine(url)
    with login.connect() as conn:
        assert conn.execute(text("SELECT session_user")).scalar() == tenancy.APP_ROLE
    yield login
    login.dispose()


class Workspaces:
    def __init__(self, a: uuid.UUID, b: uuid.UUID, a_name: str, b_name: str,
                 email: str, event_type: str) -> None:
        self.a, self.b, self.a_name, self.b_name = a, b, a_name, b_name
        self.email, self.event_type = email, event_type


def _deploy(workspace_id: uuid.UUID, event_type: str) -> None:
    """The same workflow and trigger in a workspace, as `fleet apply` would store them."""
    with tenancy.workspace(workspace_id), session_scope() as session:
        deploy_workflow(session, "isolation-flow", (BPMN / "minimal.bpmn").read_text(),
                        stages=[], activate=True)
        workflow_id = session.execute(text(
            "SELECT id FROM workflows WHERE name = 'isolation-flow'")).scalar_one()
        session.execute(text(
            "INSERT INTO triggers (name, event_type, conditions, workflow_id) "
            "VALUES ('isolation-trigger', :t, '{}', :w)"), {"t": event_type, "w": workflow_id})


@pytest.fixture(scope="module")
def two(engine: Engine, celery_worker: WorkerProcess) -> Workspaces:
    """Workspaces A and B holding the same names: a user with one email, a workflow and a
    trigger each, an execution run to its end each, and an event only B's trigger sees."""
    tag = uuid.uuid4().hex[:8]
    a_name, b_name = f"iso-a-{tag}", f"iso-b-{tag}"
    with tenancy.all_workspaces(), session_scope() as session:
        a, _ = workspaces.create(session, a_name)
        b, _ = workspaces.create(session, b_name)
    event_type = f"iso.e{tag}"
    _deploy(a, event_type)
    _deploy(b, event_type)
    time.sleep(TRIGGER_CACHE_SECONDS + 0.2)
    email = f"same-{tag}@example.com"  # one email, two users: users.email is per workspace
    ids = [send_event(event_type, user=email, data={"n": i}, workspace=name)
           for i, name in enumerate((a_name, b_name))]
    wait_for(lambda: _by_workspace(engine, "workflow_executions", "status = 'completed'")
             .keys() >= {a, b}, timeout=60, message="an execution in each workspace to end")
    assert _by_workspace(engine, "lifecycle_events", f"event_id IN ('{ids[0]}', '{ids[1]}')") \
        == {a: 1, b: 1}
    return Workspaces(a, b, a_name, b_name, email, event_type)


def _by_workspace(engine: Engine, table: str, where: str = "true") -> dict[uuid.UUID, int]:
    """As the owner (who sees every workspace): the table's rows per workspace."""
    with engine.connect() as conn:
        return {w: n for w, n in conn.execute(text(
            f"SELECT workspace_id, count(*) FROM {table} WHERE {where} GROUP BY 1"))}


def test_the_pipeline_keeps_each_workspaces_rows_in_it(engine: Engine, two: Workspaces) -> None:
    users = _by_workspace(engine, "users", f"email = '{two.email}'")
    assert users == {two.a: 1, two.b: 1}
    for table in ("workflows", "triggers", "trigger_executions", "execution_steps",
                  "event_inbox"):
        counts = _by_workspace(engine, table)
        assert counts.get(two.a) and counts.get(two.b), (table, counts)
    # Each execution belongs to its workspace's user, workflow and trigger.
    with engine.connect() as conn:
        crossed = conn.execute(text(
            "SELECT count(*) FROM workflow_executions e "
            "JOIN users u ON u.id = e.user_id JOIN workflows w ON w.id = e.workflow_id "
            "WHERE e.workspace_id IN (:a, :b) AND (u.workspace_id <> e.workspace_id "
            "OR w.workspace_id <> e.workspace_id)"), {"a": two.a, "b": two.b}).scalar()
    assert crossed == 0
    # Each evaluation is of its own workspace's trigger (the trigger cache is per workspace).
    with engine.connect() as conn:
        crossed = conn.execute(text(
            "SELECT count(*) FROM trigger_executions e JOIN triggers t ON t.id = e.trigger_id "
            "WHERE e.workspace_id IN (:a, :b) AND t.workspace_id <> e.workspace_id"),
            {"a": two.a, "b": two.b}).scalar()
    assert crossed == 0


def test_the_nightly_metrics_are_computed_in_each_workspace(engine: Engine,
                                                            two: Workspaces) -> None:
    """The sweep runs once per workspace: each workspace's day counts its own users only."""
    import datetime as dt

    from tasks.maintenance import metrics_daily

    today = dt.datetime.now(dt.UTC).date()
    metrics_daily(day=str(today))  # the task's own body and scope, in this process
    for workspace_id in (two.a, two.b, DEFAULT_WORKSPACE_ID):
        with engine.connect() as conn:
            counted = conn.execute(text(
                "SELECT coalesce(sum(metric_value), 0) FROM metrics_daily WHERE workspace_id = :w "
                "AND metric_date = :d AND metric_name = 'users_in_stage'"),
                {"w": workspace_id, "d": today}).scalar()
            users = conn.execute(text("SELECT count(*) FROM users WHERE workspace_id = :w"),
                                 {"w": workspace_id}).scalar()
        assert counted == users, workspace_id


# --------------------------------------------------------------------------- as fleet_app


def _secured_tables(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(name for name, state in _tables(conn).items() if state == (True, True, True))


def _in(conn: Connection, workspace_id: uuid.UUID | None) -> None:
    if workspace_id is not None:
        conn.execute(text("SELECT set_config(:s, :w, true)"),
                     {"s": tenancy.SETTING, "w": str(workspace_id)})


def test_unfiltered_reads_as_the_app_role_see_only_the_tenants_rows(
        engine: Engine, app_login: Engine, two: Workspaces) -> None:
    tables = _secured_tables(engine)
    seen_b = False
    for table in tables:
        expected = _by_workspace(engine, table)
        with app_login.begin() as conn:
            _in(conn, two.a)
            rows = conn.execute(text(f"SELECT workspace_id, count(*) FROM {table} GROUP BY 1"))
            assert dict(rows.all()) == ({two.a: expected[two.a]} if two.a in expected else {}), \
                table
        seen_b = seen_b or two.b in expected
    assert seen_b  # B had rows to hide


def test_unfiltered_writes_as_the_app_role_change_only_the_tenants_rows(
        engine: Engine, app_login: Engine, two: Workspaces) -> None:
    before = _by_workspace(engine, "users")
    with app_login.connect() as conn:
        trans = conn.begin()
        _in(conn, two.a)
        updated = conn.execute(text("UPDATE users SET attributes = '{\"hacked\": true}'")).rowcount
        deleted_steps = conn.execute(text("DELETE FROM execution_steps")).rowcount
        assert updated == before[two.a]
        assert deleted_steps == _by_workspace(engine, "execution_steps")[two.a]
        # Whatever the other workspaces hold is untouched, seen from the owner mid-transaction.
        with engine.connect() as owner:
            assert owner.execute(text(
                "SELECT count(*) FROM users WHERE workspace_id <> :a AND attributes ? 'hacked'"),
                {"a": two.a}).scalar() == 0
        trans.rollback()


def test_the_app_role_cannot_write_into_or_move_rows_to_another_workspace(
        app_login: Engine, two: Workspaces) -> None:
    statements = [
        ("INSERT INTO users (email, current_lifecycle_stage, workspace_id) "
         "VALUES ('x@example.com', 'Acquisition', :b)"),
        "UPDATE users SET workspace_id = :b",
        ("INSERT INTO dead_letters (source, reason, raw_payload, workspace_id) "
         "VALUES ('t', 'r', '\\x00', :b)"),
    ]
    for statement in statements:
        with app_login.connect() as conn, conn.begin():
            _in(conn, two.a)
            with pytest.raises(DBAPIError, match="row-level security"):
                conn.execute(text(statement), {"b": two.b})


def test_without_a_tenant_the_app_role_sees_and_writes_nothing(
        engine: Engine, app_login: Engine, two: Workspaces) -> None:
    with app_login.connect() as conn:
        for table in _secured_tables(engine):
            with conn.begin():
                assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0, table
        with conn.begin(), pytest.raises(DBAPIError, match="row-level security"):
            conn.execute(text("INSERT INTO users (email, current_lifecycle_stage) "
                              "VALUES ('nobody@example.com', 'Acquisition')"))


def test_a_partition_named_directly_is_bound_too(engine: Engine, app_login: Engine,
                                                 two: Workspaces) -> None:
    with engine.connect() as conn:
        partition = conn.execute(text(
            "SELECT tableoid::regclass::text FROM lifecycle_events WHERE workspace_id = :b "
            "LIMIT 1"), {"b": two.b}).scalar_one()
    with app_login.begin() as conn:
        _in(conn, two.a)
        assert conn.execute(text(
            f"SELECT count(*) FROM {partition} WHERE workspace_id = :b"), {"b": two.b}
        ).scalar() == 0


def test_the_owner_sees_every_workspace(engine: Engine, two: Workspaces) -> None:
    """Migrations and partition maintenance run as the owner: nothing is hidden from it,
    and the fleet's own all-workspace scope is the owner's view."""
    assert _by_workspace(engine, "users", f"email = '{two.email}'") == {two.a: 1, two.b: 1}
    with tenancy.all_workspaces(), session_scope() as session:
        assert session.execute(text("SELECT count(DISTINCT workspace_id) FROM users "
                                    "WHERE email = :e"), {"e": two.email}).scalar() == 2


def test_the_fleets_own_sessions_are_bound_by_the_workspace(two: Workspaces) -> None:
    """The fleet's transactions take the application role: even a superuser login's."""
    for workspace_id in (two.a, two.b):
        with tenancy.workspace(workspace_id), session_scope() as session:
            assert session.execute(text("SELECT current_user")).scalar() == tenancy.APP_ROLE
            assert set(session.execute(text("SELECT DISTINCT workspace_id FROM users"))
                       .scalars()) == {workspace_id}


# --------------------------------------------------------------------------- fail closed


def test_a_transaction_without_a_workspace_fails_closed() -> None:
    tenancy.set_fallback(None)
    try:
        with pytest.raises(tenancy.NoWorkspace), session_scope() as session:
            session.execute(text("SELECT count(*) FROM users"))
    finally:
        tenancy.set_fallback(DEFAULT_WORKSPACE_ID)


def test_an_event_for_an_unknown_workspace_is_dead_lettered(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    name = f"nowhere-{uuid.uuid4().hex[:8]}"
    event_id = send_event("user.signed_up", user=f"{name}@example.com", workspace=name)

    def letter() -> Any:
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT reason, workspace_id FROM dead_letters WHERE event_id = :e"),
                {"e": event_id}).one_or_none()

    reason, workspace_id = wait_for(letter, message="the dead letter")
    assert f"no workspace named '{name}'" in reason
    assert workspace_id == DEFAULT_WORKSPACE_ID  # the installation's own


def test_a_step_with_a_malformed_workspace_header_is_dead_lettered(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    from workers.celery_app import app
    from workers.queues import WORKFLOWS, TaskNames

    execution_id = uuid.uuid4()
    app.send_task(TaskNames.STEP, args=[str(execution_id), 0], queue=WORKFLOWS,
                  headers={tenancy.HEADER: "not-a-uuid"})

    def letter() -> Any:
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT reason FROM dead_letters WHERE raw_payload LIKE :p"),
                {"p": f"%{execution_id}%".encode()}).scalar()

    assert "is not a workspace id" in wait_for(letter, message="the dead letter")


def test_an_envelope_workspace_must_be_a_name() -> None:
    from workers.events.envelope import InvalidEvent, parse_event

    for bad in ("", "UPPER", "a" * 64, "-dash", "sp ace", 7, ["x"]):
        with pytest.raises(InvalidEvent, match="workspace"):
            parse_event(json.dumps({"event_type": "user.x", "user": "a@example.com",
                                    "workspace": bad}))


def test_a_buffer_of_two_workspaces_steps_runs_each_step_in_its_own_workspace(
        two: Workspaces) -> None:
    """One transaction for the buffer, the tenant switched per group: each execution is
    found and stepped in its own workspace; a step whose header names the other
    workspace finds nothing there (it is not stepped, and not another workspace's)."""
    from celery_batches import SimpleRequest

    from tests.workflow_helpers import deploy
    from workers.engine import batch, control
    from workers.queues import TaskNames

    def start(workspace_id: uuid.UUID) -> uuid.UUID:
        with tenancy.workspace(workspace_id):
            workflow = deploy("batch_linear.bpmn")
            with session_scope() as session:
                user_id = session.execute(text(
                    "INSERT INTO users (email, current_lifecycle_stage) VALUES (:e, "
                    "'Acquisition') RETURNING id"),
                    {"e": f"buf-{uuid.uuid4().hex[:8]}@example.com"}).scalar_one()
                return control.start(session, workflow, user_id, {})

    def request(execution_id: uuid.UUID, workspace_id: uuid.UUID) -> SimpleRequest:
        return SimpleRequest(id=str(uuid.uuid4()), name=TaskNames.STEP,
                             args=(str(execution_id), 0), kwargs={}, delivery_info={},
                             hostname="test@localhost", ignore_result=True, reply_to=None,
                             correlation_id=None,
                             request_dict={"retries": 0, tenancy.HEADER: str(workspace_id)})

    in_a, in_b, b_sent_as_a = start(two.a), start(two.b), start(two.b)
    report = batch.run([request(in_a, two.a), request(in_b, two.b),
                        request(b_sent_as_a, two.a)])
    # batch_linear runs start to end in one step; the execution A cannot see is a no-op.
    assert report.outcomes == {"completed": 2, "noop": 1} and not report.split, report

    def seq(execution_id: uuid.UUID, workspace_id: uuid.UUID) -> int:
        with tenancy.workspace(workspace_id), session_scope() as session:
            return session.execute(text(
                "SELECT count(*) FROM execution_steps WHERE execution_id = :e"),
                {"e": execution_id}).scalar_one()

    assert seq(in_a, two.a) >= 1 and seq(in_b, two.b) >= 1
    assert seq(b_sent_as_a, two.b) == 0  # workspace A could not see it, so nothing ran
