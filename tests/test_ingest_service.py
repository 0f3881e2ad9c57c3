"""The ingest service called directly: a real session on the test database, a fixed clock.

No broker and no worker: each test calls `ingest()` in a transaction that is rolled
back afterwards, and reads the rows it wrote in that same transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from tests.workflow_helpers import BPMN
from workers.definitions import deploy_workflow
from workers.events.ingest import IngestResult, ingest
from workers.rules.triggers import TriggerCache

pytestmark = pytest.mark.servers

NOW = dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.UTC)


@pytest.fixture()
def session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction is rolled back after the test: nothing it wrote stays."""
    with Session(engine) as session:
        yield session
        session.rollback()


def _ingest(session: Session, raws: list[Any], now: dt.datetime = NOW) -> IngestResult:
    # Definitions are re-read on every call: the tests write them in the same transaction.
    return ingest(session, raws, source="test", triggers=TriggerCache(refresh_seconds=0), now=now)


def _one(session: Session, sql: str, **params: Any) -> Any:
    return session.execute(text(sql), params).scalar()


def _rows(session: Session, sql: str, **params: Any) -> list[Any]:
    return list(session.execute(text(sql), params).mappings())


def _etype() -> str:
    return f"test.s{uuid.uuid4().hex[:12]}"


def _email() -> str:
    return f"{uuid.uuid4().hex[:10]}@example.com"


def _event(etype: str, user: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "event_type": etype, "user": user, **fields}


def _user(session: Session, attributes: dict[str, Any] | None = None) -> tuple[uuid.UUID, str]:
    email = _email()
    user_id = session.execute(text(
        "INSERT INTO users (email, current_lifecycle_stage, attributes) "
        "VALUES (:e, 'Activation', CAST(:a AS jsonb)) RETURNING id"),
        {"e": email, "a": json.dumps(attributes or {})}).scalar_one()
    return user_id, email


def _workflow(session: Session) -> uuid.UUID:
    """An active workflow (its executions would wait for a message; no worker runs them here)."""
    name = f"wf-{uuid.uuid4().hex[:8]}"
    deploy_workflow(session, name, (BPMN / "wait_for_message.bpmn").read_text(), stages=[],
                    activate=True)
    return _one(session, "SELECT id FROM workflows WHERE name = :n", n=name)


def _trigger(session: Session, etype: str, conditions: dict[str, Any],
             workflow_id: uuid.UUID | None = None, **rules: Any) -> uuid.UUID:
    columns = {"name": f"t-{uuid.uuid4()}", "event_type": etype,
               "conditions": json.dumps(conditions), "workflow_id": workflow_id, **rules}
    return session.execute(text(
        f"INSERT INTO triggers ({', '.join(columns)}) VALUES "
        f"({', '.join(':' + c for c in columns)}) RETURNING id"), columns).scalar_one()


def _audit_rows(session: Session, event_id: str) -> list[Any]:
    return _rows(session, "SELECT * FROM lifecycle_events WHERE event_id = :e", e=event_id)


def _dead_letters(session: Session, event_id: str) -> list[Any]:
    return _rows(session, "SELECT reason, error_type, source FROM dead_letters WHERE event_id = :e",
                 e=event_id)


def test_an_unknown_email_creates_the_user_in_acquisition(session: Session) -> None:
    email = _email()
    event = _event(_etype(), email.upper(), data={"plan": "free"})
    result = _ingest(session, [event])
    assert (result.accepted, result.rejected, result.duplicates) == (1, 0, 0)
    [user] = _rows(session, "SELECT id, current_lifecycle_stage FROM users WHERE email = :m",
                   m=email)
    assert user["current_lifecycle_stage"] == "Acquisition"
    [audit] = _audit_rows(session, event["event_id"])
    assert (audit["user_id"], audit["lifecycle_stage"]) == (user["id"], "Acquisition")
    assert audit["event_data"] == {"plan": "free"}


def test_an_existing_user_is_named_by_id(session: Session) -> None:
    user_id, email = _user(session)
    users_before = _one(session, "SELECT count(*) FROM users")
    event = _event(_etype(), str(user_id))
    assert _ingest(session, [event]).accepted == 1
    [audit] = _audit_rows(session, event["event_id"])
    assert (audit["user_id"], audit["lifecycle_stage"]) == (user_id, "Activation")
    assert _one(session, "SELECT count(*) FROM users") == users_before


def test_an_unknown_user_id_is_dead_lettered(session: Session) -> None:
    event = _event(_etype(), str(uuid.uuid4()))
    result = _ingest(session, [event])
    assert (result.accepted, result.rejected) == (0, 1)
    [letter] = _dead_letters(session, event["event_id"])
    assert "no user with id" in letter["reason"] and letter["source"] == "test"
    assert _audit_rows(session, event["event_id"]) == []


def test_a_repeated_event_id_is_recorded_once(session: Session) -> None:
    email = _email()
    event = _event(_etype(), email, data={"n": 1})
    assert _ingest(session, [event, event]) == IngestResult(accepted=1, duplicates=1)
    assert _ingest(session, [event]) == IngestResult(duplicates=1)
    assert len(_audit_rows(session, event["event_id"])) == 1
    # The same id with other content is no duplicate: it is dead-lettered, creating no user.
    other = _email()
    assert _ingest(session, [dict(event, user=other)]) == IngestResult(rejected=1)
    [letter] = _dead_letters(session, event["event_id"])
    assert letter["error_type"] == "DuplicateEventId"
    assert _one(session, "SELECT count(*) FROM users WHERE email = :m", m=other) == 0


def test_identify_merges_attributes_and_removes_nulls(session: Session) -> None:
    user_id, email = _user(session, {"plan": "free", "country": "NZ", "kept": 1})
    result = _ingest(session, [_event("user.identify", email,
                                      data={"plan": "pro", "country": None})])
    assert result.accepted == 1
    assert _one(session, "SELECT attributes FROM users WHERE id = :i", i=user_id) == \
        {"plan": "pro", "kept": 1}


def test_a_matching_trigger_starts_an_execution(session: Session) -> None:
    etype, workflow_id = _etype(), _workflow(session)
    match = _trigger(session, etype, {"field": "event.data.plan", "op": "eq", "value": "pro"},
                     workflow_id)
    miss = _trigger(session, etype, {"field": "event.data.plan", "op": "eq", "value": "free"},
                    workflow_id)
    event = _event(etype, _email(), data={"plan": "pro"})
    result = _ingest(session, [event])
    assert (result.evaluated, result.matched, len(result.started)) == (2, 1, 1)
    [execution] = _rows(session, "SELECT * FROM workflow_executions WHERE source_event_id = :e",
                        e=event["event_id"])
    assert execution["id"] == result.started[0]
    assert (execution["status"], execution["workflow_id"], execution["trigger_id"]) == \
        ("pending", workflow_id, match)
    assert execution["step_enqueued_at"] == NOW  # its first step is sent after the commit
    assert execution["variables"]["event"]["data"] == {"plan": "pro"}
    logged = {r["trigger_id"]: r for r in _rows(
        session, "SELECT * FROM trigger_executions WHERE event_id = :e", e=event["event_id"])}
    assert logged.keys() == {match, miss}
    assert logged[match]["condition_met"] and logged[match]["workflow_execution_id"] == execution["id"]
    assert not logged[miss]["condition_met"] and logged[miss]["workflow_execution_id"] is None


def test_a_trigger_maps_event_and_user_values_into_start_variables(session: Session) -> None:
    etype, workflow_id = _etype(), _workflow(session)
    _trigger(session, etype, {}, workflow_id, start_variables=json.dumps({
        "order_id": "event.data.order.id", "plan": "user.attributes.plan",
        "kind": "event.event_type", "email": "user.email",
        "coupon": "event.data.coupon",  # not in the event: None
        "deep": "event.data.order.id.more"}))  # below a value that is no object: None
    _, email = _user(session, {"plan": "pro"})
    event = _event(etype, email, data={"order": {"id": 42}})
    assert len(_ingest(session, [event]).started) == 1
    variables = _one(session, "SELECT variables FROM workflow_executions WHERE source_event_id = :e",
                     e=event["event_id"])
    assert variables == {"event": {"event_id": event["event_id"], "event_type": etype,
                                   "data": {"order": {"id": 42}}},
                         "order_id": 42, "plan": "pro", "kind": etype, "email": email,
                         "coupon": None, "deep": None}


def test_the_reentry_rule_refuses_a_second_concurrent_start(session: Session) -> None:
    etype = _etype()
    trigger = _trigger(session, etype, {}, _workflow(session))  # default: no_concurrent
    email = _email()
    first, second = _event(etype, email), _event(etype, email)
    assert len(_ingest(session, [first]).started) == 1
    result = _ingest(session, [second])  # the first execution is still active
    assert (result.matched, result.started) == (1, ())
    assert _one(session, "SELECT count(*) FROM workflow_executions WHERE trigger_id = :t",
                t=trigger) == 1
    [logged] = _rows(session, "SELECT condition_met, workflow_execution_id FROM trigger_executions "
                     "WHERE event_id = :e", e=second["event_id"])
    assert logged["condition_met"] and logged["workflow_execution_id"] is None


def test_a_message_event_wakes_the_execution_waiting_for_it(session: Session) -> None:
    etype, message = _etype(), _etype()
    _trigger(session, etype, {}, _workflow(session))
    email = _email()
    [execution_id] = _ingest(session, [_event(etype, email)]).started
    # As if its steps had run to a message catch event and the worker had finished.
    session.execute(text("UPDATE workflow_executions SET status = 'running', state_version = 3, "
                         "awaiting_events = CAST(:a AS varchar[]), step_enqueued_at = NULL "
                         "WHERE id = :i"), {"a": [message], "i": execution_id})
    event = _event(message, email, data={"order": 7})
    woken = _ingest(session, [event], now=NOW + dt.timedelta(hours=1)).woken
    assert woken == ((execution_id, 3),)
    [delivered] = _rows(session, "SELECT event_type, payload FROM execution_messages "
                        "WHERE execution_id = :i", i=execution_id)
    assert delivered["event_type"] == message
    assert delivered["payload"]["data"] == {"order": 7}
    assert delivered["payload"]["event_id"] == event["event_id"]
    assert _one(session, "SELECT step_enqueued_at FROM workflow_executions WHERE id = :i",
                i=execution_id) == NOW + dt.timedelta(hours=1)
    # A step is on its way now: a second message is delivered but wakes nothing more.
    assert _ingest(session, [_event(message, email)]).woken == ()


def test_a_refused_value_dead_letters_only_its_event(session: Session) -> None:
    etype, tag = _etype(), uuid.uuid4().hex[:8]
    constraint = f"test_refuse_{tag}"  # a rule no envelope knows: the database refuses the event
    session.execute(text(f"ALTER TABLE lifecycle_events ADD CONSTRAINT {constraint} "
                         f"CHECK (event_data->>'refuse_{tag}' IS NULL)"))
    email = _email()
    batch = [_event(etype, email, data={f"refuse_{tag}": True} if i == 3 else {"i": i})
             for i in range(7)]
    result = _ingest(session, batch)
    assert (result.accepted, result.rejected) == (6, 1)
    [letter] = _dead_letters(session, batch[3]["event_id"])
    assert constraint in letter["reason"] and letter["reason"].startswith("refused by the database")
    assert _audit_rows(session, batch[3]["event_id"]) == []
    assert _one(session, "SELECT count(*) FROM lifecycle_events WHERE event_type = :t",
                t=etype) == 6
    # The refused event's inbox claim rolled back with its savepoint: a corrected copy is new.
    corrected = dict(batch[3], data={"i": 3})
    assert _ingest(session, [corrected]).accepted == 1


def test_in_segment_reads_a_cold_cache_by_evaluating_and_caching(session: Session) -> None:
    etype, segment = _etype(), f"vip-{uuid.uuid4().hex[:8]}"
    segment_id = session.execute(text(
        "INSERT INTO user_segments (name, conditions, ttl_seconds) "
        "VALUES (:n, CAST(:c AS jsonb), 600) RETURNING id"),
        {"n": segment, "c": json.dumps({"field": "user.attributes.vip", "op": "eq",
                                        "value": True})}).scalar_one()
    trigger = _trigger(session, etype, {"in_segment": segment})
    vip_id, vip = _user(session, {"vip": True})
    plain_id, plain = _user(session, {"vip": False})
    result = _ingest(session, [_event(etype, vip), _event(etype, plain)])
    assert (result.evaluated, result.matched, result.started) == (2, 1, ())  # no workflow
    met = {r["user_id"]: r["condition_met"] for r in _rows(
        session, "SELECT user_id, condition_met FROM trigger_executions WHERE trigger_id = :t",
        t=trigger)}
    assert met == {vip_id: True, plain_id: False}
    [member] = _rows(session, "SELECT user_id, valid_until FROM user_segment_memberships "
                     "WHERE segment_id = :s", s=segment_id)
    assert (member["user_id"], member["valid_until"]) == (vip_id, NOW + dt.timedelta(seconds=600))
    assert _one(session, "SELECT user_id FROM segment_exclusions WHERE segment_id = :s",
                s=segment_id) == plain_id
    # An identify that changes the answer rewrites the cached membership in the same ingest.
    result = _ingest(session, [_event("user.identify", plain, data={"vip": True}),
                               _event(etype, plain)])
    assert result.matched == 1
    assert _one(session, "SELECT count(*) FROM segment_exclusions WHERE segment_id = :s",
                s=segment_id) == 0


def test_an_ingest_locks_its_users_in_id_order_so_a_step_holding_one_cannot_deadlock_it(
        engine: Engine) -> None:
    """A step holds user X `FOR UPDATE` (as `executions.lock_users` does) and then wants Y;
    an ingest of events for Y, then X, must wait for X before it touches Y. Without
    `_lock_users` the audit rows' foreign keys lock Y first and PostgreSQL aborts one side
    with a deadlock."""
    import threading
    import time

    with Session(engine) as setup, setup.begin():
        low, high = sorted(setup.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage) VALUES (:a, 'Acquisition'), "
            "(:b, 'Acquisition') RETURNING id"), {"a": _email(), "b": _email()}).scalars())
    holding, errors = threading.Event(), []

    def step() -> None:
        try:
            with Session(engine) as s, s.begin():
                s.execute(text("SELECT 1 FROM users WHERE id = :i FOR UPDATE"), {"i": low})
                holding.set()
                time.sleep(1.5)  # the ingest starts meanwhile
                s.execute(text("SELECT 1 FROM users WHERE id = :i FOR UPDATE"), {"i": high})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=step)
    thread.start()
    assert holding.wait(10)
    etype = _etype()
    try:
        with Session(engine) as s, s.begin():
            result = _ingest(s, [_event(etype, str(high)), _event(etype, str(low))])
    finally:
        thread.join(30)
    assert errors == [] and result.accepted == 2
