"""No zombie executions: what cannot be saved fails the execution; the reaper is bounded.

A step whose state PostgreSQL refused failed at commit on every delivery: the step
was dead-lettered, the execution stayed `running` with no error, the reaper re-sent
it for ever, and a `no_concurrent` trigger never let its user in again. The reaper also re-sent steps of operator calls still
inside their retry chain, doubling the chain.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, bindparam, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError, StatementError

from db.session import session_scope
from tests.helpers import TRIGGER_CACHE_SECONDS, WorkerProcess, wait_for
from tests.workflow_helpers import (
    BPMN,
    deploy_xml,
    execution,
    history,
    new_user,
    start,
    wait_status,
)
from workers.definitions import apply, load
from workers.engine import control, sandbox, state, stepper
from workers.engine.timers import claim_stuck
from workers.engine.values import Refused, check_storable
from workers.producer import send_event
from workers.retry_policy import backoff_delay
from workers.settings import Settings

pytestmark = pytest.mark.servers

SCORE = (BPMN / "score_gateway.bpmn").read_text()


def _with_script(script: str) -> str:
    """score_gateway.bpmn whose `compute` script runs `script` first."""
    return SCORE.replace("score = base * 2", script + "\nscore = base * 2")


# --------------------------------------------------------------------------- unsaveable state

@pytest.mark.parametrize(("script", "reason"), [
    ("a = []\na.append(a)", "contain itself"),
    ("x = []\nfor i in range(30000):\n    x = [x]", "nested deeper than 100"),
    ("r = [range(3)]", r"variable 'r'\[0\] holds a range"),
    ("f = float('nan')", "the number nan"),
    ("z = 'a\\x00b'", "NUL"),
    ("k = {(1, 2): 3}", "a key that is a tuple"),
    ("s = [set([1])]", "a set"),
])
def test_a_script_leaving_what_cannot_be_saved_fails_at_its_node(
        celery_worker: WorkerProcess, script: str, reason: str) -> None:
    name = deploy_xml(_with_script(script))  # each deploys: only running it can tell
    execution_id = start(name, {"base": 1})
    failed = wait_status(execution_id, "failed", "completed")
    assert failed.status == "failed" and failed.current_node_id == "compute"
    assert "node compute" in (failed.error_message or "")
    assert re.search(reason, failed.error_message or ""), failed.error_message
    assert history(execution_id)[-1][1:] == ("compute", "failed")
    assert failed.step_enqueued_at is None and failed.completed_at is not None


def test_dates_and_durations_left_by_a_script_are_stored_and_come_back(
        celery_worker: WorkerProcess) -> None:
    """They made every execution a zombie: the engine state held a datetime."""
    xml = _with_script("due = now() + days(2)\nwait = hours(3)\nday = due.date()").replace(
        "score &gt; 10", "due &gt; now() + days(1) and wait.total_seconds() == 10800 "
                         "and day.year &gt; 2000")
    execution_id = start(deploy_xml(xml), {"base": 1})
    done = wait_status(execution_id, "completed", "failed")
    assert done.status == "completed", done.error_message
    assert done.variables["route"] == "high"
    assert dt.datetime.fromisoformat(done.variables["due"]) > dt.datetime.now(dt.UTC)


def test_data_that_looks_like_a_serialized_object_stays_data(
        celery_worker: WorkerProcess) -> None:
    """A producer's dict with a `typename` key was restored as SpiffWorkflow's object."""
    payload = {"typename": "BpmnWorkflow", "tasks": [1]}
    when = {"typename": "datetime", "value": "2020-01-01T00:00:00"}
    nested = {"typename": "FleetLiteral", "value": {"typename": "UUID", "value": "x"}}
    execution_id = start(deploy_xml(SCORE), {"base": 1, "payload": payload, "when": when,
                                             "nested": [nested]})
    done = wait_status(execution_id, "completed", "failed")
    assert done.status == "completed", done.error_message
    assert (done.variables["payload"], done.variables["when"], done.variables["nested"]) == \
        (payload, when, [nested])


def test_an_operator_parameter_that_cannot_be_saved_fails_the_node(
        celery_worker: WorkerProcess) -> None:
    xml = (BPMN / "engine_webhook.bpmn").read_text().replace(
        "{&quot;user&quot;: user[&quot;email&quot;]}", "{&quot;at&quot;: now()}")
    execution_id = start(deploy_xml(xml), {"hook_url": "http://127.0.0.1:9/"})
    failed = wait_status(execution_id, "failed", "completed")
    assert failed.current_node_id == "notify"
    assert "parameter 'payload'['at'] holds a datetime" in (failed.error_message or "")
    with session_scope() as session:
        assert session.execute(text("SELECT count(*) FROM action_deliveries "
                                    "WHERE execution_id = :i"), {"i": execution_id}).scalar() == 0


def test_a_refused_save_is_rolled_back_and_the_failure_written_on_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past every Python check, PostgreSQL itself refuses the state (a NUL in jsonb)."""
    monkeypatch.setattr(sandbox, "_refuse_unstorable", lambda variables: None)
    monkeypatch.setattr(state, "check_json", lambda value, what: None)
    name = deploy_xml(_with_script("z = 'a\\x00b'"))
    with session_scope() as session:
        execution_id = control.start(session, name, new_user(), {"base": 1})
    results = []
    for _ in range(3):  # start, compute (refused), then nothing: the execution failed
        with session_scope() as session:
            results.append(stepper.step(session, execution_id, execution(execution_id)
                                        .state_version).outcome)
    assert results == ["completed", "failed", "noop"]
    failed = execution(execution_id)
    assert failed.status == "failed" and failed.current_node_id == "compute"
    assert "node compute: the execution's state cannot be saved" in (failed.error_message or "")
    assert [outcome for _, _, outcome in history(execution_id)] == ["completed", "failed"]
    assert "z" not in (failed.variables or {})  # the refused write was rolled back


def test_a_user_of_a_no_concurrent_trigger_can_enter_again_after_a_failure(
        celery_worker: WorkerProcess, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]  # the flow needs no variables: the trigger gives it none
    (tmp_path / "flow.bpmn").write_text(SCORE.replace("score = base * 2",
                                                      "a = []\na.append(a)\nscore = 1"))
    (tmp_path / "defs.yaml").write_text(
        f"workflows:\n  - {{name: zombie-{tag}, file: flow.bpmn}}\n"
        f"triggers:\n  - name: zombie-{tag}\n    event_type: zombie.t{tag}\n"
        f"    workflow: zombie-{tag}\n    reentry: no_concurrent\n")
    doc, xml = load(tmp_path / "defs.yaml")
    with session_scope() as session:
        apply(session, doc, xml)
    time.sleep(TRIGGER_CACHE_SECONDS * 2)
    email = f"zombie-{tag}@example.com"

    def executions() -> list[Any]:
        with session_scope() as session:
            return list(session.execute(text(
                "SELECT e.id, e.status FROM workflow_executions e JOIN users u "
                "ON u.id = e.user_id WHERE u.email = :e ORDER BY e.started_at"), {"e": email}))
    for count in (1, 2):
        send_event(f"zombie.t{tag}", user=email, data={"base": 1})
        wait_for(lambda c=count: len(rows := executions()) == c and rows[-1].status == "failed",
                 timeout=30, message=f"execution {count} to start and fail")


# --------------------------------------------------------------------------- the wall clock

def test_the_wall_clock_stops_a_slow_script_in_a_prefork_worker(
        celery_worker: WorkerProcess) -> None:
    """A few hundred steps, each a 900,000-item comparison: only SIGALRM stops it in time."""
    script = ("x = list(range(100000))\ny = list(range(100000))\na = [x] * 9\nb = [y] * 9\n"
              "for i in range(200):\n    same = a == b")
    execution_id = start(deploy_xml(_with_script(script)), {"base": 1})
    failed = wait_status(execution_id, "failed", "completed", timeout=60)
    assert failed.status == "failed"
    assert "ran longer than 1.0 s" in (failed.error_message or "")


# --------------------------------------------------------------------------- a bounded reaper

def _sent_long_ago(execution_id: uuid.UUID, ago: dt.timedelta) -> None:
    with session_scope() as session:
        session.execute(text("UPDATE workflow_executions SET step_enqueued_at = "
                             "now() - CAST(:ago AS interval) WHERE id = :i"),
                        {"ago": ago, "i": execution_id})


def _reap(execution_id: uuid.UUID, *, max_resends: int = 3,
          retry_chain: dt.timedelta = dt.timedelta(0)) -> list[tuple[uuid.UUID, int]]:
    with session_scope() as session:
        return [s for s in claim_stuck(session, dt.datetime.now(dt.UTC), dt.timedelta(minutes=10),
                                       max_resends=max_resends, retry_chain=retry_chain)
                if s[0] == execution_id]


def _lost(name: str = "score_gateway.bpmn") -> uuid.UUID:
    """An execution whose first step message was never sent."""
    with session_scope() as session:
        return control.start(session, name, new_user(), {"base": 1})


def test_the_reaper_fails_an_execution_it_re_sent_n_times_without_progress() -> None:
    name = deploy_xml(SCORE)
    execution_id = _lost(name)
    resent = []
    for _ in range(4):
        _sent_long_ago(execution_id, dt.timedelta(hours=1))
        resent.append(_reap(execution_id))
    assert resent == [[(execution_id, 1)], [(execution_id, 2)], [(execution_id, 3)], []]
    failed = execution(execution_id)
    assert failed.status == "failed" and failed.step_enqueued_at is None
    assert "step re-sent 3 times without progress" in (failed.error_message or "")
    with session_scope() as session:
        steps = session.execute(text("SELECT seq, node_type, outcome, attempt FROM "
                                     "execution_steps WHERE execution_id = :i ORDER BY seq"),
                                {"i": execution_id}).all()
    assert [tuple(s) for s in steps] == [(1, "Reaper", "retrying", 1), (2, "Reaper", "retrying", 2),
                                         (3, "Reaper", "retrying", 3), (4, "Reaper", "failed", 4)]
    _sent_long_ago(execution_id, dt.timedelta(hours=1))
    assert _reap(execution_id) == []


def test_progress_starts_the_count_again() -> None:
    name = deploy_xml(SCORE)
    execution_id = _lost(name)
    for _ in range(2):
        _sent_long_ago(execution_id, dt.timedelta(hours=1))
        (resent,) = _reap(execution_id)
    with session_scope() as session:  # the re-sent step runs a node
        assert stepper.step(session, execution_id, resent[1]).outcome == "completed"
    _sent_long_ago(execution_id, dt.timedelta(hours=1))
    assert _reap(execution_id) == [(execution_id, 4)]
    with session_scope() as session:
        attempts = session.execute(text("SELECT attempt FROM execution_steps WHERE "
                                        "execution_id = :i AND outcome = 'retrying' ORDER BY seq"),
                                   {"i": execution_id}).scalars().all()
    assert attempts == [1, 2, 1]


def test_an_operator_call_inside_its_retry_chain_is_not_re_sent() -> None:
    """With FLEET_STUCK_STEP_SECONDS below the retry chain, the reaper doubled the chain."""
    name = deploy_xml((BPMN / "engine_webhook.bpmn").read_text())
    with session_scope() as session:
        execution_id = control.start(session, name, new_user(), {"hook_url": "http://x/"})
    for version in (0, 1):  # start, then the service task asks for its operator
        with session_scope() as session:
            stepper.step(session, execution_id, version)
    chain = dt.timedelta(seconds=Settings(stuck_step_seconds=20).operator_retry_chain_seconds)
    _sent_long_ago(execution_id, dt.timedelta(minutes=10) + chain / 2)
    assert _reap(execution_id, retry_chain=chain) == []
    _sent_long_ago(execution_id, dt.timedelta(minutes=10) + chain * 2)
    assert _reap(execution_id, retry_chain=chain) == [(execution_id, 3)]


def test_the_retry_chain_is_computed_from_the_retry_settings() -> None:
    chain = Settings(task_max_retries=3, retry_backoff_base=1, retry_backoff_max=3,
                     webhook_timeout=2).operator_retry_chain_seconds
    assert chain == (1 + 2 + 3) + 4 * 2
    assert Settings(stuck_step_seconds=20).operator_retry_chain_seconds > 20


@settings(max_examples=200, deadline=None)
@given(retries=st.integers(0, 12), base=st.floats(0.01, 60), cap=st.floats(0.01, 600),
       timeout=st.floats(0.1, 60), seed=st.integers())
def test_no_retry_chain_outlasts_the_computed_one(retries: int, base: float, cap: float,
                                                  timeout: float, seed: int) -> None:
    """Whatever the jitter draws, delays plus attempts stay within the computed chain."""
    random.seed(seed)
    drawn = sum(backoff_delay(r, base, cap) for r in range(retries)) + (retries + 1) * timeout
    configured = Settings(task_max_retries=retries, retry_backoff_base=base,
                          retry_backoff_max=cap, webhook_timeout=timeout)
    assert drawn <= configured.operator_retry_chain_seconds + 1e-6


# --------------------------------------------------------------------------- storable = jsonb

_SCALARS = (st.none() | st.booleans() | st.integers(-(2**80), 2**80)
            | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(st.characters(codec=None, exclude_categories=()), max_size=8))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.tuples(inner, inner)
                       | st.dictionaries(st.text(st.characters(exclude_categories=()),
                                                 max_size=4) | st.integers(), inner,
                                         max_size=4), max_leaves=12)


def _has_surrogates(value: Any) -> bool:
    return re.search("[\ud800-\udfff]", json.dumps(value, ensure_ascii=False)) is not None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_VALUES)
def test_storable_is_what_jsonb_accepts(engine: Engine, value: Any) -> None:
    """The engine's check agrees with PostgreSQL, through the column type the engine writes.

    It is stricter in one case only: surrogates, even two that jsonb would pair up
    into one character (and so not give back as they were).
    """
    try:
        check_storable("v", value, extra=())
        ours = True
    except Refused:
        ours = False
    with engine.connect() as connection:
        try:
            connection.execute(select(bindparam("v", value, type_=JSONB))).scalar()
            theirs = True
        except (DBAPIError, StatementError, ValueError, TypeError, UnicodeError):
            theirs = False
    assert ours == theirs or (theirs and _has_surrogates(value)), value
