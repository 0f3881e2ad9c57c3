"""The send gateway with real workers on real PostgreSQL: races, timers, restarts, kill -9.

The module runs on a broker namespace of its own (a key prefix), so no other worker
of the session takes its messages: one worker steps workflows, ingests events and
runs the timer sweep for the whole module; each test starts the `actions` workers
(where the gateway decides) it needs, with prefetch 1, so that two of them really
share the sends. No beat runs: a test sends `workflows.wake_due_timers` itself.

The program's messaging policy is written by the test that needs it and removed
afterwards; the fixture waits until running workers have re-read it (they check
every FLEET_TRIGGER_CACHE_SECONDS). The direct-call tests with fixed clocks are in
tests/test_send_gateway.py.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text

from db.session import session_scope
from tests.fleet_namespace import Fleet, own_fleet, per_test
from tests.helpers import TRIGGER_CACHE_SECONDS, WorkerProcess, wait_for
from tests.workflow_helpers import deploy, execution, new_user, store_messaging
from workers.events.envelope import UNSUBSCRIBED
from workers.producer import send_event
from workers.queues import TaskNames
from workers.sends.holdout import in_holdout

pytestmark = pytest.mark.servers

KOLKATA = ZoneInfo("Asia/Kolkata")  # UTC+5:30
# A deferral must be decided before the window opens: the step and the call take this at most.
DECISION_MARGIN = dt.timedelta(seconds=6)


@pytest.fixture(scope="module")
def module_fleet() -> Iterator[Fleet]:
    """The namespace, with the worker that steps workflows, ingests events and sweeps timers."""
    with own_fleet("sends", "workflows,events,maintenance") as fleet:
        yield fleet


@pytest.fixture()
def fleet(module_fleet: Fleet) -> Iterator[Fleet]:
    """The module's fleet; the actions workers a test starts are stopped after it."""
    yield from per_test(module_fleet)


@pytest.fixture()
def policy() -> Iterator[Callable[[dict[str, Any]], None]]:
    """Write the program's messaging policy for one test; it is removed afterwards."""
    def set_policy(value: dict[str, Any]) -> None:
        store_messaging(value)
        time.sleep(3 * TRIGGER_CACHE_SECONDS)  # a running worker re-reads it within one
    yield set_policy
    store_messaging(None)


# --------------------------------------------------------------------------- reading the outcome


def _rows(sql: str, **params: Any) -> list[Any]:
    with session_scope() as session:
        return list(session.execute(text(sql), params).all())


def _count(sql: str, **params: Any) -> int:
    with session_scope() as session:
        return int(session.execute(text(sql), params).scalar_one())


def _wait_completed(ids: Sequence[uuid.UUID], timeout: float) -> None:
    def ended() -> bool:
        return _count("SELECT count(*) FROM workflow_executions WHERE id = ANY(:ids) "
                      "AND status IN ('completed', 'failed', 'cancelled', 'stalled')",
                      ids=list(ids)) == len(ids)
    wait_for(ended, timeout=timeout, interval=0.2, message=f"{len(ids)} executions to end")
    statuses = Counter(row.status for row in _rows(
        "SELECT status FROM workflow_executions WHERE id = ANY(:ids)", ids=list(ids)))
    assert statuses == {"completed": len(ids)}, statuses


def _unfinished(ids: Sequence[uuid.UUID], wait: float) -> list[uuid.UUID]:
    """The executions of `ids` still active after up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        active = [row.id for row in _rows("SELECT id FROM workflow_executions WHERE "
                                          "id = ANY(:ids) AND status IN ('pending', 'running')", ids=list(ids))]
        if not active or time.monotonic() > deadline:
            return active
        time.sleep(0.5)


def _sends(ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[Any]]:
    """Each execution's `sends` rows."""
    found: dict[uuid.UUID, list[Any]] = {execution_id: [] for execution_id in ids}
    for row in _rows("SELECT * FROM sends WHERE execution_id = ANY(:ids)", ids=list(ids)):
        found[row.execution_id].append(row)
    return found


def _messages_by_key(ids: Sequence[uuid.UUID]) -> Counter[str]:
    return Counter(row.idempotency_key for row in _rows(
        "SELECT idempotency_key FROM message_log WHERE execution_id = ANY(:ids)", ids=list(ids)))


def _logged(worker: WorkerProcess, event: str) -> int:
    """How many JSON log lines of the worker are `event`."""
    return worker.log().count(f'"event": "{event}"')


# --------------------------------------------------------------------------- caps


def test_two_workers_racing_sends_to_one_user_let_one_through_a_cap_of_one(
        fleet: Fleet, policy: Callable[[dict[str, Any]], None]) -> None:
    policy({"caps": [{"max": 1, "per": "24h"}]})
    workers = fleet.start_workers("actions", count=2)
    user = new_user()
    ids = fleet.start(deploy("one_send.bpmn"), [user] * 20)
    _wait_completed(ids, timeout=90)
    sends = _sends(ids)
    assert all(len(rows) == 1 for rows in sends.values()), sends
    assert Counter(rows[0].outcome for rows in sends.values()) == {"sent": 1, "capped": 19}
    assert _count("SELECT count(*) FROM message_log WHERE user_id = :u", u=user) == 1
    decided = [_logged(worker, "send.decided") for worker in workers]
    assert all(decided), f"sends decided per worker: {decided}"  # both took part


# --------------------------------------------------------------------------- deferred sends


def _next_opening() -> tuple[dt.datetime, str]:
    """The first minute boundary at least DECISION_MARGIN away, and a window opening then.

    In Kolkata's time (a half-hour offset, so its minutes are UTC's); the window lasts
    two hours, crossing midnight if it must.
    """
    soon = dt.datetime.now(dt.UTC) + DECISION_MARGIN
    opening = soon.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    local = opening.astimezone(KOLKATA)
    return opening, f"{local:%H:%M}-{local + dt.timedelta(hours=2):%H:%M}"


def _wait_deferred(execution_id: uuid.UUID, opening: dt.datetime) -> None:
    """Until the execution's send is put off to `opening`, decided before it."""
    def decided() -> Any:
        rows = _rows("SELECT d.status, d.run_after, s.outcome, s.deferred_until, s.deferrals "
                     "FROM action_deliveries d JOIN sends s ON s.key = d.key "
                     "WHERE d.execution_id = :e", e=execution_id)
        return rows[0] if rows else None
    row = wait_for(decided, timeout=30, interval=0.1, message="the send to be decided")
    assert dt.datetime.now(dt.UTC) < opening, "the send was decided after its window opened"
    assert (row.status, row.outcome, row.deferrals) == ("deferred", "deferred", 1), row
    assert row.run_after == row.deferred_until == opening, (row, opening)
    waiting = execution(execution_id)
    assert (waiting.status, waiting.wake_at, waiting.step_enqueued_at) == \
        ("running", opening, None)


def test_deferred_sends_are_decided_again_when_the_timer_sweep_releases_them(
        fleet: Fleet, policy: Callable[[dict[str, Any]], None]) -> None:
    """Two sends wait for one opening (one wait, not two): the first goes out at the
    opening; the second's user unsubscribes while it waits, and it is suppressed."""
    fleet.start_workers("actions")
    opening, hours = _next_opening()
    policy({"timezone": "Asia/Kolkata", "send_window": {"hours": hours}})
    staying, leaving = new_user(), new_user()
    kept, dropped = ids = fleet.start(deploy("one_send.bpmn"), [staying, leaving])
    for execution_id in ids:
        _wait_deferred(execution_id, opening)
    send_event(UNSUBSCRIBED, user=leaving, data={"channel": "email"}, via=fleet.app)
    wait_for(lambda: _rows("SELECT 1 FROM user_consents WHERE user_id = :u AND channel = 'email' "
                           "AND NOT subscribed", u=leaving), timeout=60,
             message="the unsubscribe to be ingested")
    wait = max((opening - dt.datetime.now(dt.UTC)).total_seconds(), 0)
    for execution_id in ids:  # only the sweep wakes them: nothing else is sent
        fleet.wake_timers_until(execution_id, "completed", timeout=wait + 60)
    sends = _sends(ids)
    assert [len(rows) for rows in sends.values()] == [1, 1], sends
    (sent,), (suppressed,) = sends[kept], sends[dropped]
    assert (sent.outcome, sent.deferrals, sent.deferred_until) == ("sent", 1, opening)
    assert sent.sent_at >= sent.deferred_until
    assert (suppressed.outcome, suppressed.deferrals, suppressed.sent_at) == \
        ("suppressed", 1, None)
    assert "unsubscribed from email" in suppressed.reason
    assert _messages_by_key(ids) == {sent.key: 1}
    seen = [(execution(i).variables or {})["sent"]["outcome"] for i in ids]
    assert seen == ["sent", "suppressed"]  # what a gateway after the send would branch on


# --------------------------------------------------------------------------- holdout


def test_holdout_is_the_same_for_each_user_across_a_worker_restart(
        fleet: Fleet, policy: Callable[[dict[str, Any]], None]) -> None:
    policy({"holdout": {"percent": 50, "salt": "x"}})
    users = [new_user() for _ in range(40)]
    workflow = deploy("one_send.bpmn")
    outcomes = []
    for _ in range(2):  # one worker, then a different process: a restart
        since = len(fleet.workers)
        fleet.start_workers("actions")
        ids = fleet.start(workflow, users)
        _wait_completed(ids, timeout=90)
        by_execution = {rows[0].execution_id: rows[0].outcome for rows in _sends(ids).values()}
        outcomes.append({user: by_execution[execution_id]
                         for user, execution_id in zip(users, ids, strict=True)})
        fleet.stop(since=since)
    expected = {user: "held_out" if in_holdout("x", user, 50) else "sent" for user in users}
    assert outcomes[0] == outcomes[1] == expected
    assert 0 < Counter(expected.values())["held_out"] < len(users)  # both groups were tried
    received = Counter(row.user_id for row in _rows(
        "SELECT user_id FROM message_log WHERE user_id = ANY(:u)", u=users))
    assert received == {user: 2 for user, outcome in expected.items() if outcome == "sent"}


# --------------------------------------------------------------------------- kill -9


def test_kill_9_of_the_actions_worker_mid_sends_delivers_each_send_exactly_once(
        fleet: Fleet) -> None:
    ids = fleet.start(deploy("one_send.bpmn"), [new_user() for _ in range(50)])
    wait_for(lambda: _count("SELECT count(*) FROM action_deliveries WHERE execution_id = ANY(:i)",
                            i=ids) == len(ids), timeout=60, message="the sends to be asked for")
    # Unacked messages of a dead worker come back after the visibility timeout.
    (first,) = fleet.start_workers("actions", FLEET_VISIBILITY_TIMEOUT="6")
    wait_for(lambda: _count("SELECT count(*) FROM sends WHERE execution_id = ANY(:i)",
                            i=ids) >= 10, timeout=60, interval=0.01, message="sends to start")
    os.killpg(first.proc.pid, signal.SIGKILL)  # the machine is gone, mid-sends
    first.proc.wait()
    done = _count("SELECT count(*) FROM sends WHERE execution_id = ANY(:i)", i=ids)
    assert done < len(ids), "every send was decided before the kill"
    (second,) = fleet.start_workers("actions", FLEET_VISIBILITY_TIMEOUT="6")
    # The messages the killed worker had taken (unacked, one per pool process and one
    # prefetched) come back after the visibility timeout and one restore sweep (10 s).
    # One popped by BRPOP but not yet recorded unacked when the kill landed is gone from
    # Redis (RELIABILITY.md); the fleet's answer is the beat's reaper, so it runs here
    # for what is still unfinished then, its 10-minute threshold passed by backdating.
    unfinished = _unfinished(ids, wait=40)
    if unfinished:
        with session_scope() as session:
            session.execute(text("UPDATE workflow_executions SET step_enqueued_at = "
                                 "step_enqueued_at - interval '1 day' WHERE id = ANY(:i)"),
                            {"i": unfinished})
        fleet.app.send_task(TaskNames.REAP_STUCK)
    _wait_completed(ids, timeout=120)
    # Whether kombu flags restored messages `redelivered` depends on which of its restore
    # paths ran, so that flag is not what this test checks.
    sends = _sends(ids)
    assert all([row.outcome for row in rows] == ["sent"] for rows in sends.values()), sends
    keys = {rows[0].key for rows in sends.values()}
    assert _messages_by_key(ids) == {key: 1 for key in keys}
