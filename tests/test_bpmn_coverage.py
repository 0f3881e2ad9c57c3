"""Every supported BPMN element, run to completion through the real engine and worker.

One small hand-written file per feature in tests/bpmn/ (the exclusive gateway with
a default flow is tests/bpmn/score_gateway.bpmn, run in test_workflow_engine.py).
Timers are a second or two; no beat runs, so the tests send the beat's
`workflows.wake_due_timers` themselves (`wake_timers_until`). Messages arrive as
real user events through the ingest pipeline (`workers.producer.send_event`).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import text

from db.session import session_scope
from tests.helpers import WorkerProcess, wait_for
from tests.workflow_helpers import (
    BPMN,
    deploy,
    deploy_xml,
    execution,
    history,
    new_user,
    nodes,
    start,
    wait_status,
    wait_waiting,
    wake_timers_until,
)
from workers.engine import control, dispatch
from workers.engine.bpmn import BpmnError
from workers.engine.validate import validate_bpmn
from workers.operators.registry import operator_names
from workers.producer import send_event

DONE = ("completed", "failed", "cancelled")


def _completed(execution_id: uuid.UUID, wake: bool = False) -> dict[str, Any]:
    """Wait for the execution to end; assert it completed; return its variables."""
    row = wake_timers_until(execution_id, *DONE) if wake else wait_status(execution_id, *DONE)
    assert row.status == "completed", row.error_message
    assert row.wake_at is None and not row.awaiting_events
    return dict(row.variables)


def _email(user_id: uuid.UUID) -> str:
    with session_scope() as session:
        return str(session.execute(text("SELECT email FROM users WHERE id = :u"),
                                   {"u": user_id}).scalar_one())


def _query(sql: str, **params: Any) -> list[Any]:
    with session_scope() as session:
        return list(session.execute(text(sql), params).all())


# --------------------------------------------------------------------------- deploy-time checks
# No servers needed: what validate accepts and refuses for the elements below.

def test_every_coverage_file_validates() -> None:
    files = ["parallel.bpmn", "inclusive.bpmn", "event_gateway.bpmn", "timers.bpmn",
             "cycle_boundary.bpmn", "boundary_timers.bpmn", "message_timeout.bpmn",
             "error_boundary.bpmn", "terminate.bpmn", "service_tasks.bpmn"]
    for name in files:
        validate_bpmn((BPMN / name).read_text(), operator_names())
    # The event-based gateway owns its catch events' definitions: the message is still
    # collected, so ingest knows the execution may wait for it.
    gateway = validate_bpmn((BPMN / "event_gateway.bpmn").read_text())
    assert gateway.awaited_events == {"order.completed"}
    assert validate_bpmn((BPMN / "message_timeout.bpmn").read_text()).awaited_events == {
        "order.completed"}


def test_timer_behind_an_event_based_gateway_is_still_checked() -> None:
    xml = (BPMN / "event_gateway.bpmn").read_text().replace(
        "<bpmn:timeDuration>wait</bpmn:timeDuration>",
        "<bpmn:timeDuration>().__class__.__base__.__subclasses__()</bpmn:timeDuration>")
    with pytest.raises(BpmnError, match="element race: timer expression refused"):
        validate_bpmn(xml)


def test_an_event_based_gateway_with_two_timers_is_refused() -> None:
    xml = (BPMN / "event_gateway.bpmn").read_text().replace(
        '<bpmn:messageEventDefinition messageRef="order_completed"/>',
        '<bpmn:timerEventDefinition><bpmn:timeDuration>"PT5S"</bpmn:timeDuration>'
        "</bpmn:timerEventDefinition>")
    with pytest.raises(BpmnError, match="element race: .* more than one timer"):
        validate_bpmn(xml)


def test_a_catch_event_with_several_definitions_is_refused() -> None:
    xml = (BPMN / "timers.bpmn").read_text().replace(
        '<bpmn:timerEventDefinition><bpmn:timeDuration>"PT1S"</bpmn:timeDuration>'
        "</bpmn:timerEventDefinition>",
        '<bpmn:timerEventDefinition><bpmn:timeDuration>"PT1S"</bpmn:timeDuration>'
        '</bpmn:timerEventDefinition><bpmn:messageEventDefinition messageRef="m"/>',
    ).replace("</bpmn:process>", '</bpmn:process><bpmn:message id="m" name="m.m"/>')
    with pytest.raises(BpmnError, match="element pause: an event with several definitions"):
        validate_bpmn(xml)


# --------------------------------------------------------------------------- gateways

@pytest.mark.servers
def test_parallel_gateway_runs_both_branches_and_the_join_merges_them(
        celery_worker: WorkerProcess) -> None:
    execution_id = start(deploy("parallel.bpmn"), {"base": 3})
    variables = _completed(execution_id)
    assert (variables["a"], variables["b"], variables["total"]) == (4, 30, 34)
    ran = nodes(execution_id)
    assert ran[:2] == ["start", "fork"] and ran[-3:] == ["join", "merge", "end"]
    assert sorted(ran[2:4]) == ["branch_a", "branch_b"]
    assert ran.count("join") == 1  # one merged token leaves the join


@pytest.mark.servers
def test_inclusive_gateway_takes_the_true_branches_and_joins_them(
        celery_worker: WorkerProcess) -> None:
    name = deploy("inclusive.bpmn")
    email_sms, sms_push = (start(name, {"channels": ["email", "sms"]}),
                           start(name, {"channels": ["sms", "push"]}))
    for execution_id, taken, skipped in ((email_sms, ["email", "sms"], "push"),
                                         (sms_push, ["push", "sms"], "email")):
        variables = _completed(execution_id)
        assert all(variables[f"sent_{channel}"] is True for channel in taken)
        assert f"sent_{skipped}" not in variables and variables["joined"] is True
        ran = nodes(execution_id)
        assert ran[:2] == ["start", "fork"] and sorted(ran[2:4]) == taken
        assert ran[4:] == ["join", "summary", "end"]  # one merged token leaves the join


# --------------------------------------------------------------------------- event-based gateway

@pytest.mark.servers
def test_event_based_gateway_message_arrives_first(celery_worker: WorkerProcess) -> None:
    user_id = new_user()
    execution_id = start(deploy("event_gateway.bpmn"), {"wait": "PT30S"}, user_id=user_id)
    waiting = wait_waiting(execution_id)
    assert waiting.awaiting_events == ["order.completed"] and waiting.wake_at is not None
    assert nodes(execution_id) == ["start"]  # the gateway itself is the wait
    send_event("order.completed", user=_email(user_id), data={"amount": 5})
    variables = _completed(execution_id)
    assert variables["outcome"] == "ordered" and variables["amount"] == 5
    assert variables["order"]["event_type"] == "order.completed"
    assert nodes(execution_id) == ["start", "race", "order_done", "ordered", "end_ordered"]


@pytest.mark.servers
def test_event_based_gateway_timer_fires_first(celery_worker: WorkerProcess) -> None:
    user_id = new_user()
    execution_id = start(deploy("event_gateway.bpmn"), {"wait": "PT1S"}, user_id=user_id)
    waiting = wait_waiting(execution_id)
    assert waiting.awaiting_events == ["order.completed"]
    variables = _completed(execution_id, wake=True)
    assert variables["outcome"] == "timed out" and "order" not in variables
    assert nodes(execution_id) == ["start", "race", "too_late", "timed_out", "end_timed_out"]
    # The message wait ended with the gateway: a late event is recorded, not delivered.
    send_event("order.completed", user=_email(user_id), data={"amount": 5})
    wait_for(lambda: _query("SELECT 1 FROM lifecycle_events WHERE user_id = :u "
                            "AND event_type = 'order.completed'", u=user_id),
             message="the late event to be ingested")
    assert _query("SELECT 1 FROM execution_messages WHERE execution_id = :e", e=execution_id) == []
    assert execution(execution_id).state_version == len(history(execution_id))


@pytest.mark.servers
@pytest.mark.parametrize(("occurred", "winner"), [
    ("after the timer was due", ["too_late", "timed_out", "end_timed_out"]),
    ("before the timer was due", ["order_done", "ordered", "end_ordered"]),
])
def test_event_based_gateway_takes_one_way_when_the_step_runs_late(
        celery_worker: WorkerProcess, occurred: str, winner: list[str]) -> None:
    """The event reaches the execution after its timer is due, before its step runs.

    The execution is paused while it waits, so that neither its delayed timer message
    nor the beat steps it when the timer is due: its step runs late, on resume.
    """
    user_id = new_user()
    execution_id = start(deploy("event_gateway.bpmn"), {"wait": "PT3S"}, user_id=user_id)
    wake_at = wait_waiting(execution_id).wake_at
    assert wake_at is not None
    with session_scope() as session:
        control.pause(session, execution_id)
    wait_for(lambda: dt.datetime.now(dt.UTC) > wake_at + dt.timedelta(seconds=0.2),
             message="the timer to be due")
    when = dt.datetime.now(dt.UTC) if occurred.startswith("after") else (
        wake_at - dt.timedelta(seconds=0.5))
    send_event("order.completed", user=_email(user_id), data={"amount": 5}, occurred_at=when)
    # Wake it only once the event has reached the execution: which came first is then
    # decided by occurred_at, not by which task the worker happened to run first.
    wait_for(lambda: _query("SELECT 1 FROM execution_messages WHERE execution_id = :e",
                            e=execution_id), message="the event to reach the execution")
    with session_scope() as session:
        version = control.resume(session, execution_id)
    dispatch.send_step(execution_id, version)
    variables = _completed(execution_id, wake=True)
    assert nodes(execution_id) == ["start", "race", *winner]  # never both ways
    assert variables["outcome"] == ("timed out" if occurred.startswith("after") else "ordered")


# --------------------------------------------------------------------------- timers

@pytest.mark.servers
def test_duration_and_date_timer_catch_events(celery_worker: WorkerProcess) -> None:
    began = dt.datetime.now(dt.UTC)
    wake_time = began + dt.timedelta(seconds=2)
    execution_id = start(deploy("timers.bpmn"), {"wake_time": wake_time.isoformat()})
    first = wait_waiting(execution_id)
    assert first.wake_at is not None
    assert dt.timedelta(seconds=0.5) < first.wake_at - began < dt.timedelta(seconds=5)
    assert nodes(execution_id) == ["start"]
    variables = _completed(execution_id, wake=True)
    paused_at = dt.datetime.fromisoformat(variables["paused_at"])
    woke_at = dt.datetime.fromisoformat(variables["woke_at"])
    assert paused_at >= began + dt.timedelta(seconds=1)  # the duration: "PT1S"
    assert woke_at >= wake_time  # the date, from a variable
    assert nodes(execution_id) == ["start", "pause", "after_pause", "until", "after_until", "end"]


@pytest.mark.servers
def test_cycle_timer_on_a_non_interrupting_boundary_event(celery_worker: WorkerProcess) -> None:
    execution_id = start(deploy("cycle_boundary.bpmn"))
    variables = _completed(execution_id, wake=True)
    assert variables["ticked"] is True and variables["finished"] is True
    ran = nodes(execution_id)
    assert ran.count("tick") == 2 and ran.count("tick_end") == 2  # "R2/PT1S": two cycles
    assert ran.index("tick") < ran.index("slow_wait")  # while the subprocess still waited
    assert ran[-4:] == ["slow_end", "slow", "finish", "end"]


@pytest.mark.servers
def test_boundary_timers_non_interrupting_and_interrupting(celery_worker: WorkerProcess) -> None:
    name = deploy("boundary_timers.bpmn")
    finishes = start(name, {"work_takes": "PT2S", "deadline_after": "PT30S"})
    overruns = start(name, {"work_takes": "PT30S", "deadline_after": "PT2S"})
    variables = _completed(overruns, wake=True)
    assert variables["outcome"] == "deadline" and variables["reminded"] is True
    assert "worked" not in variables  # the deadline cancelled the subprocess
    ran = nodes(overruns)
    assert "remind" in ran and "work_wait" not in ran and "work" not in ran
    assert ran[-3:] == ["deadline", "give_up", "end_deadline"]

    variables = _completed(finishes, wake=True)
    assert variables["outcome"] == "done" and variables["worked"] is True
    assert variables["reminded"] is True  # the reminder ran, the work went on
    ran = nodes(finishes)
    assert ran.index("remind") < ran.index("work_wait") and "deadline" not in ran
    assert ran[-3:] == ["work", "finish", "end"]


# --------------------------------------------------------------------------- message waits

@pytest.mark.servers
def test_message_catch_receives_the_users_event(celery_worker: WorkerProcess) -> None:
    user_id, other = new_user(), new_user()
    execution_id = start(deploy("message_timeout.bpmn"), user_id=user_id)
    waiting = wait_waiting(execution_id)
    assert waiting.awaiting_events == ["order.completed"] and waiting.wake_at is not None
    # Another user's order does not concern this execution.
    send_event("order.completed", user=_email(other), data={"total": 7})
    send_event("order.completed", user=_email(user_id), data={"total": 42})
    variables = _completed(execution_id)
    assert variables["outcome"] == "ordered" and variables["total"] == 42
    assert variables["order"]["data"] == {"total": 42}
    assert nodes(execution_id) == ["start", "wait_order", "thank", "end_ordered"]
    consumed = _query("SELECT event_type, consumed_at IS NOT NULL FROM execution_messages "
                      "WHERE execution_id = :e", e=execution_id)
    assert consumed == [("order.completed", True)]


@pytest.mark.servers
def test_message_catch_times_out(celery_worker: WorkerProcess) -> None:
    execution_id = start(deploy("message_timeout.bpmn"))
    assert wait_waiting(execution_id).awaiting_events == ["order.completed"]
    variables = _completed(execution_id, wake=True)
    assert variables["outcome"] == "timed out" and "order" not in variables
    assert nodes(execution_id) == ["start", "timeout", "nudge", "end_timed_out"]


# --------------------------------------------------------------------------- subprocesses, errors

@pytest.mark.servers
def test_embedded_subprocess_and_call_activity(celery_worker: WorkerProcess) -> None:
    validate_bpmn((BPMN / "subprocesses.bpmn").read_text(), operator_names())
    execution_id = start(deploy("subprocesses.bpmn"), {"base": 5})
    variables = _completed(execution_id)
    assert (variables["doubled"], variables["helped"], variables["result"]) == (10, 110, 120)
    assert nodes(execution_id) == [
        "start", "embedded_start", "double", "embedded_end", "embedded",
        "helper_start", "help", "helper_end", "call", "combine", "end"]


@pytest.mark.servers
def test_error_end_event_caught_by_a_boundary_error_event(celery_worker: WorkerProcess) -> None:
    name = deploy("error_boundary.bpmn")
    bad, good = start(name, {"amount": -1}), start(name, {"amount": 3})
    variables = _completed(bad)
    assert variables["outcome"] == "rejected" and "accepted" not in variables
    ran = nodes(bad)
    assert ran[:4] == ["start", "check_start", "valid", "raise_bad"]
    assert ran[-3:] == ["on_bad", "handle", "end_rejected"] and "proceed" not in ran
    variables = _completed(good)
    assert variables["outcome"] == "accepted" and variables["accepted"] is True
    assert "on_bad" not in nodes(good)


@pytest.mark.servers
def test_terminate_end_event_ends_a_waiting_branch(celery_worker: WorkerProcess) -> None:
    execution_id = start(deploy("terminate.bpmn"))
    variables = _completed(execution_id)  # the other branch waits an hour: no wake needed
    assert variables["quick_done"] is True and "waited" not in variables
    ran = nodes(execution_id)
    assert ran[:2] == ["start", "fork"] and ran[-2:] == ["quick", "stop"]
    assert "long_wait" not in ran and "too_late" not in ran


# --------------------------------------------------------------------------- service tasks

Received = list[tuple[dict[str, str], bytes, list[uuid.UUID]]]


class _Webhook(BaseHTTPRequestHandler):
    """Records (headers, body, members of the segment the body names) of every POST."""

    received: Received

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        segment = json.loads(body).get("segment")
        members = [row.user_id for row in _query(
            "SELECT m.user_id FROM user_segment_memberships m JOIN user_segments s "
            "ON s.id = m.segment_id WHERE s.name = :n", n=segment)]
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body, members))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def webhook() -> Iterator[tuple[str, Received]]:
    """A local HTTP server recording POSTs: (its URL, what it received)."""
    received: Received = []
    handler = type("Recorder", (_Webhook,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def _static_segment() -> tuple[uuid.UUID, str]:
    name = f"coverage-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        segment_id = session.execute(text(
            "INSERT INTO user_segments (name, conditions, kind) VALUES (:n, '{}'::jsonb, 'static') "
            "RETURNING id"), {"n": name}).scalar_one()
    return segment_id, name


@pytest.mark.servers
def test_service_task_operators(celery_worker: WorkerProcess,
                                webhook: tuple[str, Received]) -> None:
    url, received = webhook
    segment_id, segment = _static_segment()
    user_id = new_user({"source": "test"})
    execution_id = start(deploy("service_tasks.bpmn"), {
        "target_stage": "Activation", "plan": "pro", "segment": segment, "webhook_url": url,
    }, user_id=user_id)
    variables = _completed(execution_id)
    assert nodes(execution_id) == ["start", "promote", "tag", "welcome", "announce",
                                   "join_segment", "notify_crm", "leave_segment", "end"]
    # Every operator node is two steps around the actions queue: asked, then completed.
    assert [outcome for _, node, outcome in history(execution_id) if node == "promote"] == [
        "waiting", "completed"]

    # set_lifecycle_stage: the user, a history row naming the execution, an audit event.
    assert variables["promoted"] == {"changed": True, "from": "Acquisition", "stage": "Activation"}
    assert _query("SELECT current_lifecycle_stage FROM users WHERE id = :u", u=user_id) == [
        ("Activation",)]
    assert _query("SELECT from_stage, to_stage, workflow_execution_id FROM user_lifecycle_history "
                  "WHERE user_id = :u", u=user_id) == [("Acquisition", "Activation", execution_id)]
    changed = _query("SELECT event_data FROM lifecycle_events WHERE user_id = :u "
                     "AND event_type = 'lifecycle.stage_changed'", u=user_id)
    assert [row.event_data for row in changed] == [
        {"from": "Acquisition", "to": "Activation", "execution_id": str(execution_id)}]

    # update_user_attributes: merged into the user's attributes (as a user.identify event).
    assert variables["tagged"] == {"updated": ["plan", "promoted_to"]}
    assert _query("SELECT attributes FROM users WHERE id = :u", u=user_id)[0].attributes == {
        "source": "test", "plan": "pro", "promoted_to": "Activation"}

    # send_message: one row in message_log, to the user's address, for this execution.
    email = _email(user_id)
    assert _query("SELECT channel, recipient, subject, body FROM message_log "
                  "WHERE execution_id = :e", e=execution_id) == [
        ("email", email, "Welcome", f"Hello {email}, you are on pro")]
    assert variables["mailed"]["to"] == email and variables["mailed"]["duplicate"] is False

    # emit_event: an audit row of the event, with the data the parameters built.
    emitted = _query("SELECT event_id, event_data FROM lifecycle_events WHERE user_id = :u "
                     "AND event_type = 'coverage.announced'", u=user_id)
    assert [(str(r.event_id), r.event_data) for r in emitted] == [
        (variables["announced"]["event_id"], {"plan": "pro", "n": 3})]

    # add_to_segment, then remove_from_segment: the user was a member in between (when
    # the webhook was called), and is not any more. (The count `added` is wrong: see
    # test_add_to_segment_counts_the_members_it_added.)
    assert variables["joined"]["segment"] == segment
    assert variables["left"] == {"segment": segment, "removed": 1}
    assert _query("SELECT user_id FROM user_segment_memberships WHERE segment_id = :s",
                  s=segment_id) == []

    # send_webhook: one POST with the call's idempotency key and the JSON payload.
    assert variables["hooked"] == {"status": 200}
    assert len(received) == 1
    headers, body, members = received[0]
    assert members == [user_id]
    key = _query("SELECT key FROM action_deliveries WHERE execution_id = :e "
                 "AND node_id = 'notify_crm'", e=execution_id)[0].key
    assert headers["idempotency-key"] == key and key.startswith(f"{execution_id}:")
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"user": str(user_id), "stage": "Activation",
                                "segment": segment, "joined": variables["joined"]["added"]}


@pytest.mark.servers
def test_add_to_segment_counts_the_members_it_added() -> None:
    from workers.rules.segments import set_static_members

    segment_id, _ = _static_segment()
    user_id = new_user()
    with session_scope() as session:
        assert set_static_members(session, segment_id, [user_id], add=True).changed == 1
        assert set_static_members(session, segment_id, [user_id], add=True).changed == 0


@pytest.mark.servers
def test_an_invalid_stage_fails_the_execution_naming_the_node(
        celery_worker: WorkerProcess) -> None:
    user_id = new_user()
    execution_id = start(deploy("service_tasks.bpmn"), {
        "target_stage": "Nirvana", "plan": "pro", "segment": "none", "webhook_url": "http://x",
    }, user_id=user_id)
    row = wait_status(execution_id, *DONE)
    assert row.status == "failed" and row.current_node_id == "promote"
    assert "node promote" in (row.error_message or "")
    assert "unknown lifecycle stage 'Nirvana'" in (row.error_message or "")
    assert history(execution_id)[-1][1:] == ("promote", "failed")
    assert _query("SELECT current_lifecycle_stage FROM users WHERE id = :u", u=user_id) == [
        ("Acquisition",)]


# --------------------------------------------------------------------------- hostile versions

@pytest.mark.servers
def test_a_script_the_sandbox_stops_at_run_time_fails_the_execution(
        celery_worker: WorkerProcess) -> None:
    """Statically fine, refused when run (9 ** 9 ** 9 has 8 * 10**8 bits): the node fails."""
    xml = (BPMN / "score_gateway.bpmn").read_text().replace(
        "score = base * 2", "score = 9 ** 9 ** base")
    execution_id = start(deploy_xml(xml), {"base": 9})
    row = wait_status(execution_id, *DONE)
    assert row.status == "failed" and row.current_node_id == "compute"
    assert (row.error_message or "").startswith("node compute: ")
    assert "power too large" in (row.error_message or "")
    assert history(execution_id)[-1][1:] == ("compute", "failed")
    assert celery_worker.proc.poll() is None  # the worker is alive and still works
    assert _completed(start(deploy("score_gateway.bpmn"), {"base": 7}))["route"] == "high"


HOSTILE = ("score = ().__class__.__base__.__subclasses__()", "score = 9**9**9")


@pytest.mark.servers
def test_a_hostile_script_that_got_past_deploy_fails_safely(
        celery_worker: WorkerProcess) -> None:
    started = []
    for source in HOSTILE:
        name = deploy("score_gateway.bpmn")
        hostile = (BPMN / "score_gateway.bpmn").read_text().replace("score = base * 2", source)
        assert source in hostile
        with session_scope() as session:  # written behind the back of deploy's validation
            updated = session.execute(text(
                "UPDATE workflow_versions SET bpmn_xml = :x WHERE workflow_id = "
                "(SELECT id FROM workflows WHERE name = :n)"), {"x": hostile, "n": name}).rowcount
        assert updated == 1
        started.append(start(name, {"base": 7}))
    for execution_id in started:
        row = wait_status(execution_id, *DONE, timeout=10)
        assert row.status == "failed", row.status
        assert "compute" in (row.error_message or ""), row.error_message
        assert "score" not in row.variables
    assert celery_worker.proc.poll() is None  # the worker is alive and still works
    assert _completed(start(deploy("score_gateway.bpmn"), {"base": 7}))["route"] == "high"
