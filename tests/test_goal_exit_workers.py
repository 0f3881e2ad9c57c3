"""Goal exits end to end, with real workers on a broker namespace of their own.

Journeys wait for a reply (a message) or for a person (a human task) before a nudge.
The goal event, sent as any producer sends it, ends them where they wait: the
events worker records the goal and the exit and sends a step, the workflows worker
ends the execution. A reply sent afterwards wakes nothing and no nudge goes out;
the same journey without `exit_on_goal` sends its nudge (the negative control).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from db.session import session_scope
from tests.fleet_namespace import Fleet, own_fleet
from tests.helpers import TRIGGER_CACHE_SECONDS, wait_for
from tests.test_goal_exit import REPLY, _etype, _sent, _workflow
from tests.workflow_helpers import execution, history, new_user
from workers.producer import send_event

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with own_fleet("goalexit", "workflows,events,actions,maintenance") as fleet:
        yield fleet


def _resting(execution_id: uuid.UUID) -> bool:
    row = execution(execution_id)
    return (row.status == "running" and row.step_enqueued_at is None
            and bool(row.awaiting_events or row.awaiting_tasks))


def test_a_goal_event_ends_waiting_journeys_and_no_nudge_goes_out(fleet: Fleet) -> None:
    goal = _etype()
    exiting = {wait: _workflow(wait, goal=goal) for wait in ("message", "human")}
    going_on = _workflow("message", goal=goal, exit_on_goal=False)
    time.sleep(3 * TRIGGER_CACHE_SECONDS)  # the workers' definitions are read again
    users = {name: new_user() for name in (*exiting, "control")}
    runs = {name: fleet.start(workflow, [users[name]])[0] for name, workflow in
            [*exiting.items(), ("control", going_on)]}
    wait_for(lambda: all(_resting(run) for run in runs.values()), timeout=60,
             message="the journeys to wait")

    for user in users.values():
        send_event(goal, user=user, via=fleet.app)
    ended = [runs[name] for name in exiting]
    wait_for(lambda: all(execution(run).status == "completed" for run in ended), timeout=60,
             message="the waiting journeys to end on their goal")
    for run in ended:
        assert execution(run).outcome == "goal" and history(run)[-1][2] == "exited"
    with session_scope() as session:
        recorded: dict[uuid.UUID, bool] = dict(session.execute(text(
            "SELECT x.execution_id, g.event_id = x.event_id FROM execution_exits x "
            "JOIN execution_goals g USING (execution_id) "
            "WHERE x.execution_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": list(runs.values())}).all())
    assert recorded == {runs[name]: True for name in exiting}  # the goal event, recorded

    for user in users.values():  # the reply the nudge waited for, after the goal
        send_event(REPLY, user=user, via=fleet.app)
    wait_for(lambda: _sent(runs["control"]) == (["sent"], 1), timeout=60,
             message="the control journey's nudge")
    assert execution(runs["control"]).outcome is None
    for name in exiting:
        assert _sent(runs[name]) == ([], 0)
        assert execution(runs[name]).status == "completed"
