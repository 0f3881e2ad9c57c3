"""The event pipeline end to end: producer → broker → real worker → PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.helpers import ROOT, TRIGGER_CACHE_SECONDS, WorkerProcess, wait_for
from tests.workflow_helpers import BPMN
from workers.producer import send_event, send_events

pytestmark = pytest.mark.servers


def _one(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def _rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params).mappings())


def _workflow(engine: Engine) -> uuid.UUID:
    """An active workflow whose executions stay active: they wait for a message never sent."""
    from db.session import session_scope
    from workers.definitions import deploy_workflow

    name = f"wf-{uuid.uuid4()}"
    with session_scope() as session:
        deploy_workflow(session, name, (BPMN / "wait_for_message.bpmn").read_text(), stages=[],
                        activate=True)
    with engine.begin() as conn:
        return conn.execute(text("SELECT id FROM workflows WHERE name = :n"),
                            {"n": name}).scalar_one()


def _trigger(engine: Engine, event_type: str, conditions: dict[str, Any],
             workflow_id: uuid.UUID | None = None, **rules: Any) -> uuid.UUID:
    columns = {"name": f"t-{uuid.uuid4()}", "event_type": event_type,
               "conditions": json.dumps(conditions), "workflow_id": workflow_id, **rules}
    with engine.begin() as conn:
        trigger_id = conn.execute(text(
            f"INSERT INTO triggers ({', '.join(columns)}) VALUES "
            f"({', '.join(':' + c for c in columns)}) RETURNING id"
        ), columns).scalar_one()
    time.sleep(TRIGGER_CACHE_SECONDS + 0.2)  # workers see definition changes this late
    return trigger_id


def _audit(engine: Engine, event_id: uuid.UUID) -> int:
    return _one(engine, "SELECT count(*) FROM lifecycle_events WHERE event_id = :e", e=event_id)


def _wait_ingested(engine: Engine, event_id: uuid.UUID) -> None:
    wait_for(lambda: _audit(engine, event_id) == 1, message=f"event {event_id}")


def _etype() -> str:
    return f"test.e{uuid.uuid4().hex[:12]}"


def test_an_event_produces_exactly_its_rows(engine: Engine, celery_worker: WorkerProcess) -> None:
    etype, email = _etype(), f"{uuid.uuid4().hex[:8]}@example.com"
    wf = _workflow(engine)
    match = _trigger(engine, etype, {"field": "event.data.plan", "op": "eq", "value": "pro"}, wf)
    miss = _trigger(engine, etype, {"field": "event.data.plan", "op": "eq", "value": "free"}, wf)
    event_id = send_event(etype, user=email, data={"plan": "pro"})
    _wait_ingested(engine, event_id)

    [user] = _rows(engine, "SELECT id, current_lifecycle_stage FROM users WHERE email = :m", m=email)
    assert user["current_lifecycle_stage"] == "Acquisition"
    [audit] = _rows(engine, "SELECT * FROM lifecycle_events WHERE event_id = :e", e=event_id)
    assert audit["user_id"] == user["id"] and audit["lifecycle_stage"] == "Acquisition"
    assert audit["event_data"] == {"plan": "pro"} and audit["event_type"] == etype
    evaluated = {r["trigger_id"]: r for r in _rows(
        engine, "SELECT * FROM trigger_executions WHERE event_id = :e", e=event_id)}
    assert evaluated.keys() == {match, miss}
    assert evaluated[match]["condition_met"] and not evaluated[miss]["condition_met"]
    assert evaluated[miss]["workflow_execution_id"] is None
    [execution] = _rows(engine, "SELECT * FROM workflow_executions WHERE source_event_id = :e",
                        e=event_id)
    assert execution["id"] == evaluated[match]["workflow_execution_id"]
    assert execution["status"] in ("pending", "running") and execution["workflow_id"] == wf
    # After the commit, ingest sent the first step: the execution runs to its wait.
    waiting = wait_for(lambda: _one(
        engine, "SELECT awaiting_events FROM workflow_executions WHERE id = :i",
        i=execution["id"]), message="the first steps to run")
    assert waiting == ["test.never_sent"]
    assert execution["user_id"] == user["id"] and execution["workflow_version"] == "1.0.0"


def test_the_same_event_twice_is_ingested_once(engine: Engine, celery_worker: WorkerProcess) -> None:
    etype, email = _etype(), f"{uuid.uuid4().hex[:8]}@example.com"
    _trigger(engine, etype, {}, _workflow(engine))
    event_id = uuid.uuid4()
    for _ in range(3):
        send_event(etype, user=email, data={"n": 1}, event_id=event_id)
    send_events([{"event_id": str(event_id), "event_type": etype, "user": email}] * 2)
    _wait_ingested(engine, event_id)
    time.sleep(1.5)  # let the redundant copies be processed too
    assert _audit(engine, event_id) == 1
    assert _one(engine, "SELECT count(*) FROM trigger_executions WHERE event_id = :e", e=event_id) == 1
    assert _one(engine, "SELECT count(*) FROM workflow_executions WHERE source_event_id = :e",
                e=event_id) == 1


BAD_EVENTS: list[Any] = [
    {"event_type": "Not Valid", "user": "a@example.com"},
    {"event_type": "test.ok", "user": "not-an-email"},
    {"event_type": "test.ok", "user": "a@example.com", "data": "not an object"},
    {"event_type": "test.ok", "user": "a@example.com", "data": {"x": "y" * 40_000}},
    {"event_type": "test.ok", "user": "a@example.com", "event_id": "not-a-uuid"},
    {"event_type": "test.ok", "user": "a@example.com", "occurred_at": "yesterday"},
    {"event_type": "test.ok", "user": "a@example.com", "surprise": 1},
    {"event_type": "test.ok", "user": str(uuid.uuid4())},  # a user id nobody has
    {"user": "a@example.com"},
    "{malformed json",
    42,
    None,
]


def test_a_mixed_batch_ingests_the_good_and_dead_letters_the_bad(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    etype = _etype()
    marker = uuid.uuid4().hex
    good = [{"event_id": str(uuid.uuid4()), "event_type": etype,
             "user": f"u{i % 50}-{marker}@example.com", "data": {"i": i}} for i in range(900)]
    bad = [dict(b, data={"marker": marker}) if isinstance(b, dict) and "data" not in b else b
           for b in BAD_EVENTS]
    bad = [bad[i % len(bad)] for i in range(100)]
    mixed = good + bad
    random.Random(7).shuffle(mixed)
    before = _one(engine, "SELECT count(*) FROM dead_letters")
    for i in range(0, len(mixed), 100):
        send_events(mixed[i:i + 100], validate=False)
    wait_for(lambda: _one(engine, "SELECT count(*) FROM lifecycle_events WHERE event_type = :t",
                          t=etype) == 900, timeout=60, message="900 good events")
    wait_for(lambda: _one(engine, "SELECT count(*) FROM dead_letters") - before == 100,
             timeout=30, message="100 dead letters")
    ids = [g["event_id"] for g in good]
    assert _one(engine, "SELECT count(DISTINCT event_id) FROM lifecycle_events "
                "WHERE event_id = ANY(CAST(:ids AS uuid[]))", ids=ids) == 900
    letters = _rows(engine, "SELECT reason, raw_payload FROM dead_letters WHERE source = "
                    "'events.ingest_batch' ORDER BY id DESC LIMIT 100")
    reasons = " | ".join(r["reason"] for r in letters)
    for fragment in ("event_type", "user", "data", "event_id", "occurred_at", "malformed JSON",
                     "must be a JSON object", "no user with id", "larger than"):
        assert fragment in reasons, fragment
    assert all(r["raw_payload"] for r in letters)


def test_identify_merges_attributes(engine: Engine, celery_worker: WorkerProcess) -> None:
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    first = send_event("user.identify", user=email, data={"plan": "free", "country": "NZ"})
    _wait_ingested(engine, first)
    second = send_event("user.identify", user=email, data={"plan": "pro", "country": None})
    _wait_ingested(engine, second)
    assert _one(engine, "SELECT attributes FROM users WHERE email = :m", m=email) == {"plan": "pro"}


def test_trigger_changes_apply_without_restart(engine: Engine, celery_worker: WorkerProcess) -> None:
    etype, email = _etype(), f"{uuid.uuid4().hex[:8]}@example.com"
    trigger = _trigger(engine, etype, {}, _workflow(engine), reentry="allow")
    _wait_ingested(engine, send_event(etype, user=email))
    with engine.begin() as conn:
        conn.execute(text("UPDATE triggers SET enabled = false, updated_at = now() WHERE id = :t"),
                     {"t": trigger})
    changed_at = time.monotonic()

    def ignored() -> bool:
        event_id = send_event(etype, user=email)
        _wait_ingested(engine, event_id)
        return _one(engine, "SELECT count(*) FROM trigger_executions WHERE event_id = :e",
                    e=event_id) == 0

    wait_for(ignored, timeout=15, interval=0.5, message="the disabled trigger to be ignored")
    print(f"trigger change took effect after {time.monotonic() - changed_at:.1f}s")


def test_reentry_rules(engine: Engine, celery_worker: WorkerProcess) -> None:
    etype = _etype()
    wf = _workflow(engine)
    single = _trigger(engine, etype, {}, wf)  # default: no concurrent execution per user
    capped = _trigger(engine, etype, {}, wf, reentry="allow", max_runs_per_user=2)
    cooled = _trigger(engine, etype, {}, wf, reentry="allow", cooldown_seconds=3600)
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    events = [{"event_type": etype, "user": email, "data": {"n": n}} for n in range(4)]
    send_events(events[:2])
    send_events(events[2:])
    wait_for(lambda: _one(engine, "SELECT count(*) FROM trigger_executions WHERE trigger_id = :t",
                          t=cooled) == 4, message="4 evaluations")
    runs = {t: _one(engine, "SELECT count(*) FROM workflow_executions WHERE trigger_id = :t", t=t)
            for t in (single, capped, cooled)}
    assert runs == {single: 1, capped: 2, cooled: 1}


def test_cold_membership_cache_is_evaluated_on_the_spot(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    etype = _etype()
    segment = f"vip-{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        segment_id = conn.execute(text(
            "INSERT INTO user_segments (name, conditions, ttl_seconds) "
            "VALUES (:n, CAST(:c AS jsonb), 600) RETURNING id"
        ), {"n": segment, "c": json.dumps(
            {"field": "user.attributes.vip", "op": "eq", "value": True})}).scalar_one()
    trigger = _trigger(engine, etype, {"in_segment": segment}, _workflow(engine))
    vip, plain = (f"{uuid.uuid4().hex[:8]}@example.com" for _ in range(2))
    with engine.begin() as conn:  # written around ingest, so no membership is computed yet
        for email, is_vip in ((vip, True), (plain, False)):
            conn.execute(text("INSERT INTO users (email, current_lifecycle_stage, attributes) "
                              "VALUES (:e, 'Activation', CAST(:a AS jsonb))"),
                         {"e": email, "a": json.dumps({"vip": is_vip})})
    assert _one(engine, "SELECT count(*) FROM user_segment_memberships WHERE segment_id = :s",
                s=segment_id) == 0  # the cache is cold
    ids = [send_event(etype, user=email) for email in (vip, plain)]
    for event_id in ids:
        _wait_ingested(engine, event_id)
    met = {r["email"]: r["condition_met"] for r in _rows(
        engine, "SELECT u.email, t.condition_met FROM trigger_executions t "
        "JOIN users u ON u.id = t.user_id WHERE t.trigger_id = :t", t=trigger)}
    assert met == {vip: True, plain: False}
    [row] = _rows(engine, "SELECT u.email, m.valid_until FROM user_segment_memberships m "
                  "JOIN users u ON u.id = m.user_id WHERE m.segment_id = :s", s=segment_id)
    assert row["email"] == vip
    assert row["valid_until"] > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    # The "no" is cached too, so the next message about `plain` reads it instead of
    # evaluating again; an identify that changes the answer rewrites it at once.
    [excluded] = _rows(engine, "SELECT u.email FROM segment_exclusions x "
                       "JOIN users u ON u.id = x.user_id WHERE x.segment_id = :s", s=segment_id)
    assert excluded["email"] == plain
    _wait_ingested(engine, send_event("user.identify", user=plain, data={"vip": True}))
    _wait_ingested(engine, send_event(etype, user=plain))
    assert _one(engine, "SELECT count(*) FROM trigger_executions t JOIN users u "
                "ON u.id = t.user_id WHERE t.trigger_id = :t AND u.email = :e AND condition_met",
                t=trigger, e=plain) == 1
    assert _one(engine, "SELECT count(*) FROM segment_exclusions WHERE segment_id = :s",
                s=segment_id) == 0


def test_dead_letter_replay_after_the_cause_is_fixed(engine: Engine,
                                                     celery_worker: WorkerProcess) -> None:
    from db.session import session_scope
    from workers.events.replay import replay

    user_id = uuid.uuid4()
    event_id = uuid.uuid4()
    send_events([{"event_id": str(event_id), "event_type": "test.replayed", "user": str(user_id)}],
                validate=False)
    letter_id = wait_for(lambda: _one(engine, "SELECT id FROM dead_letters WHERE event_id = :e",
                                      e=event_id), message="dead letter")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, email, current_lifecycle_stage) "
                          "VALUES (:i, :m, 'Activation')"), {"i": user_id, "m": f"{user_id}@x.io"})
    with session_scope() as session:
        replay(session, letter_id)
    _wait_ingested(engine, event_id)
    assert _one(engine, "SELECT status FROM dead_letters WHERE id = :i", i=letter_id) == "replayed"


def test_outbox_relay_publishes_once_even_if_marking_fails(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    from db.session import session_scope
    from workers.events.outbox import add_to_outbox, relay_outbox
    from workers.producer import publish_batch

    email = f"{uuid.uuid4().hex[:8]}@example.com"
    with session_scope() as session:
        event_id = add_to_outbox(session, "test.outboxed", user=email, data={"k": 1})

    class Crash(Exception):
        pass

    # The relay publishes, then dies before its transaction commits.
    with pytest.raises(Crash), session_scope() as session:
        assert relay_outbox(session, publish_batch) >= 1
        raise Crash
    assert _one(engine, "SELECT status FROM event_outbox WHERE event_id = :e", e=event_id) == "PENDING"
    with session_scope() as session:
        assert relay_outbox(session, publish_batch) >= 1
    assert _one(engine, "SELECT status FROM event_outbox WHERE event_id = :e",
                e=event_id) == "PUBLISHED"
    _wait_ingested(engine, event_id)
    time.sleep(1)
    assert _audit(engine, event_id) == 1


def test_outbox_rows_whose_event_never_arrived_are_published_again(fresh_database: str) -> None:
    """The broker accepted the message but lost it (a Redis restart between BRPOP and the
    unacked record): only the fleet's inbox can tell, so the relay checks it."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from db.migrate import upgrade
    from workers.events.outbox import add_to_outbox, confirm_published

    upgrade(fresh_database)
    engine = create_engine(fresh_database)
    with Session(engine) as session, session.begin():
        ingested, lost, rejected, recent = (
            add_to_outbox(session, "test.outboxed", user=f"o{i}@example.com") for i in range(4))
        session.execute(text("UPDATE event_outbox SET status = 'PUBLISHED', published_at = "
                             "CASE WHEN event_id = :recent THEN now() "
                             "ELSE now() - interval '1 hour' END"), {"recent": recent})
        session.execute(text("INSERT INTO event_inbox (event_id, event_type) "
                             "VALUES (:e, 'test.outboxed')"), {"e": ingested})
        session.execute(text("INSERT INTO dead_letters (source, reason, raw_payload, event_id) "
                             "VALUES ('test', 'bad', '\\x00', :e)"), {"e": rejected})
    with Session(engine) as session, session.begin():
        assert confirm_published(session, dt.timedelta(minutes=15), lambda: False) == (2, 1)
    with engine.connect() as conn:
        rows = {r.event_id: r for r in conn.execute(text(
            "SELECT event_id, status, confirmed_at, retry_count, error_message FROM event_outbox"))}
    assert rows[ingested].confirmed_at and rows[rejected].confirmed_at
    assert (rows[lost].status, rows[lost].retry_count, rows[lost].confirmed_at) == ("PENDING", 1, None)
    assert "not received by the fleet 900 s after publishing" in rows[lost].error_message
    assert (rows[recent].status, rows[recent].confirmed_at) == ("PUBLISHED", None)
    with Session(engine) as session, session.begin():  # behind a backlog nothing is judged
        session.execute(text("UPDATE event_outbox SET status = 'PUBLISHED', "
                             "published_at = now() - interval '1 hour' WHERE event_id = :e"),
                        {"e": lost})
        assert confirm_published(session, dt.timedelta(minutes=15), lambda: True) == (0, 0)
        session.execute(text("UPDATE event_outbox SET status = 'PENDING' WHERE event_id = :e"),
                        {"e": lost})
    with Session(engine) as session, session.begin():  # nothing more is due
        assert confirm_published(session, dt.timedelta(minutes=15), lambda: False) == (0, 0)
    engine.dispose()


def test_the_relay_publishes_again_an_event_the_broker_lost(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    from db.session import session_scope
    from workers.celery_app import app
    from workers.events.outbox import add_to_outbox
    from workers.queues import TaskNames

    with session_scope() as session:  # published an hour ago, never delivered
        event_id = add_to_outbox(session, "test.outbox_lost", user=f"{uuid.uuid4().hex[:8]}@x.io")
        session.execute(text("UPDATE event_outbox SET status = 'PUBLISHED', "
                             "published_at = now() - interval '1 hour' WHERE event_id = :e"),
                        {"e": event_id})
    app.send_task(TaskNames.RELAY_OUTBOX)
    _wait_ingested(engine, event_id)
    assert _one(engine, "SELECT retry_count FROM event_outbox WHERE event_id = :e", e=event_id) == 1
    assert _audit(engine, event_id) == 1


def test_poison_broker_messages_are_dead_lettered(engine: Engine,
                                                  celery_worker: WorkerProcess) -> None:
    from kombu import Exchange

    from workers.celery_app import app

    marker = uuid.uuid4().hex
    before = {s: _one(engine, "SELECT count(*) FROM dead_letters WHERE source = :s", s=s)
              for s in ("broker:undecodable", "broker:unknown_task", "broker:rejected")}
    with app.producer_or_acquire() as producer:
        producer.publish(  # declared as JSON, but not JSON (and not even UTF-8)
            b"\xff\xfe{" + marker.encode(), exchange=Exchange("events", type="direct"),
            routing_key="events", content_type="application/json", content_encoding="utf-8",
            headers={"task": "events.ingest", "id": str(uuid.uuid4())}, serializer=None)
        producer.publish(  # no task headers at all
            {"marker": marker}, exchange=Exchange("events", type="direct"), routing_key="events",
            serializer="json")
    app.send_task("events.no_such_task", args=[marker], queue="events")
    for source, count in before.items():
        wait_for(lambda s=source, c=count: _one(
            engine, "SELECT count(*) FROM dead_letters WHERE source = :s", s=s) == c + 1,
            message=f"a {source} dead letter")
    raw = _rows(engine, "SELECT raw_payload FROM dead_letters WHERE source = 'broker:undecodable' "
                "ORDER BY id DESC LIMIT 1")[0]["raw_payload"]
    assert bytes(raw) == b"\xff\xfe{" + marker.encode()
    # The worker is still consuming.
    _wait_ingested(engine, send_event("test.after_poison", user="after@example.com"))


def test_identify_reevaluates_memberships_at_once(engine: Engine,
                                                  celery_worker: WorkerProcess) -> None:
    tag = uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        segment_id = conn.execute(text(
            "INSERT INTO user_segments (name, conditions) VALUES (:n, CAST(:c AS jsonb)) "
            "RETURNING id"), {"n": f"gold-{tag}", "c": json.dumps(
                {"field": "user.attributes.tier", "op": "eq", "value": "gold"})}).scalar_one()
    time.sleep(TRIGGER_CACHE_SECONDS + 0.2)
    email = f"{tag}@example.com"

    def member() -> bool:
        return _one(engine, "SELECT count(*) FROM user_segment_memberships m JOIN users u "
                    "ON u.id = m.user_id WHERE m.segment_id = :s AND u.email = :e",
                    s=segment_id, e=email) == 1

    _wait_ingested(engine, send_event("user.identify", user=email, data={"tier": "gold"}))
    assert member()
    _wait_ingested(engine, send_event("user.identify", user=email, data={"tier": "silver"}))
    assert not member()


def test_an_event_the_database_refuses_takes_no_other_event_down(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    """Both ingest paths: a batch message of 1,000 and single messages micro-batched together."""
    etype, tag = _etype(), uuid.uuid4().hex[:8]
    constraint = f"test_refuse_{tag}"  # a rule no envelope knows: the database refuses the event
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE lifecycle_events ADD CONSTRAINT {constraint} "
                          f"CHECK (event_data->>'refuse_{tag}' IS NULL)"))
    try:
        def event(i: int, refused: bool = False) -> dict[str, Any]:
            return {"event_id": str(uuid.uuid4()), "event_type": etype,
                    "user": f"r{i % 50}-{tag}@example.com",
                    "data": {f"refuse_{tag}": True} if refused else {"i": i}}

        batch = [event(i, refused=i == 500) for i in range(1000)]
        send_events(batch)
        singles = [event(i, refused=i == 1020) for i in range(1000, 1040)]
        for single in singles:
            send_event(single["event_type"], user=single["user"], data=single["data"],
                       event_id=single["event_id"])
        wait_for(lambda: _one(engine, "SELECT count(*) FROM lifecycle_events WHERE event_type = :t",
                              t=etype) == 999 + 39, timeout=60, message="every good event")
        refused = [batch[500]["event_id"], singles[20]["event_id"]]
        letters = "FROM dead_letters WHERE event_id = ANY(CAST(:ids AS uuid[]))"
        wait_for(lambda: _one(engine, f"SELECT count(*) {letters}", ids=refused) == 2,
                 message="the two refused events dead-lettered")
        assert all(constraint in r["reason"]
                   for r in _rows(engine, f"SELECT reason {letters}", ids=refused))
        assert _one(engine, "SELECT count(*) FROM dead_letters WHERE reason LIKE :r",
                    r=f"%{constraint}%") == 2
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE lifecycle_events DROP CONSTRAINT {constraint}"))


def test_a_redelivered_message_without_event_ids_is_ingested_once(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    from workers.celery_app import app
    from workers.queues import TaskNames

    etype, email = _etype(), f"{uuid.uuid4().hex[:8]}@example.com"
    single, batch = str(uuid.uuid4()), str(uuid.uuid4())
    for _ in range(2):  # as the broker redelivers: the same message, the same task id
        app.send_task(TaskNames.INGEST, args=[{"event_type": etype, "user": email}],
                      task_id=single, queue="events")
        app.send_task(TaskNames.INGEST_BATCH, args=[[{"event_type": etype, "user": email},
                                                    {"event_type": etype, "user": email}]],
                      task_id=batch, queue="events")
    count = "SELECT count(*) FROM lifecycle_events WHERE event_type = :t"
    wait_for(lambda: _one(engine, count, t=etype) >= 3, message="3 events")
    time.sleep(1.5)  # let the redelivered copies be processed too
    assert _one(engine, count, t=etype) == 3
    assert _one(engine, "SELECT count(DISTINCT event_id) FROM lifecycle_events WHERE event_type = :t",
                t=etype) == 3


def test_a_reused_event_id_with_other_content_is_dead_lettered(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    etype, tag = _etype(), uuid.uuid4().hex[:8]
    first, other = f"first-{tag}@example.com", f"other-{tag}@example.com"
    event_id = send_event(etype, user=first, data={"n": 1})
    _wait_ingested(engine, event_id)
    send_event(etype, user=first, data={"n": 1}, event_id=event_id)  # a retry: a plain duplicate
    send_event(etype, user=other, data={"n": 2}, event_id=event_id)
    reason = wait_for(lambda: _one(engine, "SELECT reason FROM dead_letters WHERE event_id = :e",
                                   e=event_id), message="a dead letter for the conflict")
    assert "duplicate event_id with different content" in reason
    time.sleep(1)  # let the retry be processed too
    assert _one(engine, "SELECT count(*) FROM dead_letters WHERE event_id = :e", e=event_id) == 1
    assert _one(engine, "SELECT count(*) FROM users WHERE email = :m", m=other) == 0
    assert _audit(engine, event_id) == 1


def test_emit_file_keeps_the_good_lines_of_a_batch(
        engine: Engine, celery_worker: WorkerProcess, tmp_path: Path) -> None:
    etype, tag = _etype(), uuid.uuid4().hex[:8]
    lines = [{"event_id": str(uuid.uuid4()), "event_type": etype, "user": f"e{i}-{tag}@example.com"}
             for i in range(100)]
    lines[10]["occurred_at"] = "2026-01-02T03:04:05+18:00"
    lines[50]["occurred_at"] = "2026-01-02T03:04:05-20:00"
    lines[90]["user"] = "a" * 64 + "@" + "İ" * 90 + "b" * 96 + ".com"  # 255 chars, longer folded
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    emitted = subprocess.run([sys.executable, "-m", "workers.cli.main", "emit", "--file", str(path)],
                             cwd=ROOT, env=dict(os.environ, COLUMNS="250"), capture_output=True,
                             text=True, timeout=120)
    assert "sent 100 events" in emitted.stdout, emitted.stdout + emitted.stderr
    wait_for(lambda: _one(engine, "SELECT count(*) FROM lifecycle_events WHERE event_type = :t",
                          t=etype) == 97, timeout=60, message="97 good lines")
    bad = [lines[i]["event_id"] for i in (10, 50, 90)]
    wait_for(lambda: _one(engine, "SELECT count(*) FROM dead_letters WHERE "
                          "event_id = ANY(CAST(:ids AS uuid[]))", ids=bad) == 3,
             message="3 dead letters")
