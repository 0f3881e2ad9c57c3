"""Faults injected into a running fleet; afterwards nothing is lost and nothing is doubled."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import Engine, create_engine, text

from tests.helpers import SERVERS, WorkerProcess, wait_for
from workers.producer import send_event, send_events
from workers.settings import to_sqlalchemy_url

pytestmark = pytest.mark.servers


def _terminate_fleet_connections(stop: threading.Event, every: float) -> int:
    """Kill every fleet backend of the test database, again and again, mid-transaction or not."""
    admin = create_engine(to_sqlalchemy_url(SERVERS.database_url))
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


def test_connections_killed_mid_transaction_lose_and_double_nothing(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    run = uuid.uuid4().hex[:8]
    sent: list[str] = []
    stop = threading.Event()
    result: list[int] = []
    killer = threading.Thread(target=lambda: result.append(
        _terminate_fleet_connections(stop, every=0.05)))
    killer.start()
    try:
        for i in range(300):
            sent.append(str(send_event(f"fault.t{run}", user=f"fault-{run}-{i % 30}@example.com",
                                       data={"i": i})))
        for chunk in range(10):
            batch = [{"event_id": str(uuid.uuid4()), "event_type": f"fault.t{run}",
                      "user": f"fault-{run}-{j}@example.com", "data": {"chunk": chunk}}
                     for j in range(20)]
            send_events(batch)
            sent += [e["event_id"] for e in batch]
        time.sleep(3)  # keep killing while the worker drains
    finally:
        stop.set()
        killer.join()
    assert result and result[0] > 0  # connections were really killed

    def counts() -> tuple[int, int]:
        with engine.connect() as conn:
            return tuple(conn.execute(text(
                "SELECT count(*), count(DISTINCT event_id) FROM lifecycle_events "
                "WHERE event_type = :t"), {"t": f"fault.t{run}"}).one())  # type: ignore[return-value]

    total, distinct = wait_for(lambda: (c := counts())[1] >= len(sent) and c, timeout=120,
                               message="every event to be ingested after the faults")
    assert (total, distinct) == (len(sent), len(sent))
    with engine.connect() as conn:
        letters = conn.execute(text("SELECT count(*) FROM dead_letters "
                                    "WHERE event_id = ANY(CAST(:ids AS uuid[]))"),
                               {"ids": sent}).scalar_one()
    assert letters == 0
