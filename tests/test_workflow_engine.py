"""The workflow engine with a real worker: one node per step, state in PostgreSQL."""

from __future__ import annotations

import copy
import datetime as dt
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import text
from typer.testing import CliRunner, Result

from db.models import WorkflowExecution
from db.session import session_scope
from tests.helpers import SERVERS, TRIGGER_CACHE_SECONDS, WorkerProcess, wait_for
from tests.workflow_helpers import (
    BPMN,
    deploy,
    execution,
    history,
    new_user,
    nodes,
    start,
    wait_status,
    wait_waiting,
)
from workers.broker import delete_prefixed_keys
from workers.celery_app import create_app
from workers.definitions import apply, deploy_workflow, load
from workers.engine import control
from workers.engine.dispatch import send_step, send_steps
from workers.engine.timers import claim_due_timers, claim_stuck
from workers.producer import send_event
from workers.settings import Settings
from workers.tools.chaos.receiver import webhook_server

pytestmark = pytest.mark.servers


def test_script_and_exclusive_gateway_run_node_by_node(celery_worker: WorkerProcess) -> None:
    name = deploy("score_gateway.bpmn")
    high, low = start(name, {"base": 7}), start(name, {"base": 2})
    done_high = wait_status(high, "completed", "failed")
    done_low = wait_status(low, "completed", "failed")
    assert done_high.status == "completed", done_high.error_message
    assert done_high.variables["route"] == "high" and done_high.variables["score"] == 14
    assert done_low.variables["route"] == "low"
    assert nodes(high) == ["start", "compute", "decide", "high", "end_high"]
    assert [seq for seq, _, _ in history(high)] == [1, 2, 3, 4, 5]
    assert done_high.state_version == 5 and done_high.current_node_id == "end_high"


# --------------------------------------------------------------------------- shared helpers

def _move_timers_to_past(execution_id: uuid.UUID, ago: dt.timedelta) -> dt.datetime:
    """Pretend the execution's timer came due `ago`: as after a day with the beat down."""
    when = dt.datetime.now(dt.UTC) - ago
    with session_scope() as session:
        row = session.get(WorkflowExecution, execution_id, with_for_update=True)
        assert row is not None and row.engine_state is not None
        engine_state = copy.deepcopy(row.engine_state)
        moved = 0
        for task in engine_state["tasks"].values():
            if isinstance(task["internal_data"].get("event_value"), str):
                task["internal_data"]["event_value"] = when.isoformat()
                moved += 1
        assert moved == 1
        row.engine_state, row.wake_at = engine_state, when
    return when


def _step_count(execution_id: uuid.UUID, node_id: str) -> int:
    return sum(1 for _, node, outcome in history(execution_id)
               if node == node_id and outcome == "completed")


def _reap(execution_id: uuid.UUID, sent_ago: dt.timedelta | None = None) -> list[tuple[uuid.UUID, int]]:
    """What the reaper claims of this execution, its last send dated `sent_ago` back first."""
    if sent_ago is not None:
        with session_scope() as session:
            session.execute(text("UPDATE workflow_executions SET step_enqueued_at = now() - "
                                 "CAST(:ago AS interval) WHERE id = :i"),
                            {"ago": sent_ago, "i": execution_id})
    with session_scope() as session:
        return [s for s in claim_stuck(session, dt.datetime.now(dt.UTC), dt.timedelta(minutes=10),
                                       max_resends=10, retry_chain=dt.timedelta(0))
                if s[0] == execution_id]


def _deploy_xml(name: str, xml: str) -> None:
    with session_scope() as session:
        deploy_workflow(session, name, xml, stages=[], activate=True)


# --------------------------------------------------------------------------- triggers to steps

def test_trigger_starts_an_execution_whose_steps_run(celery_worker: WorkerProcess,
                                                     tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    (tmp_path / "flow.bpmn").write_text((BPMN / "score_gateway.bpmn").read_text())
    (tmp_path / "defs.yaml").write_text(
        f"workflows:\n  - {{name: score-{tag}, file: flow.bpmn}}\n"
        f"triggers:\n  - name: score-on-signup-{tag}\n    event_type: signup.t{tag}\n"
        f"    workflow: score-{tag}\n")
    doc, xml = load(tmp_path / "defs.yaml")
    with session_scope() as session:
        apply(session, doc, xml)
    email = f"trig-{tag}@example.com"
    time.sleep(TRIGGER_CACHE_SECONDS * 2)
    send_event(f"signup.t{tag}", user=email, data={"plan": "pro"})

    def started() -> uuid.UUID | None:
        with session_scope() as session:
            return session.execute(text(
                "SELECT e.id FROM workflow_executions e JOIN users u ON u.id = e.user_id "
                "WHERE u.email = :e"), {"e": email}).scalar_one_or_none()
    execution_id = wait_for(started, message="the trigger to start an execution")
    # The start event gets the triggering event and the user; base is missing, so the
    # script fails: the failure names the node and the execution stops cleanly.
    done = wait_status(execution_id, "completed", "failed")
    assert done.status == "failed" and done.current_node_id == "compute"
    assert "base" in (done.error_message or "")
    assert history(execution_id)[-1][1:] == ("compute", "failed")


def test_stale_and_duplicate_step_messages_change_nothing(celery_worker: WorkerProcess) -> None:
    name = deploy("score_gateway.bpmn")
    execution_id = start(name, {"base": 1})
    wait_status(execution_id, "completed")
    before = history(execution_id)
    for version in (0, 2, 5, 99):
        send_step(execution_id, version)
    send_step(execution_id, 0)
    time.sleep(2)  # the worker has long consumed them
    assert history(execution_id) == before


# --------------------------------------------------------------------------- durable timers

def test_day_long_timer_due_in_the_past_wakes_exactly_once(celery_worker: WorkerProcess) -> None:
    name = deploy("engine_timer.bpmn")
    due = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    execution_id = start(name, {"due": due})
    waiting = wait_waiting(execution_id)
    assert waiting.wake_at is not None and waiting.wake_at > dt.datetime.now(dt.UTC) + \
        dt.timedelta(hours=23)
    assert _step_count(execution_id, "wait") == 0

    _move_timers_to_past(execution_id, dt.timedelta(days=1))
    # Several overlapping sweeps (two beats, a rerun): one claims it, the rest find nothing.
    claimed: list[tuple[uuid.UUID, int]] = []
    for _ in range(3):
        with session_scope() as session:
            claimed += [c for c in claim_due_timers(session, dt.datetime.now(dt.UTC))
                        if c[0] == execution_id]
    assert len(claimed) == 1
    send_steps(claimed * 3)  # and the step message delivered three times
    done = wait_status(execution_id, "completed")
    assert done.variables["version_ran"] == "v1"
    assert _step_count(execution_id, "wait") == 1 and _step_count(execution_id, "mark") == 1
    seqs = [seq for seq, _, _ in history(execution_id)]
    assert seqs == list(range(1, len(seqs) + 1))


def test_running_executions_keep_their_version(celery_worker: WorkerProcess) -> None:
    name = f"versioned-{uuid.uuid4().hex[:8]}"
    v1 = (BPMN / "engine_timer.bpmn").read_text()
    _deploy_xml(name, v1)
    due = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).isoformat()
    old = [start(name, {"due": due}) for _ in range(20)]
    for execution_id in old:
        wait_waiting(execution_id)
    _deploy_xml(name, v1.replace('version_ran = "v1"', 'version_ran = "v2"'))
    new = start(name, {"due": dt.datetime.now(dt.UTC).isoformat()})
    for execution_id in old:
        _move_timers_to_past(execution_id, dt.timedelta(minutes=1))
    celery_worker.app.send_task("workflows.wake_due_timers")
    for execution_id in old:
        done = wait_status(execution_id, "completed")
        assert done.variables["version_ran"] == "v1" and done.workflow_version == "1.0.0"
    newer = wait_status(new, "completed")
    assert newer.variables["version_ran"] == "v2" and newer.workflow_version == "2.0.0"


# --------------------------------------------------------------------------- controls

def test_pause_holds_a_due_timer_until_resume_and_cancel_ends_it(
        celery_worker: WorkerProcess) -> None:
    name = deploy("engine_timer.bpmn")
    due = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    paused, cancelled = start(name, {"due": due}), start(name, {"due": due})
    wait_waiting(paused)
    wait_waiting(cancelled)
    with session_scope() as session:
        control.pause(session, paused)
        control.cancel(session, cancelled)
    _move_timers_to_past(paused, dt.timedelta(minutes=5))
    with session_scope() as session:
        due_ids = [c[0] for c in claim_due_timers(session, dt.datetime.now(dt.UTC))]
    assert paused not in due_ids
    send_step(paused, execution(paused).state_version)  # a step while paused does nothing
    time.sleep(1)
    assert execution(paused).status == "running" and _step_count(paused, "wait") == 0
    with session_scope() as session:
        version = control.resume(session, paused)
    send_step(paused, version)
    assert wait_status(paused, "completed").variables["version_ran"] == "v1"

    row = execution(cancelled)
    assert row.status == "cancelled" and row.wake_at is None
    assert history(cancelled)[-1][2] == "cancelled"
    with pytest.raises(control.ControlError):
        with session_scope() as session:
            control.cancel(session, cancelled)


def test_failed_operator_fails_the_node_and_retry_runs_it_again(
        celery_worker: WorkerProcess) -> None:
    name = deploy("engine_webhook.bpmn")
    with webhook_server(statuses=[410]) as server:
        execution_id = start(name, {"hook_url": server.url})
        failed = wait_status(execution_id, "failed")
        assert failed.current_node_id == "notify" and "410" in (failed.error_message or "")
        with session_scope() as session:
            version = control.retry(session, execution_id)
        send_step(execution_id, version)
        done = wait_status(execution_id, "completed")
    assert done.variables["delivered"] == 200
    assert len(server.deliveries) == 2
    assert server.deliveries[1].body == {"user": done.variables["user"]["email"]}
    assert [outcome for _, node, outcome in history(execution_id) if node == "notify"] == \
        ["waiting", "failed", "waiting", "completed"]


def test_transient_webhook_errors_are_retried_then_delivered_once(
        celery_worker: WorkerProcess) -> None:
    name = deploy("engine_webhook.bpmn")
    with webhook_server(statuses=[500, 503]) as server:
        execution_id = start(name, {"hook_url": server.url})
        done = wait_status(execution_id, "completed", "failed", timeout=60)
    assert done.status == "completed", done.error_message
    assert len(server.deliveries) == 3 and server.effects() == 1
    assert server.keys[0].startswith(str(execution_id))


# --------------------------------------------------------------------------- lost work

def test_a_lost_step_is_resent_by_the_reaper_once(celery_worker: WorkerProcess) -> None:
    name = deploy("score_gateway.bpmn")
    with session_scope() as session:  # started, but the first step message is never sent
        execution_id = control.start(session, name, new_user(), {"base": 3})
    stuck = _reap(execution_id, sent_ago=dt.timedelta(hours=1))
    again = _reap(execution_id)
    # re-sent under a new version: the lost message, should it turn up, is stale
    assert stuck == [(execution_id, 1)] and again == []
    send_steps(stuck)
    assert wait_status(execution_id, "completed").variables["route"] == "low"
    assert nodes(execution_id) == ["start", "compute", "decide", "low", "end_low"]


def _isolated_app(prefix: str) -> Celery:
    return create_app(Settings(DATABASE_URL=SERVERS.database_url,
                               CELERY_BROKER_URL=SERVERS.broker_url,
                               broker_key_prefix=prefix))


def _start_worker(prefix: str) -> WorkerProcess:
    worker = WorkerProcess("workflows,actions", concurrency=1, FLEET_BROKER_KEY_PREFIX=prefix,
                           FLEET_VISIBILITY_TIMEOUT="6", FLEET_RETRY_BACKOFF_MAX="2")
    wait_for(lambda: " ready." in worker.log(), timeout=60, message="the worker to start")
    return worker


def test_kill_9_mid_action_loses_no_step_and_repeats_no_effect() -> None:
    prefix = f"{os.environ['FLEET_BROKER_KEY_PREFIX']}kill-{uuid.uuid4().hex[:6]}:"
    app = _isolated_app(prefix)
    name = deploy("engine_webhook.bpmn")
    first = _start_worker(prefix)
    second: WorkerProcess | None = None
    try:
        with webhook_server(delay=30) as server:
            with session_scope() as session:
                execution_id = control.start(session, name, new_user(), {"hook_url": server.url})
            app.send_task("workflows.step", args=[str(execution_id), 0])
            assert server.received.wait(30), first.log()[-2000:]
            os.killpg(first.proc.pid, signal.SIGKILL)  # the machine is gone, mid-request
            first.proc.wait()
            server.delay = 0
            second = _start_worker(prefix)
            # The broker redelivers the unacked action after the visibility timeout; the
            # reaper would re-send the step too. Either way the effect happens once.
            for execution, version in _reap(execution_id, sent_ago=dt.timedelta(hours=1)):
                app.send_task("workflows.step", args=[str(execution), version])
            done = wait_status(execution_id, "completed", "failed", timeout=60)
            assert done.status == "completed", done.error_message
            # The killed worker's unacked action message comes back after the visibility
            # timeout; it finds its delivery done and sends nothing.
            wait_for(lambda: "'skipped'" in second.log() or len(server.deliveries) > 2,
                     timeout=45, message="the redelivered action message")
        assert server.effects() == 1 and len(server.deliveries) == 2, server.keys
        seqs = [seq for seq, _, _ in history(execution_id)]
        assert seqs == list(range(1, len(seqs) + 1))
        assert _step_count(execution_id, "notify") == 1 and _step_count(execution_id, "after") == 1
    finally:
        first.stop()
        if second is not None:
            second.stop()
        delete_prefixed_keys(SERVERS.broker_url, prefix)


# --------------------------------------------------------------------------- human tasks, stalls

def _fleet(*args: str) -> Result:
    """`fleet ...` in this process, wide enough that no line wraps."""
    from workers.cli.main import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def _wait_row(execution_id: uuid.UUID, ready: Callable[[WorkflowExecution], bool],
              what: str) -> WorkflowExecution:
    def found() -> WorkflowExecution | None:
        row = execution(execution_id)
        return row if ready(row) else None
    row = wait_for(found, message=what)
    assert row is not None
    return row


def test_a_user_task_waits_until_fleet_execution_complete(celery_worker: WorkerProcess) -> None:
    execution_id = start(deploy("user_task.bpmn"))
    row = _wait_row(execution_id, lambda r: bool(r.awaiting_tasks) and r.step_enqueued_at is None,
                    "the user task to wait")
    assert row.status == "running" and row.awaiting_tasks == ["approve"]
    shown = _fleet("execution", "show", str(execution_id))
    assert shown.exit_code == 0 and "awaits    approve" in shown.output, shown.output
    for bad in ("{not json", "[1, 2]"):
        refused = _fleet("execution", "complete", str(execution_id), "approve", "--data", bad)
        assert refused.exit_code == 2 and "--data" in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1 and "Traceback" not in refused.output
    wrong = _fleet("execution", "complete", str(execution_id), "refund")
    assert wrong.exit_code == 1, wrong.output
    assert "node refund is not waiting for completion; waiting: approve" in wrong.output
    done = _fleet("execution", "complete", str(execution_id), "approve",
                  "--data", '{"approved": true, "amount": 12}')
    assert done.exit_code == 0, done.output
    finished = wait_status(execution_id, "completed", "failed")
    assert finished.status == "completed", finished.error_message
    assert (finished.variables or {})["refunded"] == 12 and finished.awaiting_tasks is None
    assert nodes(execution_id) == ["start", "approve", "decide", "refund", "end_refunded"]


def test_a_stalled_execution_is_marked_and_shown_with_its_reason(
        celery_worker: WorkerProcess) -> None:
    execution_id = start(deploy("stall_join.bpmn"))
    row = _wait_row(execution_id, lambda r: r.stalled_at is not None, "the execution to stall")
    assert row.status == "running" and row.step_enqueued_at is None
    assert (row.error_message or "").startswith("stalled at node a: no node is ready")
    assert _reap(execution_id, sent_ago=dt.timedelta(hours=1)) == []  # never re-sent
    shown = _fleet("execution", "show", str(execution_id))
    assert shown.exit_code == 0 and "stalled   since" in shown.output, shown.output
    assert "join (waiting)" in shown.output
