"""Micro-batched steps and timer messages, against the real database and real workers.

In-process tests call the batch path (`stepper.step_many`, `batch.run`) on the
session's database, with a fixed clock where the call takes one. Worker tests run
real `workflows` workers, each on a broker namespace of its own (a key prefix): no
other worker of the session takes their messages, and a worker can have settings
of its own (no timer messages, say). No beat runs: a sweep happens only where a
test calls it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from celery_batches import SimpleRequest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import ExecutionStatus, WorkflowExecution
from db.session import session_scope
from tests.helpers import SERVERS, WorkerProcess, wait_for
from tests.workflow_helpers import deploy, execution, history, new_user, nodes, wait_status
from workers.broker import delete_prefixed_keys
from workers.celery_app import create_app
from workers.engine import batch, control, dispatch, executions, sandbox, state, stepper, timers
from workers.engine.batch import BatchReport
from workers.engine.stepper import BUSY_RESEND, StepResult
from workers.queues import TaskNames
from workers.retry_policy import OUTAGE_RETRIES
from workers.settings import Settings

pytestmark = pytest.mark.servers

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)  # never stuck in real time: no reaper
LINEAR = ["start", "a", "b", "end"]  # the nodes of batch_linear.bpmn, in order
Step = tuple[uuid.UUID, int]


# --------------------------------------------------------------------------- helpers


def _start_many(workflow: str, variables: Sequence[dict[str, Any]],
                now: dt.datetime | None = None) -> list[uuid.UUID]:
    """Executions of `workflow` (one user, one transaction), one per set of start variables."""
    user_id = new_user()
    with session_scope() as session:
        return [control.start(session, workflow, user_id, v, now=now) for v in variables]


def _step_many(requests: Sequence[Step], now: dt.datetime = NOW) -> list[StepResult]:
    """One batch in one transaction, as `batch.run` runs it."""
    with session_scope() as session:
        return stepper.step_many(session, requests, now=now)


def _request(args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> SimpleRequest:
    """A buffered `workflows.step` message as celery-batches hands it to the task."""
    return SimpleRequest(id=str(uuid.uuid4()), name=TaskNames.STEP, args=tuple(args),
                         kwargs=kwargs or {}, delivery_info={}, hostname="test@localhost",
                         ignore_result=True, reply_to=None, correlation_id=None,
                         request_dict={"retries": 0})


def _histories(execution_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[tuple[int, str, str]]]:
    """(seq, node id, outcome) of every step of each execution, in order, in one query."""
    found: dict[uuid.UUID, list[tuple[int, str, str]]] = defaultdict(list)
    with session_scope() as session:
        for row in session.execute(text(
                "SELECT execution_id, seq, node_id, outcome FROM execution_steps "
                "WHERE execution_id = ANY(:ids) ORDER BY execution_id, seq"),
                {"ids": list(execution_ids)}):
            found[row.execution_id].append((row.seq, row.node_id, row.outcome))
    return found


def _gap_free(steps: Sequence[tuple[int, str, str]]) -> bool:
    return [seq for seq, _, _ in steps] == list(range(1, len(steps) + 1))


def _count(execution_ids: Sequence[uuid.UUID], sql_where: str) -> int:
    with session_scope() as session:
        return int(session.execute(text(
            f"SELECT count(*) FROM workflow_executions WHERE id = ANY(:ids) AND {sql_where}"),
            {"ids": list(execution_ids)}).scalar_one())


def _steps_run(execution_ids: Sequence[uuid.UUID]) -> int:
    with session_scope() as session:
        return int(session.execute(text(
            "SELECT count(*) FROM execution_steps WHERE execution_id = ANY(:ids)"),
            {"ids": list(execution_ids)}).scalar_one())


def _wait_ended(execution_ids: Sequence[uuid.UUID], timeout: float) -> None:
    """Until every execution has ended; then all of them must have completed."""
    wait_for(lambda: _count(execution_ids, "status IN ('completed', 'failed', 'cancelled')")
             == len(execution_ids), timeout=timeout, interval=0.2,
             message=f"{len(execution_ids)} executions to end")
    assert _count(execution_ids, "status = 'completed'") == len(execution_ids)


def _completed(execution_id: uuid.UUID, node_id: str) -> int:
    """How many times `node_id` ran to completion in the execution's history."""
    return nodes(execution_id).count(node_id)


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class Namespace:
    """A broker namespace of a test's own, and a Celery app that sends to it."""

    prefix: str
    app: Celery

    @classmethod
    def new(cls, tag: str) -> Namespace:
        prefix = f"{os.environ['FLEET_BROKER_KEY_PREFIX']}{tag}-{uuid.uuid4().hex[:6]}:"
        urls: dict[str, Any] = {"DATABASE_URL": SERVERS.database_url,
                                "CELERY_BROKER_URL": SERVERS.broker_url}
        return cls(prefix, create_app(Settings(**urls, broker_key_prefix=prefix)))

    def worker(self, concurrency: int = 2, **env: str) -> WorkerProcess:
        worker = WorkerProcess("workflows", concurrency=concurrency,
                               FLEET_BROKER_KEY_PREFIX=self.prefix, **env)
        wait_for(lambda: " ready." in worker.log(), timeout=90, message="the worker to start")
        return worker

    def send(self, steps: Sequence[Step]) -> None:
        """`dispatch.send_steps`, to this namespace."""
        with self.app.producer_or_acquire() as producer:
            for execution_id, version in steps:
                self.app.send_task(TaskNames.STEP, args=[str(execution_id), version],
                                   producer=producer)

    def discard(self) -> None:
        delete_prefixed_keys(SERVERS.broker_url, self.prefix)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Namespace]:
    """A workflows worker with the default settings (timer messages on), on its namespace."""
    namespace = Namespace.new("batch")
    worker = namespace.worker()
    try:
        yield namespace
    finally:
        worker.stop()
        namespace.discard()


def _claim_timers(session: Session, execution_id: uuid.UUID,
                  grace: dt.timedelta) -> tuple[list[Step], list[Step]]:
    """The beat's timer sweep (`workflows.wake_due_timers`): (ours, other tests' claims)."""
    due = timers.claim_due_timers(session, dt.datetime.now(dt.UTC), grace=grace)
    return ([step for step in due if step[0] == execution_id],
            [step for step in due if step[0] != execution_id])


def _sweep(execution_id: uuid.UUID, grace: dt.timedelta) -> list[Step]:
    """A sweep in a transaction of its own; returns what it claimed of ours, to send.

    Other executions it claims (other tests') go to the session's broker, as the
    sweep would send them.
    """
    with session_scope() as session:
        ours, others = _claim_timers(session, execution_id, grace)
    dispatch.send_steps(others)
    return ours


def _wait_timer(execution_id: uuid.UUID) -> WorkflowExecution:
    """Until the execution rests on its timer (polled often: a PT1S timer is soon gone)."""
    def resting() -> WorkflowExecution | None:
        row = execution(execution_id)
        return row if row.wake_at is not None and row.step_enqueued_at is None else None
    row = wait_for(resting, timeout=60, interval=0.02, message="the execution to wait")
    assert row is not None
    return row


def _fired_at(execution_id: uuid.UUID) -> dt.datetime:
    """When the step that ran the timer node began (its batch's start time)."""
    with session_scope() as session:
        return session.execute(text(
            "SELECT started_at FROM execution_steps WHERE execution_id = :i AND node_id = 'wait' "
            "AND outcome = 'completed'"), {"i": execution_id}).scalar_one()


# --------------------------------------------------------------------------- one batch, in process


def test_a_step_message_carries_its_outage_retries_apart_from_its_retries() -> None:
    """A step that rode out an outage keeps its transient retries (workers.retry_policy);
    the headers may hold anything, and none of it is trusted as a count."""
    execution_id = str(uuid.uuid4())
    request = _request([execution_id, 3])
    request.request_dict = {"retries": 41, OUTAGE_RETRIES: 39}
    message = batch.parse(request)
    assert (message.retries, message.outages) == (41, 39)
    for headers in ({"retries": True, OUTAGE_RETRIES: 5}, {"retries": "7", OUTAGE_RETRIES: "x"},
                    {"retries": 2, OUTAGE_RETRIES: 9}):
        request.request_dict = headers
        message = batch.parse(request)
        assert 0 <= message.outages <= message.retries <= 2, headers


def test_two_steps_of_one_execution_run_in_version_order_and_repeats_are_no_ops() -> None:
    e, f = _start_many(deploy("batch_linear.bpmn"), [{}, {}], now=NOW)
    assert _step_many([(e, 0)]) == [StepResult("completed", node_id="start", next_version=1)]
    results = _step_many([(e, 1), (f, 0), (e, 2), (e, 1), (e, 0)])
    assert results == [  # in request order, though e's ran as 0, 1, 1, 2
        StepResult("completed", node_id="a", next_version=2),
        StepResult("completed", node_id="start", next_version=1),
        StepResult("completed", node_id="b", next_version=3),
        StepResult("noop", reason="stale step 1, execution is at 2"),  # the duplicate
        StepResult("noop", reason="stale step 0, execution is at 1"),  # the stale one
    ]
    assert history(e) == [(1, "start", "completed"), (2, "a", "completed"),
                          (3, "b", "completed")]
    assert history(f) == [(1, "start", "completed")]
    row = execution(e)
    assert row.state_version == 3 and row.current_node_id == "b"
    assert (row.variables or {})["n"] == 2 and row.step_enqueued_at == NOW


def test_a_node_that_raises_fails_its_execution_only() -> None:
    good1, bad, good2 = _start_many(deploy("batch_faults.bpmn"),
                                    [{"d": 1, "bad": False}, {"d": 0, "bad": False},
                                     {"d": 4, "bad": False}], now=NOW)
    assert [r.node_id for r in _step_many([(good1, 0), (bad, 0), (good2, 0)])] == ["start"] * 3
    results = _step_many([(good1, 1), (bad, 1), (good2, 1)])
    assert results == [StepResult("completed", node_id="divide", next_version=2),
                       StepResult("failed", node_id="divide"),
                       StepResult("completed", node_id="divide", next_version=2)]
    failed = execution(bad)
    assert failed.status == ExecutionStatus.FAILED and failed.current_node_id == "divide"
    assert (failed.error_message or "").startswith("node divide: ")
    assert "division" in (failed.error_message or "")
    assert history(bad) == [(1, "start", "completed"), (2, "divide", "failed")]
    for execution_id, ratio in ((good1, 10.0), (good2, 2.5)):
        row = execution(execution_id)
        assert row.status == ExecutionStatus.RUNNING and (row.variables or {})["ratio"] == ratio
        assert history(execution_id) == [(1, "start", "completed"), (2, "divide", "completed")]


def test_a_write_postgresql_refuses_splits_the_batch_and_fails_only_its_execution(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past every Python check, PostgreSQL itself refuses one execution's state (a NUL in jsonb)."""
    monkeypatch.setattr(sandbox, "_refuse_unstorable", lambda variables: None)
    monkeypatch.setattr(state, "check_json", lambda value, what: None)
    good1, bad, good2 = _start_many(deploy("batch_faults.bpmn"),
                                    [{"d": 1, "bad": False}, {"d": 1, "bad": True},
                                     {"d": 1, "bad": False}], now=NOW)
    for version in (0, 1):  # start, divide: each is at `store` now
        _step_many([(good1, version), (bad, version), (good2, version)])
    report = batch.run([_request([str(good1), 2]), _request([str(bad), 2]),
                        _request([str(good2), 2])])
    assert report == BatchReport(messages=3, outcomes={"completed": 2, "failed": 1}, split=True,
                                 republished=0, dead_lettered=0)
    failed = execution(bad)
    assert failed.status == ExecutionStatus.FAILED and failed.current_node_id == "store"
    assert (failed.error_message or "").startswith(
        "node store: the execution's state cannot be saved")
    assert "note" not in (failed.variables or {})  # the refused write was rolled back
    assert history(bad)[2:] == [(3, "store", "failed")]
    for execution_id in (good1, good2):
        # `run` sent their next steps: a worker of the session may have run them already
        assert history(execution_id)[:3] == [(1, "start", "completed"), (2, "divide", "completed"),
                                             (3, "store", "completed")]
        assert execution(execution_id).status in (ExecutionStatus.RUNNING,
                                                  ExecutionStatus.COMPLETED)
        assert (execution(execution_id).variables or {})["note"] == "ok"


def test_a_message_that_is_not_a_step_is_dead_lettered_and_the_others_run() -> None:
    good1, good2 = _start_many(deploy("batch_linear.bpmn"), [{}, {}], now=NOW)
    bad = [_request(["not-a-uuid", 0]), _request([str(uuid.uuid4()), "x"]),
           _request([1, 2, 3]), _request([], {"execution_id": str(good1), "junk": 1})]
    good = [_request([str(good1), 0]), _request([], {"execution_id": str(good2),
                                                     "expected_version": 0})]
    report = batch.run([bad[0], good[0], bad[1], bad[2], good[1], bad[3]])
    assert report == BatchReport(messages=6, outcomes={"completed": 2}, split=False,
                                 republished=0, dead_lettered=4)
    with session_scope() as session:
        letters = {row.payload["id"]: row for row in session.execute(text(
            "SELECT source, reason, error_type, payload, raw_payload FROM dead_letters "
            "WHERE payload->>'id' = ANY(:ids)"), {"ids": [r.id for r in bad]})}
    assert sorted(letters) == sorted(r.id for r in bad)
    for request in bad:
        letter = letters[request.id]
        assert letter.source == TaskNames.STEP and letter.error_type == "NotAStep"
        body = json.loads(letter.raw_payload)  # replayable as it stands: the task and its args
        assert body == {"task": TaskNames.STEP, "id": request.id, "args": list(request.args),
                        "kwargs": request.kwargs}
    assert "is not a UUID" in letters[bad[0].id].reason
    assert "is not a version number" in letters[bad[1].id].reason
    assert "a step takes (execution_id, expected_version)" in letters[bad[2].id].reason
    assert "a step takes (execution_id, expected_version)" in letters[bad[3].id].reason
    for execution_id in (good1, good2):
        assert history(execution_id)[:1] == [(1, "start", "completed")]


def test_an_execution_another_transaction_holds_comes_back_busy_and_runs_when_sent_again() -> None:
    held, free = _start_many(deploy("batch_linear.bpmn"), [{}, {}], now=NOW)
    with session_scope() as holder:  # a concurrent worker's step of `held`, not yet committed
        assert executions.lock(holder, held) is not None
        results = _step_many([(held, 0), (free, 0)])
        assert results == [
            StepResult("busy", next_version=0, send_at=NOW + BUSY_RESEND,
                       reason="another worker holds the execution"),
            StepResult("completed", node_id="start", next_version=1)]
        assert BUSY_RESEND == dt.timedelta(milliseconds=100)
        assert history(held) == [] and execution(held).state_version == 0
    assert history(free) == [(1, "start", "completed")]
    busy = results[0]
    assert busy.next_version is not None
    again = _step_many([(held, busy.next_version)], now=NOW + BUSY_RESEND)  # the re-sent step
    assert again == [StepResult("completed", node_id="start", next_version=1)]
    assert history(held) == [(1, "start", "completed")]


# --------------------------------------------------------------------------- real workers


def test_many_executions_started_together_run_in_batches_and_all_complete() -> None:
    namespace = Namespace.new("many")
    ids = _start_many(deploy("batch_linear.bpmn"), [{}] * 200)
    namespace.send([(execution_id, 0) for execution_id in ids])  # a backlog, as after a restart
    worker = namespace.worker()
    try:
        _wait_ended(ids, timeout=120)
    finally:
        worker.stop()
        namespace.discard()
    histories = _histories(ids)
    for execution_id in ids:
        steps = histories[execution_id]
        assert _gap_free(steps) and [node for _, node, _ in steps] == LINEAR, steps
    with session_scope() as session:  # the steps of one batch share the batch's start time
        shared = session.execute(text(
            "SELECT count(*) AS steps, count(DISTINCT execution_id) AS executions "
            "FROM execution_steps WHERE execution_id = ANY(:ids) "
            "GROUP BY started_at ORDER BY count(*) DESC LIMIT 1"), {"ids": ids}).one()
    assert shared.executions > 1, f"no two executions' steps ran in one batch: {shared}"


def test_kill_9_mid_batch_loses_no_step_and_runs_no_node_twice() -> None:
    namespace = Namespace.new("kill")
    first = namespace.worker(FLEET_VISIBILITY_TIMEOUT="6")
    second: WorkerProcess | None = None
    try:
        ids = _start_many(deploy("batch_linear.bpmn"), [{}] * 80)
        namespace.send([(execution_id, 0) for execution_id in ids])
        wait_for(lambda: _steps_run(ids) >= 100, timeout=90, interval=0.01,
                 message="steps to run")
        os.killpg(first.proc.pid, signal.SIGKILL)  # mid-run: a batch is most likely open
        first.proc.wait()
        unfinished = len(ids) - _count(ids, "status = 'completed'")
        assert unfinished > 0, "every execution completed before the kill"
        with session_scope() as session:  # the reaper, its cutoff passed for all of them
            session.execute(text(
                "UPDATE workflow_executions SET step_enqueued_at = now() - interval '1 hour' "
                "WHERE id = ANY(:ids) AND status IN ('pending', 'running')"), {"ids": ids})
        with session_scope() as session:
            claimed = timers.claim_stuck(session, dt.datetime.now(dt.UTC),
                                         dt.timedelta(minutes=10), max_resends=10,
                                         retry_chain=dt.timedelta(0))
        resent = [step for step in claimed if step[0] in set(ids)]
        assert len(resent) == unfinished
        second = namespace.worker(FLEET_VISIBILITY_TIMEOUT="6")
        namespace.send(resent)
        _wait_ended(ids, timeout=120)
        for steps in _histories(ids).values():
            assert _gap_free(steps), steps
            assert [node for _, node, outcome in steps if outcome == "completed"] == LINEAR, steps
    finally:
        first.stop()
        if second is not None:
            second.stop()
        namespace.discard()


def test_a_timer_fires_on_time_by_its_delayed_message(fleet: Namespace) -> None:
    (execution_id,) = _start_many(deploy("batch_timer.bpmn"), [{"wait": "PT1S"}])
    fleet.send([(execution_id, 0)])
    waiting = _wait_timer(execution_id)
    wait_status(execution_id, "completed", timeout=30)
    assert waiting.wake_at is not None
    late = (_fired_at(execution_id) - waiting.wake_at).total_seconds()
    assert -0.05 < late < 1.5, f"fired {late:.3f} s after its due time"  # the sweep: 5 s
    assert nodes(execution_id) == ["start", "wait", "mark", "end"]


def test_an_early_timer_message_changes_nothing_and_the_timer_fires_once(
        fleet: Namespace) -> None:
    (execution_id,) = _start_many(deploy("batch_timer.bpmn"), [{"wait": "PT3S"}])
    fleet.send([(execution_id, 0)])
    waiting = _wait_timer(execution_id)
    assert waiting.wake_at is not None
    assert dt.datetime.now(dt.UTC) < waiting.wake_at - dt.timedelta(seconds=1.5)
    fleet.send([(execution_id, waiting.state_version)] * 2)  # early, and twice
    time.sleep(0.5)
    row = execution(execution_id)
    assert (row.state_version, row.wake_at, row.status) == \
        (waiting.state_version, waiting.wake_at, ExecutionStatus.RUNNING)
    assert history(execution_id) == [(1, "start", "completed")]
    wait_status(execution_id, "completed", timeout=30)
    late = (_fired_at(execution_id) - waiting.wake_at).total_seconds()
    assert -0.05 < late < 1.5, f"fired {late:.3f} s after its due time"
    assert nodes(execution_id) == ["start", "wait", "mark", "end"]
    assert _gap_free(history(execution_id))


def test_a_lost_timer_message_is_recovered_by_the_sweep_once() -> None:
    namespace = Namespace.new("lost")
    worker = namespace.worker(concurrency=1, FLEET_TIMER_MESSAGE_HORIZON="0")  # none sent
    try:
        (execution_id,) = _start_many(deploy("batch_timer.bpmn"), [{"wait": "PT1S"}])
        namespace.send([(execution_id, 0)])
        waiting = _wait_timer(execution_id)
        assert waiting.wake_at is not None
        time.sleep(max(0.0, (waiting.wake_at - dt.datetime.now(dt.UTC)).total_seconds()) + 1)
        row = execution(execution_id)  # a second overdue: no message woke it
        assert (row.wake_at, row.state_version) == (waiting.wake_at, waiting.state_version)
        assert _completed(execution_id, "wait") == 0
        # wake_due_timers with timer messages off: no grace; a second beat finds nothing
        claimed = _sweep(execution_id, dt.timedelta(0))
        assert claimed == [(execution_id, waiting.state_version)]
        assert _sweep(execution_id, dt.timedelta(0)) == []
        namespace.send(claimed)
        wait_status(execution_id, "completed", timeout=30)
        assert nodes(execution_id) == ["start", "wait", "mark", "end"]
        assert _gap_free(history(execution_id))
    finally:
        worker.stop()
        namespace.discard()


def test_a_timer_both_its_message_and_the_sweep_wake_fires_once(fleet: Namespace) -> None:
    (execution_id,) = _start_many(deploy("batch_timer.bpmn"), [{"wait": "PT1S"}])
    fleet.send([(execution_id, 0)])
    waiting = _wait_timer(execution_id)
    assert waiting.wake_at is not None
    with session_scope() as session:
        # Held past the due time and the sweep's grace: the delayed message finds the
        # execution busy (re-sent every 100 ms) and the sweep claims the timer as well.
        assert executions.lock(session, execution_id) is not None
        overdue = waiting.wake_at + timers.SWEEP_GRACE + dt.timedelta(milliseconds=300)
        time.sleep(max(0.0, (overdue - dt.datetime.now(dt.UTC)).total_seconds()))
        claimed, others = _claim_timers(session, execution_id, timers.SWEEP_GRACE)
        assert claimed == [(execution_id, waiting.state_version)]
    released = dt.datetime.now(dt.UTC)
    dispatch.send_steps(others)
    fleet.send(claimed)
    wait_status(execution_id, "completed", timeout=30)
    assert _completed(execution_id, "wait") == 1
    assert nodes(execution_id) == ["start", "wait", "mark", "end"]
    assert _gap_free(history(execution_id))
    assert (_fired_at(execution_id) - released).total_seconds() < 1.5  # re-sent or swept
