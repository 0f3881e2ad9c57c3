"""The `split` operator with real workers on real PostgreSQL: sticky branches, one exposure
per execution and node, and per-branch goal conversion (workers/reports/splits.py).

The module runs on a broker namespace of its own (a key prefix), as
tests/test_send_gateway_workers.py does: one worker steps workflows, ingests events and
runs the maintenance queue; each test starts the `actions` workers (where the split
decides) it needs, two with prefetch 1, so the calls really spread over processes.
tests/bpmn/ab_split.bpmn declares `treatment` first, which is not jsonb's key order:
for a 1:1 split the two orders give every user the other branch, so matching
`assign` with the declared order shows the operator reads it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy import text

from db.session import session_scope
from tests.fleet_namespace import Fleet, own_fleet, per_test
from tests.helpers import ROOT, TRIGGER_CACHE_SECONDS, WorkerProcess, wait_for
from tests.workflow_helpers import deploy, execution, new_user
from workers.engine import control
from workers.operators.context import OperatorContext, OperatorError
from workers.operators.split import split
from workers.operators.split_hash import assign
from workers.producer import send_event
from workers.queues import TaskNames
from workers.reports.lift import lift
from workers.reports.splits import split_conversions
from workers.sends.config import GoalDef, WorkflowSettings

pytestmark = pytest.mark.servers

DECLARED = {"treatment": 1, "control": 1}  # tests/bpmn/ab_split.bpmn's order
GOAL = "ab.converted"


@pytest.fixture(scope="module")
def module_fleet() -> Iterator[Fleet]:
    with own_fleet("splits", "workflows,events,maintenance") as fleet:
        yield fleet


@pytest.fixture()
def fleet(module_fleet: Fleet) -> Iterator[Fleet]:
    yield from per_test(module_fleet)


def _rows(sql: str, **params: Any) -> list[Any]:
    with session_scope() as session:
        return list(session.execute(text(sql), params).all())


def _count(sql: str, **params: Any) -> int:
    with session_scope() as session:
        return int(session.execute(text(sql), params).scalar_one())


def _wait_completed(ids: Sequence[uuid.UUID], timeout: float) -> None:
    wait_for(lambda: _count("SELECT count(*) FROM workflow_executions WHERE id = ANY(:ids) "
                            "AND status IN ('completed', 'failed', 'cancelled')",
                            ids=list(ids)) == len(ids),
             timeout=timeout, interval=0.2, message=f"{len(ids)} executions to end")
    statuses = Counter(r.status for r in _rows(
        "SELECT status FROM workflow_executions WHERE id = ANY(:ids)", ids=list(ids)))
    assert statuses == {"completed": len(ids)}, statuses


def _exposures(ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[Any]]:
    found: dict[uuid.UUID, list[Any]] = {i: [] for i in ids}
    for row in _rows("SELECT * FROM split_exposures WHERE execution_id = ANY(:ids)",
                     ids=list(ids)):
        found[row.execution_id].append(row)
    return found


def _set_goal(workflow: str) -> None:
    """The workflow's goal as `fleet apply` stores it; the events worker re-reads it."""
    settings = WorkflowSettings(goal=GoalDef(event_type=GOAL, within="1d"))
    with session_scope() as session:
        session.execute(text("UPDATE workflows SET settings = CAST(:s AS jsonb) WHERE name = :n"),
                        {"s": json.dumps(settings.model_dump(mode="json")), "n": workflow})
    time.sleep(3 * TRIGGER_CACHE_SECONDS)


def _split_calls(worker: WorkerProcess) -> int:
    return sum(1 for line in worker.log().splitlines()
               if '"event": "action.succeeded"' in line and '"operator": "split"' in line)


# --------------------------------------------------------------------------- workers


def test_200_users_take_the_branch_their_exposure_records_and_keep_it_on_re_entry(
        fleet: Fleet) -> None:
    workers = fleet.start_workers("actions", count=2)
    workflow = deploy("ab_split.bpmn")
    _set_goal(workflow)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    users = [new_user() for _ in range(200)]
    ids = fleet.start(workflow, users)
    _wait_completed(ids, timeout=180)

    exposures = _exposures(ids)
    assert all(len(rows) == 1 for rows in exposures.values()), "one exposure per execution"
    variant = {i: rows[0].variant for i, rows in exposures.items()}
    expected = {i: assign(user, workflow, "ab", DECLARED) for i, user in zip(ids, users,
                                                                             strict=True)}
    assert variant == expected
    assert all(rows[0].position == list(DECLARED).index(rows[0].variant)
               and rows[0].user_id == user and rows[0].node_id == "ab"
               for (_, rows), user in zip(exposures.items(), users, strict=True))
    shares = Counter(variant.values())
    assert set(shares) == set(DECLARED) and min(shares.values()) >= 60, shares  # 100 ± 40
    # The branch taken: its template in message_log, its node in the history, the variable.
    templates = {r.execution_id: r.template for r in _rows(
        "SELECT execution_id, template FROM message_log WHERE execution_id = ANY(:ids)",
        ids=ids)}
    assert templates == {i: f"ab_{v}" for i, v in variant.items()}
    sent_nodes = {(r.execution_id, r.node_id) for r in _rows(
        "SELECT execution_id, node_id FROM execution_steps WHERE execution_id = ANY(:ids) "
        "AND outcome = 'completed' AND node_id LIKE 'send_%'", ids=ids)}
    assert sent_nodes == {(i, f"send_{v}") for i, v in variant.items()}
    assert all((execution(i).variables or {})["ab"] == {"variant": v}
               for i, v in list(variant.items())[:20])
    assert all(_split_calls(w) for w in workers), [_split_calls(w) for w in workers]

    # Re-entry: 50 of them start again; each gets its first branch.
    again = fleet.start(workflow, users[:50])
    _wait_completed(again, timeout=120)
    second = _exposures(again)
    assert all(len(rows) == 1 for rows in second.values()), second
    assert {i: rows[0].variant for i, rows in second.items()} == \
        {j: variant[i] for i, j in zip(ids[:50], again, strict=True)}

    # Goals: every third user converts (both executions of a re-entered one).
    converters = users[::3]
    for user in converters:
        send_event(GOAL, user=user, via=fleet.app)
    all_ids = ids + again
    by_execution = dict(zip(all_ids, users + users[:50], strict=True))
    converted = {i for i, user in by_execution.items() if user in set(converters)}
    wait_for(lambda: _count("SELECT count(*) FROM execution_goals WHERE execution_id = ANY(:i)",
                            i=all_ids) == len(converted),
             timeout=60, message="the goal events to be recorded")
    all_variants = {**variant, **{j: variant[i] for i, j in zip(ids[:50], again, strict=True)}}
    expected_n = Counter(all_variants.values())
    expected_conv = Counter(all_variants[i] for i in converted)

    with session_scope() as session:
        (report,) = split_conversions(session, since, workflow=workflow)
        direct = {r.variant: (r.n, r.conv) for r in session.execute(text(
            "SELECT e.variant, count(*) AS n, count(g.execution_id) AS conv "
            "FROM split_exposures e JOIN workflows w ON w.id = e.workflow_id "
            "LEFT JOIN execution_goals g ON g.execution_id = e.execution_id "
            "WHERE w.name = :w GROUP BY e.variant"), {"w": workflow})}
    assert (report.workflow, report.node_id) == (workflow, "ab")
    assert [b.variant for b in report.branches] == list(DECLARED)  # the declared baseline first
    assert {b.variant: (b.exposures, b.converted) for b in report.branches} == direct == \
        {v: (expected_n[v], expected_conv[v]) for v in DECLARED}
    assert report.exposures == len(all_ids)
    base, other = report.branches
    assert base.lift is None and base.rate == expected_conv["treatment"] / expected_n["treatment"]
    assert other.lift == lift(expected_n["control"], expected_conv["control"],
                              expected_n["treatment"], expected_conv["treatment"])

    shown = subprocess.run([sys.executable, "-m", "workers.cli.main", "metrics", "show",
                            "--days", "1", "--json"], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, COLUMNS="200"), timeout=120)
    assert shown.returncode == 0, shown.stderr
    (entry,) = [s for s in json.loads(shown.stdout)["splits"] if s["workflow"] == workflow]
    assert [(b["variant"], b["exposures"], b["converted"], b["baseline"])
            for b in entry["branches"]] == [
        (v, expected_n[v], expected_conv[v], v == "treatment") for v in DECLARED]
    assert entry["branches"][1]["lift"]["difference"] == pytest.approx(other.lift.difference)
    human = subprocess.run([sys.executable, "-m", "workers.cli.main", "metrics", "show",
                            "--days", "1"], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, COLUMNS="250"), timeout=120)
    assert human.returncode == 0, human.stderr
    assert "A/B splits" in human.stdout and "baseline" in human.stdout


def test_a_redelivered_operator_call_records_one_exposure(fleet: Fleet) -> None:
    """Every split call is in the queue three times before an actions worker starts; two
    workers race on the copies: each call runs once, each execution has one exposure."""
    workflow = deploy("ab_split.bpmn")
    users = [new_user() for _ in range(30)]
    ids = fleet.start(workflow, users)
    wait_for(lambda: _count("SELECT count(*) FROM action_deliveries WHERE execution_id = "
                            "ANY(:i) AND node_id = 'ab'", i=ids) == len(ids),
             timeout=60, message="the split calls to be asked for")
    keys = [r.key for r in _rows("SELECT key FROM action_deliveries WHERE execution_id = "
                                 "ANY(:i) AND node_id = 'ab'", i=ids)]
    with fleet.app.producer_or_acquire() as producer:
        for key in keys * 2:
            fleet.app.send_task(TaskNames.RUN_ACTION, args=[key], producer=producer)
    workers = fleet.start_workers("actions", count=2)
    _wait_completed(ids, timeout=120)
    exposures = _exposures(ids)
    assert all(len(rows) == 1 for rows in exposures.values()), exposures
    assert {i: rows[0].variant for i, rows in exposures.items()} == \
        {i: assign(u, workflow, "ab", DECLARED) for i, u in zip(ids, users, strict=True)}
    attempts = _rows("SELECT status, attempts FROM action_deliveries WHERE key = ANY(:k)", k=keys)
    assert Counter((r.status, r.attempts) for r in attempts) == {("succeeded", 1): len(keys)}
    assert sum(_split_calls(w) for w in workers) == len(keys)
    assert _count("SELECT count(*) FROM message_log WHERE execution_id = ANY(:i)",
                  i=ids) == len(ids)


# --------------------------------------------------------------------------- the operator


def _context(session: Any, execution_id: uuid.UUID, key: str) -> OperatorContext:
    row = session.execute(text("SELECT workflow_id, user_id FROM workflow_executions "
                               "WHERE id = :e"), {"e": execution_id}).one()
    return OperatorContext(session=session, execution_id=execution_id,
                           workflow_id=row.workflow_id, user_id=row.user_id, node_id="ab",
                           key=key, now=dt.datetime.now(dt.UTC))


def test_a_repeated_call_records_one_exposure_and_returns_the_recorded_variant() -> None:
    """Called directly (no workers): the params as jsonb hands them over (control first)."""
    workflow = deploy("ab_split.bpmn")
    user = new_user()
    with session_scope() as session:
        execution_id = control.start(session, workflow, user)
    as_stored = {"variants": {"control": 1, "treatment": 1}}
    with session_scope() as session:
        first = split(_context(session, execution_id, "k1"), as_stored)
    assert first == {"variant": assign(user, workflow, "ab", DECLARED)}
    with session_scope() as session:  # a loop back to the split: another call, same node
        assert split(_context(session, execution_id, "k2"), as_stored) == first
    other = "control" if first["variant"] == "treatment" else "treatment"
    with session_scope() as session:  # whatever is recorded is what the branch follows
        session.execute(text("UPDATE split_exposures SET variant = :v WHERE execution_id = :e"),
                        {"v": other, "e": execution_id})
    with session_scope() as session:
        assert split(_context(session, execution_id, "k3"), as_stored) == {"variant": other}
    assert _count("SELECT count(*) FROM split_exposures WHERE execution_id = :e",
                  e=execution_id) == 1

    with session_scope() as session:
        ctx = _context(session, execution_id, "k4")
        with pytest.raises(OperatorError, match="parameter 'variants' is required"):
            split(ctx, {})
        with pytest.raises(OperatorError, match="parameter 'variants' must be dict, got list"):
            split(ctx, {"variants": ["a", "b"]})
        with pytest.raises(OperatorError, match="parameter 'variants': variant name 'a b' is "
                                                "not an identifier"):
            split(ctx, {"variants": {"a b": 1, "c": 1}})
        with pytest.raises(OperatorError, match="weight of variant 'c' must be a positive"):
            split(ctx, {"variants": {"a": 1, "c": 0}})
