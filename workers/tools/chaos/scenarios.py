"""`fleet chaos SCENARIO`: a fault injected into a running scratch fleet, then the invariants.

Every scenario starts its own fleet (workers for events, workflows, actions and
maintenance, and a beat), applies the journey program, streams events at it while
the fault is injected, waits for the fleet to settle and checks every invariant of
`workers.tools.chaos.invariants`. The tests run the same functions with smaller numbers.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from db.models import ACTIVE_EXECUTION_STATUSES, EventOutbox, sql_list
from db.partitions import range_containing
from workers.definitions import deploy_workflow
from workers.events.outbox import add_to_outbox
from workers.producer import PublishError, send_event, send_events
from workers.queues import ACTIONS, EVENTS, WORKFLOWS, TaskNames
from workers.tools.chaos.fleet import ChaosFleet
from workers.tools.chaos.invariants import InvariantReport, check
from workers.tools.chaos.program import (
    ENROLLED,
    SIGNED_UP,
    VERSIONED,
    WAIT_SECONDS,
    EventStream,
    SentLog,
    apply_program,
    versioned_xml,
)
from workers.tools.chaos.receiver import WebhookServer, webhook_server

BATCH = 20  # envelopes per batch message; every third message is a batch
TIMEOUT = 180.0  # seconds a scenario may take to settle after the fault, plus …
PER_JOURNEY = 0.3  # … this per journey started (≈ 8 steps and 2 operator calls each)


@dataclass
class ChaosResult:
    scenario: str
    seconds: float = 0.0
    injected: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    invariants: InvariantReport = field(default_factory=InvariantReport)

    @property
    def ok(self) -> bool:
        return self.invariants.ok

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["invariants"] = self.invariants.as_dict()
        return out


class Publisher:
    """Sends a stream's envelopes to a fleet at a steady rate, recording what was handed over.

    With `outbox`, envelopes are written to the fleet's event_outbox instead (as a
    producer sharing the database does) and the beat's relay publishes them.
    """

    def __init__(self, fleet: ChaosFleet, stream: EventStream, outbox: bool = False) -> None:
        self.fleet = fleet
        self.stream = iter(stream)
        self.outbox = outbox
        self.sent = SentLog()
        self.failures = 0  # publishes that raised PublishError after every retry
        self._messages = itertools.count()

    def publish(self, count: int) -> None:
        """One message: a single event, or (every third) a batch of up to BATCH envelopes."""
        envelopes = [next(self.stream) for _ in range(count)]
        if self.outbox:
            self._write_outbox(envelopes)
        else:
            self._send(envelopes)
        for envelope, good in envelopes:
            (self.sent.good if good else self.sent.bad).append(envelope["event_id"])
            self.sent.signups += good and envelope["event_type"] == SIGNED_UP

    def _write_outbox(self, envelopes: list[tuple[dict[str, Any], bool]]) -> None:
        with Session(self.fleet.engine) as session, session.begin():
            for e, good in envelopes:
                if good:
                    add_to_outbox(session, e["event_type"], user=e["user"], data=e["data"],
                                  event_id=e["event_id"])
                else:  # as a producer that skips validation would (jsonb holds no NUL)
                    payload = json.loads(json.dumps(e).replace("\\u0000", ""))
                    session.add(EventOutbox(event_id=e["event_id"], topic=TaskNames.INGEST_BATCH,
                                            headers={}, payload=payload))

    def _send(self, envelopes: list[tuple[dict[str, Any], bool]]) -> None:
        count = len(envelopes)
        try:
            if count == 1 and envelopes[0][1]:
                e = envelopes[0][0]
                if "sent_at" in e["data"]:
                    e["data"]["sent_at"] = time.time()
                send_event(e["event_type"], user=e["user"], data=e["data"],
                           event_id=e["event_id"], via=self.fleet.app)
            else:
                now = time.time()
                for e, _good in envelopes:
                    if isinstance(e.get("data"), dict) and "sent_at" in e["data"]:
                        e["data"]["sent_at"] = now
                send_events([e for e, _ in envelopes], validate=False, via=self.fleet.app)
        except PublishError:
            self.failures += 1
            envelopes.clear()  # not handed over: not counted as sent

    def run(self, events: int, rate: float, stop: threading.Event | None = None) -> None:
        """About `events` envelopes at `rate` per second (bad ones only travel in batches)."""
        started = time.monotonic()
        handed = 0
        while handed < events and not (stop and stop.is_set()):
            size = BATCH if next(self._messages) % 3 == 0 else 1
            size = min(size, events - handed)
            self.publish(size)
            handed += size
            ahead = handed / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


def in_background(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def accounted(fleet: ChaosFleet, sent: SentLog) -> bool:
    """Every sent event is in the inbox (accepted) or in dead_letters (rejected)."""
    with fleet.engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT (SELECT count(*) FROM event_inbox WHERE event_id = ANY(CAST(:good AS uuid[]))) "
            "+ (SELECT count(DISTINCT event_id) FROM dead_letters "
            "   WHERE event_id = ANY(CAST(:bad AS uuid[]))) >= :n"),
            {"good": sent.good, "bad": sent.bad, "n": sent.sent}).scalar())


def journeys_done(fleet: ChaosFleet) -> bool:
    return not fleet.scalar(text(
        "SELECT count(*) FROM workflow_executions "
        f"WHERE status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)})"))


def finish(fleet: ChaosFleet, publisher: Publisher, receiver: WebhookServer | None,
           result: ChaosResult, timeout: float) -> ChaosResult:
    """Wait until every event is accounted for and every journey has ended; check."""
    deadline = time.monotonic() + timeout + PER_JOURNEY * publisher.sent.signups
    unsettled: list[str] = []
    for what, settled in (("every event accounted for", lambda: accounted(fleet, publisher.sent)),
                          ("every execution ended", lambda: journeys_done(fleet))):
        try:  # one deadline for both: a run's worst case is bounded (tests' timeouts)
            fleet.wait_until(settled, max(0.0, deadline - time.monotonic()), what)
        except TimeoutError as exc:  # checked anyway: the report says what is missing
            unsettled.append(f"{exc}; queue depths {fleet.depths()}")
    result.invariants = check(fleet.engine, publisher.sent, receiver)
    result.invariants.violations[:0] = unsettled
    result.figures["publish_failures"] = publisher.failures
    if unsettled:
        result.figures["log_errors"] = log_errors(fleet.log_dir)
    return result


def log_errors(log_dir: Path, limit: int = 40) -> list[str]:
    """The last error lines of the fleet's processes (their logs go when the run ends)."""
    lines: list[str] = []
    for path in sorted(log_dir.glob("*.log")):
        lines += [f"{path.stem}: {line.strip()[:300]}"
                  for line in path.read_text(errors="replace").splitlines()
                  if any(word in line for word in ("ERROR", "CRITICAL", "Error:", "error=",
                                                   '"level": "error"', '"level": "critical"'))]
    return lines[-limit:]


@contextmanager
def running_fleet(result: ChaosResult, *, broker_url: str | None = None,
                  database_url: str | None = None, webhook_delay: float = 0.0,
                  versioned_wait: int = 60) -> Iterator[tuple[ChaosFleet, WebhookServer]]:
    started = time.monotonic()
    with webhook_server(delay=webhook_delay) as receiver, \
            ChaosFleet(broker_url=broker_url, database_url=database_url) as fleet:
        apply_program(fleet.engine, receiver.url, WAIT_SECONDS, versioned_wait)
        fleet.start()
        time.sleep(1)  # trigger caches (FLEET_TRIGGER_CACHE_SECONDS=0.5)
        try:
            yield fleet, receiver
        finally:
            result.seconds = round(time.monotonic() - started, 1)
            result.figures["worker_rss_mb_end"] = fleet.rss_mb()


# --------------------------------------------------------------------------- scenarios


def kill_workers(events: int = 2000, rate: float = 100, users: int = 300,
                 every: float = 3.0) -> ChaosResult:
    """kill -9 of workers in a loop under load: main processes and pool children, every queue."""
    result = ChaosResult("kill-workers")
    targets = itertools.cycle([(EVENTS, "main"), (WORKFLOWS, "child"), (ACTIONS, "main"),
                               (EVENTS, "child"), (WORKFLOWS, "main"), (ACTIONS, "child")])
    with running_fleet(result) as (fleet, receiver):
        publisher = Publisher(fleet, EventStream(uuid.uuid4().hex[:8], users))
        sender = in_background(lambda: publisher.run(events, rate))
        while sender.is_alive():
            time.sleep(every)
            queue, what = next(targets)
            if what == "main":
                fleet.kill_worker(queue)
            else:
                fleet.kill_pool_child(queue)
        sender.join()
        result.injected = list(fleet.kills)
        fleet.wait_workers()
        return finish(fleet, publisher, receiver, result, timeout=TIMEOUT)


def redis_restart(events: int = 1500, rate: float = 100, users: int = 300,
                  restarts: int = 2) -> ChaosResult:
    """The broker restarted (twice) while producers publish and workers consume.

    Runs on a Valkey of its own (the embedded one, append-only file on), so the
    configured broker is never touched. Webhooks answer after 0.3 s, so operator
    calls are in flight when the connections drop: none may run twice at once.
    Producers write to the outbox: kombu's Redis transport can drop a message popped
    at the instant of a restart, which only the relay's confirmation recovers
    (a direct `send_event` cannot; RELIABILITY.md).
    """
    result = ChaosResult("redis-restart")
    with own_valkey() as (broker, port), \
            running_fleet(result, broker_url=f"redis://127.0.0.1:{port}/0",
                          webhook_delay=0.3) as (fleet, receiver):
        publisher = Publisher(fleet, EventStream(uuid.uuid4().hex[:8], users), outbox=True)
        sender = in_background(lambda: publisher.run(events, rate))
        pause = events / rate / (restarts + 1)
        for n in range(restarts):
            time.sleep(pause)
            down = time.monotonic()
            broker.stop_valkey()
            time.sleep(1.0)
            broker.start_valkey(port, exact=True)
            result.injected.append(f"restart {n + 1}: broker down {time.monotonic() - down:.1f}s")
        sender.join()
        return finish_through_outbox(fleet, publisher, receiver, result)


def pg_terminate(events: int = 1500, rate: float = 100, users: int = 300,
                 every: float = 0.05) -> ChaosResult:
    """Every fleet connection to PostgreSQL terminated every 50 ms while events flow."""
    result = ChaosResult("pg-terminate")
    with running_fleet(result) as (fleet, receiver):
        publisher = Publisher(fleet, EventStream(uuid.uuid4().hex[:8], users))
        stop = threading.Event()
        killed: list[int] = []
        killer = in_background(lambda: killed.append(
            terminate_connections(fleet.engine, stop, every)))
        publisher.run(events, rate)
        stop.set()
        killer.join()
        result.injected.append(f"{killed[0]} backends terminated")
        return finish(fleet, publisher, receiver, result, timeout=TIMEOUT)


def terminate_connections(engine: Engine, stop: threading.Event, every: float) -> int:
    """Terminate the fleet's backends of `engine`'s database until `stop`; returns how many."""
    admin = create_engine(engine.url)
    killed = 0
    try:
        with admin.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            while not stop.is_set():
                killed += len(conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'lifecycle-fleet' "
                    "AND pid <> pg_backend_pid()")).all())
                time.sleep(every)
    finally:
        admin.dispose()
    return killed


@contextmanager
def own_valkey() -> Iterator[tuple[Any, int]]:
    """A Valkey of the run's own (embedded, append-only file on): the broker to hurt."""
    from workers.dev.embedded import EmbeddedServices

    with tempfile.TemporaryDirectory(prefix="fleet-chaos-redis-") as home:
        broker = EmbeddedServices(Path(home))
        port = broker.start_valkey()
        try:
            yield broker, port
        finally:
            broker.stop_valkey()


def finish_through_outbox(fleet: ChaosFleet, publisher: Publisher, receiver: WebhookServer,
                          result: ChaosResult) -> ChaosResult:
    """`finish` once the workers answer again, with how many outbox rows were re-published."""
    fleet.wait_workers()
    finish(fleet, publisher, receiver, result, timeout=TIMEOUT)
    result.figures["outbox_published_again"] = fleet.scalar(text(
        "SELECT count(*) FROM event_outbox WHERE retry_count > 0"))
    return result


@contextmanager
def own_postgres() -> Iterator[tuple[Any, int, str]]:
    """A PostgreSQL server of the run's own (embedded), so it can be stopped and choked."""
    from workers.dev.embedded import EmbeddedServices

    with tempfile.TemporaryDirectory(prefix="fleet-chaos-pg-") as home:
        server = EmbeddedServices(Path(home))
        port = server.start_postgres()
        try:
            yield server, port, f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            server.stop_postgres("immediate")
            server.discard()  # its files may live outside the home folder (run as root)


def pg_stop(events: int = 1500, rate: float = 25, users: int = 300,
            down: float = 60.0) -> ChaosResult:
    """The PostgreSQL server stopped for `down` seconds while events flow, then started again.

    Unlike terminated backends, a stopped server refuses every new connection
    (psycopg raises without a SQLSTATE): ingest, steps, operator calls, the poison
    guard and dead letters all fail for the whole time, and every message must
    wait it out. Producers publish single events and batches straight to the broker.
    """
    result = ChaosResult("pg-stop")
    with own_postgres() as (server, port, url), \
            running_fleet(result, database_url=url) as (fleet, receiver):
        publisher = Publisher(fleet, EventStream(uuid.uuid4().hex[:8], users))
        sender = in_background(lambda: publisher.run(events, rate))
        time.sleep(min(10.0, events / rate / 4))
        fleet.engine.dispose()
        stopped = time.monotonic()
        server.stop_postgres("fast")
        sent_before = publisher.sent.sent
        time.sleep(down)
        server.start_postgres(port, exact=True)
        result.injected.append(
            f"PostgreSQL stopped {time.monotonic() - stopped:.1f}s (pg_ctl stop -m fast); "
            f"{publisher.sent.sent - sent_before} events published meanwhile")
        sender.join()
        return finish(fleet, publisher, receiver, result, timeout=TIMEOUT + down)


def pg_slots(events: int = 1500, rate: float = 50, users: int = 300,
             hold: float = 30.0) -> ChaosResult:
    """Every PostgreSQL connection slot taken by another client for `hold` seconds.

    New connections fail with "too many clients" (SQLSTATE 53300) until the slots
    are given back; the fleet's pools lose connections to the backend terminations
    that make room for the hog.
    """
    import psycopg

    result = ChaosResult("pg-slots")
    with own_postgres() as (_server, port, url), \
            running_fleet(result, database_url=url) as (fleet, receiver):
        publisher = Publisher(fleet, EventStream(uuid.uuid4().hex[:8], users))
        sender = in_background(lambda: publisher.run(events, rate))
        time.sleep(min(5.0, events / rate / 4))
        hog: list[psycopg.Connection[Any]] = []
        admin = psycopg.connect(url, autocommit=True)
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = 'lifecycle-fleet'")
        try:
            while True:
                hog.append(psycopg.connect(url, connect_timeout=3))
        except psycopg.OperationalError as exc:
            result.injected.append(f"{len(hog) + 1} connections held for {hold:.0f}s: "
                                   f"{str(exc).strip().splitlines()[-1][:120]}")
        time.sleep(hold)
        for conn in [*hog, admin]:
            conn.close()
        sender.join()
        return finish(fleet, publisher, receiver, result, timeout=TIMEOUT)


def redis_full(events: int = 1500, rate: float = 100, users: int = 300,
               hold: float = 15.0) -> ChaosResult:
    """The broker at `maxmemory` (noeviction) for `hold` seconds while events flow.

    Redis refuses every write with an OOM error: producers get `PublishError`
    (their events are not counted as sent), workers must stay up and back off.
    Producers write to the outbox, which covers the one event a worker may pop
    just before Redis refuses to record it as unacknowledged (RELIABILITY.md).
    """
    import redis as redis_client

    result = ChaosResult("redis-full")
    with own_valkey() as (_broker, port), \
            running_fleet(result, broker_url=f"redis://127.0.0.1:{port}/0") as (fleet, receiver), \
            closing(redis_client.Redis(port=port)) as client:
        publisher = Publisher(fleet, EventStream(uuid.uuid4().hex[:8], users), outbox=True)
        sender = in_background(lambda: publisher.run(events, rate))
        time.sleep(events / rate / 3)
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(used + 2 * 2**20))
        junk = 0

        def top_up() -> None:  # until not even a small write fits (consumers free memory)
            nonlocal junk
            for size in (65536, 4096, 256):  # a refused large write frees its buffer
                try:
                    while True:
                        client.set(f"chaos-junk:{junk}", b"x" * size)
                        junk += 1
                except redis_client.exceptions.OutOfMemoryError:
                    pass

        refused = 0  # direct producers meanwhile: PublishError, nothing else
        for _ in range(10):
            top_up()
            try:
                send_event("chaos.direct", user="chaos-direct@example.com", via=fleet.app)
            except PublishError:
                refused += 1
        result.figures["direct_publishes_refused"] = refused
        time.sleep(hold)
        client.delete(*[f"chaos-junk:{n}" for n in range(junk)])
        client.config_set("maxmemory", "0")
        result.injected.append(f"Redis full (maxmemory, noeviction) for {hold:.0f}s")
        sender.join()
        return finish_through_outbox(fleet, publisher, receiver, result)


def _publish_raw(fleet: ChaosFleet, body: Any, queue: str, **headers: Any) -> None:
    from kombu import Exchange

    # Bytes go as they are, declared as JSON; anything else is serialized as JSON.
    encoding: dict[str, Any] = ({"content_type": "application/json", "content_encoding": "utf-8"}
                                if isinstance(body, bytes) else {"serializer": "json"})
    with fleet.app.producer_or_acquire() as producer:
        producer.publish(body, exchange=Exchange(queue, type="direct"), routing_key=queue,
                         headers=headers or None, **encoding)


def _junk(fleet: ChaosFleet, marker: str) -> None:
    send_events([{"event_type": "chaos.junk", "user": f"{marker}@example.com",
                  "data": {"blob": marker + "x" * 3_000_000}}], validate=False, via=fleet.app)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# One publisher per kind of hostile message; each carries its marker in its body.
POISON: dict[str, Callable[[ChaosFleet, str], None]] = {
    "undecodable body": lambda f, m: _publish_raw(f, b"\xff\xfe{" + m.encode(), EVENTS,
                                                  task=TaskNames.INGEST, id=str(uuid.uuid4())),
    "not a task message": lambda f, m: _publish_raw(f, {"marker": m}, EVENTS),
    "unknown task": lambda f, m: f.app.send_task("events.no_such_task", args=[m], queue=EVENTS),
    "step id jsonb refuses": lambda f, m: f.app.send_task(TaskNames.STEP, args=["\ud800" + m, 0],
                                                         queue=WORKFLOWS),
    "internal task sent to the events queue": lambda f, m: f.app.send_task(
        TaskNames.RETENTION, args=[m], queue=EVENTS),
    "past its expiry": lambda f, m: f.app.send_task(
        TaskNames.STEP, args=[m, 0], expires=_now() - dt.timedelta(minutes=5)),
    "ETA a year ahead": lambda f, m: f.app.send_task(
        TaskNames.STEP, args=[m, 0], eta=_now() + dt.timedelta(days=365)),
    "3 MB junk event": _junk,
}


def poison(events: int = 1500, rate: float = 100, users: int = 300) -> ChaosResult:
    """Hostile messages of every kind mixed into the stream: one dead letter each, workers up."""
    result = ChaosResult("poison")
    with running_fleet(result) as (fleet, receiver):
        publisher = Publisher(fleet, EventStream(uuid.uuid4().hex[:8], users))
        sender = in_background(lambda: publisher.run(events, rate))
        markers = {kind: uuid.uuid4().hex for kind in POISON}
        for kind, send in POISON.items():
            send(fleet, markers[kind])
            time.sleep(0.2)
        sender.join()
        finish(fleet, publisher, receiver, result, timeout=TIMEOUT)

        def letters(marker: str) -> int:
            return int(fleet.scalar(text(
                "SELECT count(*) FROM dead_letters WHERE position(CAST(:b AS bytea) IN "
                "raw_payload) > 0 OR strpos(reason, :t) > 0"), {"b": marker.encode(), "t": marker}))

        try:
            fleet.wait_until(lambda: all(letters(m) for m in markers.values()), 60,
                             "a dead letter for every poison message")
        except TimeoutError as exc:
            result.invariants.violations.append(str(exc))
        counts = {kind: letters(marker) for kind, marker in markers.items()}
        result.injected += [f"{kind}: {n} dead letter(s)" for kind, n in counts.items()]
        result.invariants.violations += [f"{kind}: {n} dead letters, expected 1"
                                         for kind, n in counts.items() if n != 1]
        if dead := fleet.sup.dead():
            result.invariants.violations.append(f"{', '.join(dead)} died")
        return result


def retention(events: int = 1500, rate: float = 100, users: int = 300,
              old_rows: int = 5000) -> ChaosResult:
    """Retention detaches, archives and drops an expired audit partition while events flow."""
    result = ChaosResult("retention")
    today = dt.datetime.now(dt.UTC).date()
    old = range_containing("lifecycle_events", today - dt.timedelta(days=3 * 365))
    with running_fleet(result) as (fleet, receiver), \
            tempfile.TemporaryDirectory(prefix="fleet-chaos-archive-") as archive:
        _old_audit_rows(fleet.engine, old.start, old_rows)
        publisher = Publisher(fleet, EventStream(uuid.uuid4().hex[:8], users))
        sender = in_background(lambda: publisher.run(events, rate))
        time.sleep(events / rate / 3)
        from workers.retention import run_retention

        attempts = 0
        while True:
            attempts += 1
            try:
                report = run_retention(fleet.engine, Path(archive), today)
                break
            except Exception as exc:  # a lock timeout under load: the nightly job retries
                if attempts >= 5:
                    raise
                result.injected.append(f"retention attempt {attempts}: {str(exc).splitlines()[0][:200]}")
        result.injected.append(f"retention dropped {', '.join(report.dropped)} "
                               f"while events flowed (attempt {attempts})")
        sender.join()
        finish(fleet, publisher, receiver, result, timeout=TIMEOUT)
        left = fleet.scalar(text("SELECT count(*) FROM lifecycle_events WHERE created_at < :end"),
                            {"end": old.end})
        manifest = Path(archive) / f"{old.name}.manifest.json"
        archived = manifest.exists() and f'"rows": {old_rows}' in manifest.read_text()
        result.figures.update(old_rows=old_rows, old_rows_left=left, archived=archived,
                              dropped=report.dropped)
        if old.name not in report.dropped:
            result.invariants.violations.append(f"{old.name} was not dropped")
        if left:
            result.invariants.violations.append(f"{left} expired audit rows are still there")
        if not archived:
            result.invariants.violations.append(f"the archive of {old.name} lacks its rows")
        return result


def _old_audit_rows(engine: Engine, day: dt.date, rows: int) -> None:
    """An expired month of audit rows, in a partition of its own."""
    from db.partitions import ensure_partition

    with engine.begin() as conn:
        ensure_partition(conn, range_containing("lifecycle_events", day))
        user = conn.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage) "
            "VALUES ('chaos-old@example.com', 'Acquisition') RETURNING id")).scalar_one()
        conn.execute(text(
            "INSERT INTO lifecycle_events (event_type, user_id, lifecycle_stage, event_data, "
            "created_at, event_id) SELECT 'chaos.old', :u, 'Acquisition', '{}'::jsonb, "
            ":day + (i * interval '1 minute'), gen_random_uuid() FROM generate_series(1, :n) i"),
            {"u": user, "day": day, "n": rows})


def version_deploy(executions: int = 1000, wait_seconds: int = 60,
                   newer: int = 100) -> ChaosResult:
    """A new version deployed while `executions` of the old one wait on timers.

    Each execution waits `wait_seconds` on a timer, then records in `ran` which
    definition ran it; the deploy happens once all of them wait and none has woken.
    """
    result = ChaosResult("version-deploy")
    with running_fleet(result, versioned_wait=wait_seconds) as (fleet, receiver):
        run = uuid.uuid4().hex[:8]
        publisher = Publisher(fleet, EventStream(run, users=0))
        first = _enrol(publisher, run, 0, executions)
        fleet.wait_until(lambda: _resting(fleet) >= executions, wait_seconds,
                         f"{executions} executions waiting on their timer")
        with Session(fleet.engine) as session, session.begin():
            deploy_workflow(session, VERSIONED, versioned_xml("v2", wait_seconds),
                            stages=[], activate=True)
        woken_before = fleet.scalar(text("SELECT count(*) FROM workflow_executions "
                                         "WHERE status <> 'running'"))
        time.sleep(1)  # trigger caches
        second = _enrol(publisher, run, executions, newer)
        result.injected.append(f"v2 deployed while {executions} executions of v1 waited "
                               f"({woken_before} had ended)")
        finish(fleet, publisher, receiver, result, timeout=TIMEOUT + wait_seconds)
        with fleet.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT u.email, e.workflow_version, e.variables->>'ran' FROM workflow_executions e "
                "JOIN users u ON u.id = e.user_id")).all()
        stored = {email: (version, ran) for email, version, ran in rows}
        old = {stored.get(email) for email in first}
        new = {stored.get(email) for email in second}
        result.figures.update(old_executions=len(first), new_executions=len(second),
                              old_ran=sorted(map(str, old)), new_ran=sorted(map(str, new)))
        if woken_before:
            result.invariants.violations.append(f"{woken_before} executions ended before the "
                                                "deploy: the scenario proved nothing for them")
        old_run, new_run = _the_one(old), _the_one(new)
        if not (old_run and new_run and old_run[1] == "v1" and new_run[1] == "v2"
                and old_run[0] != new_run[0]):
            result.invariants.violations.append(
                f"(stored version, definition that ran): old executions {old}, new ones {new}")
        return result


def _the_one(runs: set[tuple[Any, Any] | None]) -> tuple[Any, Any] | None:
    """The (stored version, definition that ran) shared by a group of executions, if one is."""
    return next(iter(runs)) if len(runs) == 1 else None


def _enrol(publisher: Publisher, run: str, start: int, count: int) -> list[str]:
    emails = [f"chaos-{run}-{n}@example.com" for n in range(start, start + count)]
    for i in range(0, count, 100):
        batch: list[dict[str, Any]] = [{"event_id": str(uuid.uuid4()), "event_type": ENROLLED, "user": email,
                  "data": {"run": run}} for email in emails[i:i + 100]]
        send_events(batch, validate=False, via=publisher.fleet.app)
        publisher.sent.good += [e["event_id"] for e in batch]
        publisher.sent.signups += len(batch)
    return emails


def _resting(fleet: ChaosFleet) -> int:
    return int(fleet.scalar(text(
        "SELECT count(*) FROM workflow_executions e JOIN workflows w ON w.id = e.workflow_id "
        "WHERE w.name = :w AND e.status = 'running' AND e.step_enqueued_at IS NULL "
        "AND e.wake_at IS NOT NULL"), {"w": VERSIONED}))


SCENARIOS: dict[str, Callable[..., ChaosResult]] = {
    "kill-workers": kill_workers,
    "redis-restart": redis_restart,
    "pg-terminate": pg_terminate,
    "pg-stop": pg_stop,
    "pg-slots": pg_slots,
    "redis-full": redis_full,
    "poison": poison,
    "retention": retention,
    "version-deploy": version_deploy,
}
