"""Scheduled journeys with real workers: the beat's sweep starts a due schedule, and a
run whose segments worker is killed (SIGKILL, mid-run) is resumed by the sweep with
every member started exactly once.

A broker namespace of its own (tests/fleet_namespace.py): one worker steps workflows
and sweeps (workflows, events, maintenance), each test starts the `segments` workers
that do the runs. No beat process: the test sends `segments.start_due_schedules` as
the beat would (with a short heartbeat age where a dead run must be found at once).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from db.session import session_scope
from tests.fleet_namespace import Fleet, own_fleet, per_test
from tests.helpers import wait_for
from tests.workflow_helpers import deploy
from workers.queues import TaskNames
from workers.schedules import runs

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def module_fleet() -> Iterator[Fleet]:
    with own_fleet("schedules", "workflows,events,maintenance",
                   # A short reaper cutoff: first steps lost with the killed worker are re-sent soon.
                   FLEET_STUCK_STEP_SECONDS="3") as fleet:
        yield fleet


@pytest.fixture()
def fleet(module_fleet: Fleet) -> Iterator[Fleet]:
    yield from per_test(module_fleet)


def _members(tag: str, count: int) -> set[uuid.UUID]:
    with session_scope() as session:
        return set(session.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage, attributes) "
            "SELECT 'sw-' || :t || '-' || i || '@example.com', 'Acquisition', "
            "jsonb_build_object('tag', CAST(:t AS text)) FROM generate_series(1, :n) i "
            "RETURNING id"), {"t": tag, "n": count}).scalars())


def _due_schedule(tag: str, batch_size: int) -> tuple[str, uuid.UUID]:
    """An hourly schedule over the tag's segment, due a second ago; (name, workflow id)."""
    workflow = deploy("minimal.bpmn")
    name = f"sched-{tag}"
    now = dt.datetime.now(dt.UTC)
    with session_scope() as session:
        segment_id = session.execute(text(
            "INSERT INTO user_segments (name, conditions) VALUES (:n, CAST(:c AS jsonb)) "
            "RETURNING id"), {"n": f"seg-{tag}", "c": json.dumps(
                {"field": "user.attributes.tag", "op": "eq", "value": tag})}).scalar_one()
        workflow_id = session.execute(text("SELECT id FROM workflows WHERE name = :n"),
                                      {"n": workflow}).scalar_one()
        runs.upsert(session, name, runs.ScheduleValues(
            workflow_id, runs.When("interval", interval_seconds=3600), segment_id, batch_size),
            now)
        session.execute(text("UPDATE workflow_schedules SET next_run_at = :t WHERE name = :n"),
                        {"t": now - dt.timedelta(seconds=1), "n": name})
    return name, workflow_id


def _run_of(name: str) -> Any:
    with session_scope() as session:
        return session.execute(text(
            "SELECT r.* FROM workflow_schedule_runs r JOIN workflow_schedules s "
            "ON s.id = r.schedule_id WHERE s.name = :n"), {"n": name}).one_or_none()


def _executions(workflow_id: uuid.UUID) -> list[Any]:
    with session_scope() as session:
        return list(session.execute(text(
            "SELECT user_id, status FROM workflow_executions WHERE workflow_id = :w"),
            {"w": workflow_id}))


def _wait_all_completed(fleet: Fleet, workflow_id: uuid.UUID, count: int,
                        timeout: float) -> None:
    last_reap = 0.0

    def done() -> bool:
        nonlocal last_reap
        rows = _executions(workflow_id)
        if len(rows) == count and all(r.status == "completed" for r in rows):
            return True
        if time.monotonic() - last_reap > 2:  # as the beat's reaper would
            fleet.app.send_task(TaskNames.REAP_STUCK)
            last_reap = time.monotonic()
        return False
    wait_for(done, timeout=timeout, interval=0.3, message=f"{count} executions to complete")


def test_the_beat_sweep_starts_a_due_schedule_whose_executions_complete(fleet: Fleet) -> None:
    tag = uuid.uuid4().hex[:8]
    members = _members(tag, 40)
    name, workflow_id = _due_schedule(tag, batch_size=7)
    fleet.start_workers("segments")
    fleet.app.send_task(TaskNames.START_DUE_SCHEDULES)
    wait_for(lambda: (r := _run_of(name)) is not None and r.status == "completed",
             timeout=60, message="the run to complete")
    run = _run_of(name)
    assert (run.started, run.skipped, run.batches) == (40, 0, 6)
    _wait_all_completed(fleet, workflow_id, 40, timeout=90)
    assert {r.user_id for r in _executions(workflow_id)} == members
    with session_scope() as session:
        next_run = session.execute(text("SELECT next_run_at FROM workflow_schedules "
                                        "WHERE name = :n"), {"n": name}).scalar_one()
    assert next_run > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=50)


def test_a_run_whose_worker_is_killed_resumes_and_starts_every_member_once(
        fleet: Fleet) -> None:
    tag = uuid.uuid4().hex[:8]
    members = _members(tag, 1500)
    name, workflow_id = _due_schedule(tag, batch_size=7)
    (first,) = fleet.start_workers("segments")
    fleet.app.send_task(TaskNames.START_DUE_SCHEDULES)
    wait_for(lambda: (r := _run_of(name)) is not None and r.batches >= 5, timeout=60,
             interval=0.01, message="the run's fifth batch")
    os.killpg(first.proc.pid, signal.SIGKILL)  # the machine is gone, mid-run
    first.proc.wait()
    killed = _run_of(name)
    assert killed.status == "running" and 0 < killed.started < 1500, killed
    fleet.start_workers("segments")
    time.sleep(1.1)  # the dead run's heartbeat is older than the sweep's age below

    def resumed() -> bool:
        run = _run_of(name)
        if run.status == "completed":
            return True
        fleet.app.send_task(TaskNames.START_DUE_SCHEDULES, kwargs={"stale_seconds": 1.0})
        return False
    wait_for(resumed, timeout=120, interval=1.5, message="the run to be resumed and complete")
    run = _run_of(name)
    assert (run.started, run.skipped) == (1500, 0)
    rows = _executions(workflow_id)
    assert len(rows) == 1500 and {r.user_id for r in rows} == members  # each exactly once
    _wait_all_completed(fleet, workflow_id, 1500, timeout=180)
