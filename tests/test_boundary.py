"""The boundary between producers and internal tasks, against real workers and brokers.

A producer could publish `maintenance.retention` to the `events` queue and the
events worker ran it; a normal worker ran `bench.hop` chains; any broker client
could write to every queue. Now each worker runs only its own queue's tasks, bench
tasks exist only in bench workers, and the producer credential of deploy/broker/
can publish events and nothing else (Redis ACL, RabbitMQ permissions).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import string
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import amqp.exceptions
import kombu.exceptions
import pytest
import redis
from celery import Celery
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from tests.helpers import ROOT, SERVERS, WorkerProcess, wait_for
from tests.test_base_task import _runs, runs_table  # noqa: F401 - runs_table: autouse
from workers.boundary import Router, misrouted
from workers.broker import delete_prefixed_keys
from workers.celery_app import TASK_MODULES, app, create_app
from workers.producer import send_event
from workers.queues import EVENTS, MAINTENANCE, QUEUE_NAMES, TASK_QUEUES, TaskNames, route_for_task
from workers.settings import Settings

BROKER = ROOT / "deploy" / "broker"
AMQP_HOST = "127.0.0.1:5672"

queues = st.sampled_from(QUEUE_NAMES)
names = st.text(st.characters(codec="ascii", categories=["Ll", "Nd"]), min_size=1, max_size=12)


# --------------------------------------------------------------------------- pure rules


@given(queues, names, st.one_of(st.none(), names, queues), st.one_of(st.just(""), queues))
def test_a_task_is_accepted_only_from_its_own_queue(prefix: str, suffix: str,
                                                    arrived: str | None, exchange: str) -> None:
    task = f"{prefix}.{suffix}"
    queue = route_for_task(task)["queue"]
    reason = misrouted(task, {"exchange": exchange, "routing_key": arrived})
    assert (reason is None) == (arrived == queue)
    if reason:
        assert task in reason and repr(queue) in reason


@given(queues, st.sets(queues))
def test_a_worker_runs_no_task_of_a_queue_it_does_not_consume(queue: str,
                                                              consuming: set[str]) -> None:
    """On Redis the publisher writes the routing key: what the worker consumes decides too."""
    reason = misrouted(f"{queue}.task", {"exchange": "", "routing_key": queue}, consuming)
    assert (reason is None) == (queue in consuming)


def test_tasks_without_a_queue_of_their_own_are_not_judged() -> None:
    assert misrouted("bench.hop", {"routing_key": EVENTS}) is None


def test_events_are_published_without_declaring_and_on_rabbitmq_through_their_exchange() -> None:
    on_redis, on_rabbitmq = Router("redis://h/0"), Router(f"amqp://u:p@{AMQP_HOST}/v")
    assert on_redis(TaskNames.INGEST) == {"queue": EVENTS, "routing_key": EVENTS, "declare": []}
    assert on_rabbitmq(TaskNames.INGEST_BATCH) == {"queue": EVENTS, "routing_key": EVENTS,
                                                   "declare": [], "exchange": EVENTS}
    for router in (on_redis, on_rabbitmq):
        assert router(TaskNames.RETENTION) == {"queue": MAINTENANCE, "routing_key": MAINTENANCE}
        assert router("bench.hop") is None


def test_bench_tasks_are_not_in_the_fleets_task_modules() -> None:
    assert "tasks.bench" not in TASK_MODULES


# --------------------------------------------------------------------------- real workers


@pytest.fixture()
def events_worker(private_app: Celery) -> Iterator[WorkerProcess]:
    """A real worker of the `events` queue alone, as every deployment runs one."""
    prefix = private_app.conf.broker_transport_options["global_keyprefix"]
    worker = WorkerProcess(EVENTS, concurrency=1, FLEET_BROKER_KEY_PREFIX=prefix)
    worker.app = private_app
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def _letters(engine: Engine, task_id: str) -> list[dict[str, Any]]:
    """Dead letters of refused messages whose recorded headers name `task_id`."""
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            "SELECT source, reason FROM dead_letters WHERE strpos(reason, :n) > 0"),
            {"n": task_id}).mappings()]


def _queue_length(client: redis.Redis, prefix: str, queue: str) -> int:
    return int(client.llen(f"{prefix}{queue}"))


def test_the_events_worker_dead_letters_internal_tasks_instead_of_running_them(
        engine: Engine, private_app: Celery, events_worker: WorkerProcess) -> None:
    retention = private_app.send_task(TaskNames.RETENTION, queue=EVENTS).id
    key = f"misrouted-{uuid.uuid4()}"
    # A test task that records each run: proof that nothing ran, not only a dead letter.
    flaky = private_app.send_task("maintenance.test_flaky", args=[key, 0], queue=EVENTS).id
    for task_id, name in ((retention, TaskNames.RETENTION), (flaky, "maintenance.test_flaky")):
        [letter] = wait_for(lambda t=task_id: _letters(engine, t), message=f"{name} dead-lettered")
        assert letter["source"] == "broker:misrouted"
        assert f"{name} runs on the 'maintenance' queue" in letter["reason"]
        assert "routing key 'events'" in letter["reason"]
    # The last message is settled too: the worker moved on, nothing ran.
    marker = str(send_event("boundary.checked", user=f"{key}@example.com", via=private_app))
    with engine.connect() as conn:
        wait_for(lambda: conn.execute(text("SELECT count(*) FROM lifecycle_events "
                                           "WHERE event_id = :e"), {"e": marker}).scalar_one(),
                 message="the event after them ingested")
    assert _runs(engine, key) == []
    assert f"{TaskNames.RETENTION}[{retention}] received" not in events_worker.log()


def test_a_forged_routing_key_does_not_get_a_task_past_the_events_worker(
        engine: Engine, private_app: Celery, events_worker: WorkerProcess) -> None:
    """On Redis the publisher writes delivery_info: one claiming `maintenance` in the events list."""
    key = f"forged-{uuid.uuid4()}"
    task_id = str(uuid.uuid4())
    body = json.dumps([[key, 0], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                       "chord": None}]).encode()
    message = {"body": base64.b64encode(body).decode(), "content-encoding": "utf-8",
               "content-type": "application/json",
               "headers": {"lang": "py", "task": "maintenance.test_flaky", "id": task_id,
                           "root_id": task_id, "retries": 0, "argsrepr": "", "kwargsrepr": ""},
               "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0,
                              "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                              "delivery_info": {"exchange": "", "routing_key": MAINTENANCE}}}
    prefix = private_app.conf.broker_transport_options["global_keyprefix"]
    client = redis.Redis.from_url(SERVERS.broker_url)
    try:
        client.lpush(f"{prefix}{EVENTS}", json.dumps(message))
    finally:
        client.close()
    [letter] = wait_for(lambda: _letters(engine, task_id), message="the forged task dead-lettered")
    assert letter["source"] == "broker:misrouted"
    assert "this worker consumes only events" in letter["reason"]
    assert _runs(engine, key) == []


def test_a_queue_consumed_again_after_a_pause_still_runs_its_tasks(
        engine: Engine, private_app: Celery, events_worker: WorkerProcess) -> None:
    """The benchmarks pause and resume a consumer; Celery forgets the queue in `consume_from`."""
    for control in (private_app.control.cancel_consumer, private_app.control.add_consumer):
        assert control(EVENTS, destination=[events_worker.hostname], reply=True)
    event_id = send_event("boundary.resumed", user=f"resumed-{uuid.uuid4().hex[:8]}@example.com",
                          via=private_app)
    with engine.connect() as conn:
        wait_for(lambda: conn.execute(text("SELECT count(*) FROM lifecycle_events "
                                           "WHERE event_id = :e"), {"e": event_id}).scalar_one(),
                 message="the event ingested after the pause")


def test_a_normal_worker_refuses_bench_tasks_as_unknown(
        engine: Engine, private_app: Celery, events_worker: WorkerProcess) -> None:
    registered = private_app.control.inspect([events_worker.hostname], timeout=5).registered()
    tasks = registered[events_worker.hostname]
    assert TaskNames.INGEST in tasks and not [t for t in tasks if t.startswith("bench.")]
    hop = private_app.send_task(TaskNames.BENCH_HOP, args=[3000, EVENTS, EVENTS],
                                queue=EVENTS).id
    [letter] = wait_for(lambda: _letters(engine, hop), message="bench.hop dead-lettered")
    assert letter["source"] == "broker:unknown_task"
    assert "bench.hop" in letter["reason"]


def test_bench_workers_load_the_bench_tasks() -> None:
    from workers.tools.bench.harness import BenchEnvironment

    with BenchEnvironment(EVENTS, 1, SERVERS.home / "bench-boundary") as env:
        env.start_worker()
        registered = env.app.control.inspect([env.hostname], timeout=5).registered()
        assert {TaskNames.BENCH_NOOP, TaskNames.BENCH_HOP} <= set(registered[env.hostname])


# --------------------------------------------------------------------------- Redis ACL


def _redis_rules(user: str, password: str, prefix: str) -> list[str]:
    """The shipped ACL line with its variables filled in, as `ACL SETUSER` arguments."""
    line = string.Template((BROKER / "redis-producer.acl").read_text().strip()).substitute(
        FLEET_PRODUCER_USER=user, FLEET_PRODUCER_PASSWORD=password,
        FLEET_BROKER_KEY_PREFIX=prefix)
    keyword, name, *rules = line.split()
    assert (keyword, name) == ("user", user)
    return rules


@pytest.fixture()
def redis_producer() -> Iterator[tuple[str, str]]:
    """A producer credential on the real Redis, made from deploy/broker/redis-producer.acl."""
    tag = uuid.uuid4().hex[:8]
    user, password, prefix = f"fleet-producer-{tag}", f"pw-{uuid.uuid4().hex}", f"fleet-acl-{tag}:"
    admin = redis.Redis.from_url(SERVERS.broker_url)
    admin.acl_setuser(user, reset=True)  # create it; the rules come next, verbatim
    admin.execute_command("ACL", "SETUSER", user, *_redis_rules(user, password, prefix))
    host = SERVERS.broker_url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    try:
        yield f"redis://{user}:{password}@{host}/0", prefix
    finally:
        admin.acl_deluser(user)
        delete_prefixed_keys(SERVERS.broker_url, prefix)
        admin.close()


def test_the_redis_producer_credential_publishes_events_and_nothing_else(
        redis_producer: tuple[str, str]) -> None:
    url, prefix = redis_producer
    producer = create_app(Settings(CELERY_BROKER_URL=url, broker_key_prefix=prefix))
    admin = redis.Redis.from_url(SERVERS.broker_url)
    limited = redis.Redis.from_url(url)
    events = admin.pubsub()
    try:
        events.psubscribe(f"{prefix}/0.celeryev/*")
        event_id = send_event("user.signed_up", user="acl@example.com", via=producer)
        [message] = [json.loads(m) for m in admin.lrange(f"{prefix}{EVENTS}", 0, -1)]
        assert message["headers"]["task"] == TaskNames.INGEST
        assert message["headers"]["argsrepr"] == f"[event {event_id}]"
        sent = wait_for(lambda: _task_sent(events), timeout=10, message="the task-sent event")
        assert sent["uuid"] == message["headers"]["id"]

        for options in ({}, {"queue": MAINTENANCE, "declare": []}):  # as Celery sends it; bare
            with pytest.raises(kombu.exceptions.OperationalError, match="(?i)no permissions"):  # Redis and Valkey word it apart
                producer.send_task(TaskNames.RETENTION, **options)
        for command in (("LPUSH", f"{prefix}{MAINTENANCE}", "x"),  # another queue
                        ("RPOP", f"{prefix}{EVENTS}"),  # consume or lose events
                        ("LRANGE", f"{prefix}{EVENTS}", 0, -1),  # read them
                        ("SADD", f"{prefix}_kombu.binding.{EVENTS}", "x"),  # reroute
                        ("PUBLISH", f"{prefix}/0.celery.pidbox", "x"),  # worker control
                        ("DEL", f"{prefix}{EVENTS}")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                limited.execute_command(*command)
        assert _queue_length(admin, prefix, MAINTENANCE) == 0
        assert _queue_length(admin, prefix, EVENTS) == 1
    finally:
        events.close()
        producer.close()
        app.set_current()
        limited.close()
        admin.close()


def _task_sent(events: redis.client.PubSub) -> dict[str, Any] | None:
    message = events.get_message(timeout=1)
    if not message or message["type"] != "pmessage":
        return None
    payload = json.loads(message["data"])
    return dict(json.loads(base64.b64decode(payload["body"])))


# --------------------------------------------------------------------------- RabbitMQ


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture()
def rabbitmq_vhost() -> Iterator[tuple[str, str]]:
    """A vhost of the test's own: the fleet's credential (guest) and the shipped producer one."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: no RabbitMQ to test the permissions on")
    tag = uuid.uuid4().hex[:8]
    vhost, user, password = f"fleet-test-{tag}", f"fleet-producer-{tag}", f"pw-{uuid.uuid4().hex}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        subprocess.run([str(BROKER / "rabbitmq-producer.sh")], check=True, capture_output=True,
                       timeout=60, env={**os.environ, "FLEET_PRODUCER_USER": user,
                                        "FLEET_PRODUCER_PASSWORD": password, "FLEET_VHOST": vhost})
        try:
            yield (f"amqp://guest:guest@{AMQP_HOST}/{vhost}",
                   f"amqp://{user}:{password}@{AMQP_HOST}/{vhost}")
        finally:
            _rabbitmqctl("delete_user", user)
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def _message_count(fleet: Celery, queue: str) -> int:
    with fleet.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def test_the_rabbitmq_producer_credential_publishes_events_and_nothing_else(
        engine: Engine, rabbitmq_vhost: tuple[str, str]) -> None:
    fleet_url, producer_url = rabbitmq_vhost
    fleet = create_app(Settings(CELERY_BROKER_URL=fleet_url))
    producer = create_app(Settings(CELERY_BROKER_URL=producer_url))
    worker = WorkerProcess(EVENTS, concurrency=1, CELERY_BROKER_URL=fleet_url)
    worker.app = fleet
    try:
        worker.wait_ready()  # it declares the queues, as the fleet's workers do
        event_id = send_event("user.signed_up", user=f"amqp-{uuid.uuid4().hex[:10]}@example.com",
                              via=producer)
        with engine.connect() as conn:
            wait_for(lambda: conn.execute(text("SELECT count(*) FROM lifecycle_events "
                                               "WHERE event_id = :e"), {"e": event_id}).scalar_one(),
                     message="the event ingested by the worker on RabbitMQ")
        with fleet.connection_for_write() as conn:  # every queue, as the whole fleet has them
            for queue in TASK_QUEUES:
                queue.bind(conn.default_channel).declare()
        for options in ({}, {"queue": MAINTENANCE, "declare": []},  # as Celery sends it; bare
                        {"exchange": MAINTENANCE, "routing_key": MAINTENANCE, "declare": []}):
            # Raised, not dropped after returning: the fleet waits for RabbitMQ's confirms.
            with pytest.raises(amqp.exceptions.AccessRefused, match="ACCESS_REFUSED"):
                producer.send_task(TaskNames.RETENTION, **options)
        assert _message_count(fleet, MAINTENANCE) == 0
    finally:
        worker.stop()
        producer.close()
        fleet.close()
        app.set_current()

