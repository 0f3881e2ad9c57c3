"""Segment entry triggers end to end, with real workers on a broker namespace of their own.

A refresh task that moves memberships writes the entries to the outbox and sends
the relay itself; an identify's entry goes out with the beat's relay (sent here by
the test, as the beat would). Either way the event is ingested like any other and
the trigger's journey runs to its end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from db.session import session_scope
from tests.fleet_namespace import Fleet, own_fleet
from tests.helpers import TRIGGER_CACHE_SECONDS, wait_for
from tests.test_segment_triggers import _segment, _watch
from tests.workflow_helpers import deploy, new_user
from workers.producer import send_event
from workers.queues import TaskNames

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with own_fleet("segtrig", "workflows,events,maintenance,segments") as fleet:
        yield fleet


def _completed(trigger_id: uuid.UUID) -> dict[uuid.UUID, str]:
    with session_scope() as session:
        return {r.user_id: r.status for r in session.execute(text(
            "SELECT user_id, status FROM workflow_executions WHERE trigger_id = :t"),
            {"t": trigger_id})}


def test_entries_by_the_refresh_and_by_identify_start_journeys_that_complete(
        fleet: Fleet) -> None:
    key = f"plan_{uuid.uuid4().hex[:6]}"
    workflow = deploy("minimal.bpmn")
    segment = _segment({"field": f"user.attributes.{key}", "op": "eq", "value": "pro"})
    trigger = _watch(segment, "segment.entered", workflow)
    time.sleep(3 * TRIGGER_CACHE_SECONDS)
    members = [new_user({key: "pro"}) for _ in range(5)]  # never evaluated yet
    fleet.app.send_task(TaskNames.REFRESH_SEGMENT, args=[str(segment)])
    # No relay sent by the test: the refresh sends it after its commit.
    wait_for(lambda: _completed(trigger) == dict.fromkeys(members, "completed"), timeout=60,
             message="the refresh's entries to start and finish their journeys")

    late = new_user({key: "free"})
    send_event("user.identify", user=late, data={key: "pro"}, via=fleet.app)
    last_relay = 0.0

    def entered() -> Any:
        nonlocal last_relay
        if time.monotonic() - last_relay > 0.5:  # the beat's relay-outbox
            fleet.app.send_task(TaskNames.RELAY_OUTBOX)
            last_relay = time.monotonic()
        return _completed(trigger).get(late) == "completed"
    wait_for(entered, timeout=60, message="the identify's entry to start and finish a journey")
    assert len(_completed(trigger)) == 6
