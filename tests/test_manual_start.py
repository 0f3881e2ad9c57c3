"""`fleet execution start` and `control.start`: a start by hand, once per key, through real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.models import User, Workflow, WorkflowExecution
from tests.helpers import ROOT, WorkerProcess
from tests.workflow_helpers import deploy, deploy_xml, execution, new_user, wait_status
from workers.engine import control

pytestmark = pytest.mark.servers

DOUBLE = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
                  id="double-definitions" targetNamespace="http://lifecycle-fleet/test">
  <bpmn:process id="double" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>to_double</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="to_double" sourceRef="start" targetRef="double_it"/>
    <bpmn:scriptTask id="double_it">
      <bpmn:incoming>to_double</bpmn:incoming><bpmn:outgoing>to_end</bpmn:outgoing>
      <bpmn:script>doubled = n * 2
who = user["email"]</bpmn:script>
    </bpmn:scriptTask>
    <bpmn:sequenceFlow id="to_end" sourceRef="double_it" targetRef="end"/>
    <bpmn:endEvent id="end"><bpmn:incoming>to_end</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>
"""


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli.main", *args], cwd=ROOT,
                          env=dict(os.environ, COLUMNS="250"), capture_output=True, text=True,
                          timeout=120)


def _count(engine: Engine, workflow: str) -> int:
    with Session(engine) as session:
        return session.execute(select(func.count()).select_from(WorkflowExecution)
                               .join(Workflow, Workflow.id == WorkflowExecution.workflow_id)
                               .where(Workflow.name == workflow)).scalar_one()


def test_a_key_starts_once_even_when_two_starts_race(engine: Engine) -> None:
    workflow, user = deploy("minimal.bpmn"), new_user()
    with Session(engine) as first:
        started = control.start(first, workflow, user, {"n": 1}, key="order-1")
        # A second start with the key waits on the unique index until the first commits.
        answers: list[uuid.UUID] = []

        def second() -> None:
            with Session(engine) as session, session.begin():
                answers.append(control.start(session, workflow, user, {"n": 2}, key="order-1"))

        racing = threading.Thread(target=second)
        racing.start()
        racing.join(0.5)
        assert racing.is_alive()  # blocked on the first, uncommitted start
        first.commit()
        racing.join(10)
    assert answers == [started]
    with Session(engine) as session, session.begin():
        assert control.start(session, workflow, user, key="order-1") == started
        other = control.start(session, workflow, user, key="order-2")
        unkeyed = control.start(session, workflow, user)
    assert len({started, other, unkeyed}) == 3
    assert _count(engine, workflow) == 3
    assert execution(started).variables == {"n": 1}


def test_fleet_execution_start_runs_a_workflow_with_its_data(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    workflow = deploy_xml(DOUBLE)
    user = new_user()
    with Session(engine) as session:
        email = session.execute(select(User.email).where(User.id == user)).scalar_one()
    result = fleet("execution", "start", workflow, "--user", email.upper(), "--data", '{"n": 21}',
                   "--key", "k1")
    assert result.returncode == 0, result.stderr
    execution_id = uuid.UUID(result.stdout.strip())
    row = wait_status(execution_id, "completed")
    assert row.start_key == "k1" and row.user_id == user
    assert row.variables is not None
    assert (row.variables["n"], row.variables["doubled"], row.variables["who"]) == \
        (21, 42, email)
    assert row.variables["user"]["id"] == str(user)

    again = fleet("execution", "start", workflow, "--user", str(user), "--data", '{"n": 5}',
                  "--key", "k1")
    assert again.returncode == 0, again.stderr
    assert uuid.UUID(again.stdout.strip()) == execution_id
    assert _count(engine, workflow) == 1
    assert execution(execution_id).variables == row.variables  # the repeat changed nothing


@pytest.mark.parametrize(("args", "code", "message"), [
    (("--data", "{not json"), 2, "invalid --data: not JSON"),
    (("--data", json.dumps([1, 2])), 2, "invalid --data: expected a JSON object"),
    (("--user", "nobody-here@example.com"), 1, "no user with email or id"),
    (("--user", str(uuid.UUID(int=0))), 1, "no user with email or id"),
    (("--data", '{"user": 1}'), 1, "start variables may not be named user"),
])
def test_bad_data_and_unknown_users_are_one_clear_line(args: tuple[str, ...], code: int,
                                                       message: str) -> None:
    workflow, user = deploy("minimal.bpmn"), new_user()
    options = {"--user": str(user), "--data": "{}"}
    options.update(dict(zip(args[::2], args[1::2], strict=True)))
    result = fleet("execution", "start", workflow, *[v for kv in options.items() for v in kv])
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_an_unknown_or_inactive_workflow_is_refused(engine: Engine) -> None:
    user = str(new_user())
    missing = fleet("execution", "start", f"no-such-{uuid.uuid4().hex[:8]}", "--user", user)
    assert missing.returncode == 1 and "no workflow named" in missing.stderr
    workflow = deploy("minimal.bpmn")
    assert fleet("workflow", "status", workflow, "inactive").returncode == 0
    inactive = fleet("execution", "start", workflow, "--user", user)
    assert inactive.returncode == 1 and "is inactive, not active" in inactive.stderr
    assert _count(engine, workflow) == 0
