"""Deploy test BPMN files, start executions, wait for them: shared by the workflow tests."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select, text

from db.models import ExecutionStep, WorkflowExecution
from db.session import session_scope
from tests.helpers import wait_for
from workers.definitions import deploy_workflow
from workers.engine import control
from workers.engine.dispatch import send_step

BPMN = Path(__file__).parent / "bpmn"


def store_messaging(value: dict[str, Any] | None) -> None:
    """The program's send policy as `fleet apply` stores it (None: none), and this
    process's policy cache reset; running workers re-read it within their cache time."""
    import json

    from workers.sends.policy import MESSAGING, POLICIES

    with session_scope() as session:
        if value is None:
            session.execute(text("DELETE FROM program_settings WHERE name = :n"), {"n": MESSAGING})
        else:
            session.execute(text(
                "INSERT INTO program_settings (name, value, updated_at) "
                "VALUES (:n, CAST(:v AS jsonb), now()) ON CONFLICT (workspace_id, name) "
                "DO UPDATE SET value = excluded.value, updated_at = now()"),
                {"n": MESSAGING, "v": json.dumps(value)})
    POLICIES.clear()


def deploy(file: str, name: str | None = None) -> str:
    """Deploy tests/bpmn/<file> as an active workflow; returns its (unique) name."""
    return deploy_xml((BPMN / file).read_text(), name or f"{Path(file).stem}-{uuid.uuid4().hex[:8]}")


def deploy_xml(xml: str, name: str | None = None) -> str:
    """Deploy BPMN text (validated as `fleet apply` does) as an active workflow; returns its name."""
    name = name or f"workflow-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        deploy_workflow(session, name, xml, stages=[], activate=True)
    return name


def new_user(attributes: dict[str, Any] | None = None) -> uuid.UUID:
    import json

    with session_scope() as session:
        return session.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage, attributes) "
            "VALUES (:e, 'Acquisition', CAST(:a AS jsonb)) RETURNING id"),
            {"e": f"wf-{uuid.uuid4().hex[:10]}@example.com",
             "a": json.dumps(attributes or {})}).scalar_one()


def start(workflow: str, variables: dict[str, Any] | None = None,
          user_id: uuid.UUID | None = None) -> uuid.UUID:
    user_id = user_id or new_user()
    with session_scope() as session:
        execution_id = control.start(session, workflow, user_id, variables)
    send_step(execution_id, 0)
    return execution_id


def execution(execution_id: uuid.UUID) -> WorkflowExecution:
    with session_scope() as session:
        row = session.get(WorkflowExecution, execution_id)
        assert row is not None
        session.expunge(row)
        return row


def wait_status(execution_id: uuid.UUID, *statuses: str, timeout: float = 30) -> WorkflowExecution:
    return wait_for(lambda: (row := execution(execution_id)).status in statuses and row,
                    timeout=timeout, message=f"execution {execution_id} to be {statuses}")


def wait_waiting(execution_id: uuid.UUID, timeout: float = 30) -> WorkflowExecution:
    """Until the execution rests on a timer or a message, with no step on its way."""
    def resting() -> WorkflowExecution | None:
        row = execution(execution_id)
        if row.status == "running" and row.step_enqueued_at is None and (
                row.wake_at is not None or row.awaiting_events):
            return row
        return None
    return wait_for(resting, timeout=timeout, message=f"execution {execution_id} to wait")


def history(execution_id: uuid.UUID) -> list[tuple[int, str, str]]:
    """(seq, node id, outcome) of every step, in order."""
    with session_scope() as session:
        return [(s.seq, s.node_id, s.outcome) for s in session.execute(
            select(ExecutionStep).where(ExecutionStep.execution_id == execution_id)
            .order_by(ExecutionStep.seq)).scalars()]


def nodes(execution_id: uuid.UUID) -> list[str]:
    return [node for _, node, outcome in history(execution_id) if outcome == "completed"]


def wake_timers_until(execution_id: uuid.UUID, *statuses: str,
                      timeout: float = 30) -> WorkflowExecution:
    """Play the beat: send `workflows.wake_due_timers` until the execution is in `statuses`.

    No beat runs in the tests; each send steps every execution whose timer is due.
    """
    import time

    from tests.helpers import wait_for
    from workers.celery_app import app
    from workers.queues import TaskNames

    last_sent = 0.0

    def done() -> WorkflowExecution | None:
        nonlocal last_sent
        row = execution(execution_id)
        if row.status in statuses:
            return row
        if time.monotonic() - last_sent > 0.25:
            app.send_task(TaskNames.WAKE_DUE_TIMERS)
            last_sent = time.monotonic()
        return None
    return wait_for(done, timeout=timeout, interval=0.05,
                    message=f"execution {execution_id} to be {statuses} (waking timers)")


def cancel_unfinished(started: list[uuid.UUID]) -> None:
    """Cancel the executions a test left unfinished (and forget them): other tests' timer
    sweeps must not find them due."""
    from db.models import TERMINAL_EXECUTION_STATUSES

    for execution_id in started:
        if execution(execution_id).status not in TERMINAL_EXECUTION_STATUSES:
            with session_scope() as session:
                control.cancel(session, execution_id)
    started.clear()
