"""The ack rule on hostile messages: each ends as one dead letter, none loops or is dropped.

A message is acknowledged only once its effect or its dead letter is committed
(docs/architecture.md, decision 11). These messages used to break that: one whose dead letter
PostgreSQL refused (a lone surrogate) came back ~130 times a second forever; one
past its `expires` or with an ETA years ahead vanished or sat in worker memory;
a 50 MB body was stored whole. Each is sent to the session's real worker here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import Engine, create_engine, text

from tests.helpers import WorkerProcess, wait_for
from tests.test_base_task import runs_table  # noqa: F401 - the task_runs table, autouse
from workers.dead_letters import MAX_RAW_BYTES, jsonb_safe, storable_key, storable_text
from workers.errors import is_outage

pytestmark = pytest.mark.servers


def _letters(engine: Engine, needle: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT source, reason, raw_payload, payload, raw_size, raw_sha256 FROM dead_letters "
            "WHERE position(CAST(:b AS bytea) IN raw_payload) > 0 OR strpos(reason, :t) > 0"),
            {"b": needle.encode(), "t": needle}).mappings().all()
    return [dict(r) for r in rows]


def _redeliveries(celery_worker: WorkerProcess, needle: str) -> int:
    return sum(1 for line in celery_worker.log().splitlines()
               if needle in line and "task.redelivered" in line)


def test_a_step_whose_dead_letter_jsonb_refuses_is_dead_lettered_once(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    from workers.celery_app import app

    marker = uuid.uuid4().hex
    # Valid JSON on the wire; PostgreSQL's jsonb refuses the lone surrogate.
    app.send_task("workflows.step", args=["\ud800" + marker, 0], queue="workflows")
    [letter] = wait_for(lambda: _letters(engine, marker), message="a dead letter")
    assert letter["source"] == "workflows.step"
    assert letter["payload"] is None  # not storable as jsonb; the raw bytes are kept
    raw = json.loads(bytes(letter["raw_payload"]).decode("utf-8", "surrogatepass"))
    assert raw["args"][0] == "\ud800" + marker
    wait_for(lambda: "task.dead_lettered" in celery_worker.log(), message="logged")
    assert len(_letters(engine, marker)) == 1


def test_a_poison_message_whose_task_id_cannot_be_stored_is_still_counted(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    """The poison guard's key is hashed when PostgreSQL cannot store the task id as it is.

    The task kills its own pool process every time (a real redelivery each time);
    with the id written as it is, the guard's INSERT failed, and the failure used to
    escape the error handling, so the message was acked and lost.
    """
    from tests.worker_tasks import kills_its_worker

    key = f"odd-id-{uuid.uuid4().hex[:8]}"
    task_id = "\ud800\x00" + key
    kills_its_worker.apply_async(args=[key], task_id=task_id)
    [letter] = wait_for(lambda: [r for r in _letters(engine, key) if r["source"] ==
                                 "maintenance.test_kills_its_worker"],
                        timeout=90, message="the poison message to be dead-lettered")
    assert "redelivered 4 times" in letter["reason"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT redeliveries FROM task_redeliveries WHERE task_id = :i"),
                            {"i": storable_key(task_id)}).scalar_one() == 4


def test_a_message_past_its_expiry_is_dead_lettered_not_dropped(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    from workers.celery_app import app

    key = f"expired-{uuid.uuid4()}"
    app.send_task("maintenance.test_broken", args=[key],
                  expires=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    [letter] = wait_for(lambda: _letters(engine, key), message="a dead letter")
    assert letter["source"] == "broker:expired"
    assert "expired at" in letter["reason"]


def test_an_eta_beyond_the_visibility_timeout_is_dead_lettered(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    from workers.celery_app import app

    key = f"far-eta-{uuid.uuid4()}"
    app.send_task("maintenance.test_broken", args=[key],
                  eta=dt.datetime.now(dt.UTC) + dt.timedelta(days=400))
    [letter] = wait_for(lambda: _letters(engine, key), message="a dead letter")
    assert letter["source"] == "broker:eta"
    assert "visibility timeout" in letter["reason"]


def test_a_huge_body_is_kept_truncated_with_its_size_and_hash(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    from workers.producer import send_events

    marker = uuid.uuid4().hex
    junk = {"event_type": "junk.event", "user": f"{marker}@example.com",
            "data": {"blob": marker + "x" * (3 * MAX_RAW_BYTES)}}
    send_events([junk], validate=False)
    [letter] = wait_for(lambda: _letters(engine, marker), message="a dead letter")
    assert len(bytes(letter["raw_payload"])) == MAX_RAW_BYTES
    assert letter["raw_size"] > 3 * MAX_RAW_BYTES
    assert letter["payload"] is None
    assert "truncated" in letter["reason"]
    assert len(letter["raw_sha256"]) == 64


def test_connection_refused_and_unknown_hosts_are_outages() -> None:
    """The driver's own errors (no SQLSTATE) are the database being unreachable."""
    for url in ("postgresql+psycopg://postgres@127.0.0.1:1/x",
                "postgresql+psycopg://postgres@no-such-host.invalid:5432/x"):
        refused = create_engine(url, connect_args={"connect_timeout": 2})
        with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
            refused.connect()
        assert is_outage(caught.value), url


def test_too_many_connections_is_an_outage(engine: Engine) -> None:
    """SQLSTATE 53300 from the real server: the connection slots are exhausted."""
    with engine.connect() as conn:
        conn.execute(text("DROP ROLE IF EXISTS fleet_one_slot"))
        conn.execute(text("CREATE ROLE fleet_one_slot LOGIN CONNECTION LIMIT 1"))
        conn.commit()
    one = create_engine(engine.url.set(username="fleet_one_slot"), poolclass=None)
    try:
        with one.connect():
            with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
                create_engine(engine.url.set(username="fleet_one_slot")).connect()
        assert is_outage(caught.value)
    finally:
        one.dispose()
        with engine.connect() as conn:
            conn.execute(text("DROP ROLE IF EXISTS fleet_one_slot"))
            conn.commit()


def test_storable_values() -> None:
    assert storable_text("a\x00b\ud800") == "a\\x00b\\ud800"
    assert storable_key("plain") == "plain"
    assert storable_key("x" * 300).startswith("sha256:")
    assert storable_key("\ud800") == "sha256:" + hashlib.sha256(b"\xed\xa0\x80").hexdigest()
    assert jsonb_safe({"a": [1, 2.5, None, True, "ok"]})
    assert not jsonb_safe({"a": float("inf")})
    assert not jsonb_safe({"\ud800": 1})
    assert not jsonb_safe(["\x00"])


def fill_to_the_brim(client: Any) -> None:
    """Write junk until not even a small write fits (a refused large one frees its buffer)."""
    import redis

    for size in (65536, 4096, 256, 16):
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for n in range(100_000):
                client.set(f"junk:{size}:{n}", b"x" * size)


def test_a_full_redis_always_gives_producers_a_publish_error(tmp_path: Any) -> None:
    """maxmemory with noeviction refuses writes: every call raises PublishError, none lies."""
    import redis

    from workers.celery_app import create_app
    from workers.dev.embedded import EmbeddedServices
    from workers.producer import PublishError, send_event, send_events
    from workers.settings import Settings

    broker = EmbeddedServices(tmp_path)
    port = broker.start_valkey()
    client = redis.Redis(port=port)
    try:
        app = create_app(Settings(CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0"))
        send_event("test.before_full", user="full@example.com", via=app)  # room: it goes
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + 2**20))
        fill_to_the_brim(client)
        outcomes = []
        for n in range(20):
            try:
                if n % 2:
                    send_event("test.when_full", user="full@example.com", via=app)
                else:
                    send_events([{"event_type": "test.when_full", "user": "full@example.com"}],
                                via=app)
                outcomes.append("sent")
            except PublishError:
                outcomes.append("PublishError")
        # Any other exception fails the test; a call that returned really was stored
        # (a write fits when Redis briefly frees memory, e.g. a client's buffers).
        queued = client.llen(f"{app.conf.broker_transport_options['global_keyprefix']}events")
        assert queued == 1 + outcomes.count("sent")
        assert outcomes[0] == "PublishError"  # the first call met a full Redis
    finally:
        client.close()
        broker.stop_valkey()
