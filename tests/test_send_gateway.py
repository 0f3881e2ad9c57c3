"""The send gateway on a real database with fixed clocks: each outcome, and a deferred send.

`stepper.step` and `run_action` are called directly (one transaction each, as the
tasks do). The races between real workers are in tests/test_send_gateway_workers.py.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from db.models import ActionDelivery, ExecutionStatus
from db.session import session_scope
from tests.workflow_helpers import (
    cancel_unfinished,
    deploy,
    execution,
    new_user,
    nodes,
    store_messaging,
)
from workers.engine import control, stepper
from workers.operators.deliveries import run_action

pytestmark = pytest.mark.servers

# Monday 2030-01-07 07:00 UTC: 08:00 in Paris, before a 09:00-20:00 window.
EARLY = dt.datetime(2030, 1, 7, 7, 0, tzinfo=dt.UTC)
OPEN = dt.datetime(2030, 1, 7, 8, 0, tzinfo=dt.UTC)  # 09:00 in Paris


@pytest.fixture()
def policy() -> Iterator[Any]:
    """Set the program's messaging policy for one test (and reset the worker's cache)."""
    yield store_messaging
    store_messaging(None)


STARTED: list[uuid.UUID] = []


@pytest.fixture(autouse=True)
def _cancel_what_waits() -> Iterator[None]:
    """Executions a test leaves waiting on a timer of its fixed 2030 clock are cancelled:
    other tests' timer sweeps would find them due."""
    yield
    cancel_unfinished(STARTED)


def _start(user: uuid.UUID, now: dt.datetime, bpmn: str = "one_send.bpmn") -> uuid.UUID:
    with session_scope() as session:
        execution_id = control.start(session, deploy(bpmn), user, {}, now=now)
    STARTED.append(execution_id)
    return execution_id


def _to_the_send(execution_id: uuid.UUID, now: dt.datetime) -> str:
    """Step until the send's operator call is asked for; returns its key."""
    version = 0
    while True:
        with session_scope() as session:
            result = stepper.step(session, execution_id, version, now=now)
        if result.action_key is not None:
            return result.action_key
        assert result.next_version is not None, result
        version = result.next_version


def _step_to_the_end(execution_id: uuid.UUID, now: dt.datetime) -> None:
    version: int | None = execution(execution_id).state_version
    while version is not None:
        with session_scope() as session:
            version = stepper.step(session, execution_id, version, now=now).next_version


def _send_row(key: str) -> Any:
    with session_scope() as session:
        return session.execute(text("SELECT * FROM sends WHERE key = :k"), {"k": key}).one()


def test_a_send_outside_the_window_waits_on_a_timer_and_goes_out_when_it_opens(
        policy: Any) -> None:
    policy({"timezone": "Europe/Paris", "send_window": {"hours": "09:00-20:00"}})
    execution_id = _start(new_user(), EARLY)
    key = _to_the_send(execution_id, EARLY)
    with session_scope() as session:
        assert run_action(session, key, now=EARLY).status == "deferred"
    row = execution(execution_id)
    assert row.wake_at == OPEN and row.step_enqueued_at is None
    assert _send_row(key).outcome == "deferred"
    with session_scope() as session:  # the timer wakes it: the step asks for the call again
        result = stepper.step(session, execution_id, row.state_version, now=OPEN)
    assert result.action_key == key
    with session_scope() as session:
        assert run_action(session, key, now=OPEN).status == "succeeded"
        delivery = session.get(ActionDelivery, key)
        assert delivery is not None and delivery.send_outcome == "sent"
    sent = _send_row(key)
    assert (sent.outcome, sent.deferrals, sent.sent_at) == ("sent", 1, OPEN)


def test_an_unsubscribed_user_is_suppressed_and_the_execution_goes_on(policy: Any) -> None:
    policy({})
    user = new_user({"unsubscribed": ["email"]})
    execution_id = _start(user, OPEN)
    key = _to_the_send(execution_id, OPEN)
    with session_scope() as session:
        assert run_action(session, key, now=OPEN).status == "succeeded"
        delivery = session.get(ActionDelivery, key)
        assert delivery is not None and delivery.send_outcome == "suppressed"
        assert delivery.result is not None and delivery.result["outcome"] == "suppressed"
        assert session.execute(text("SELECT count(*) FROM message_log WHERE idempotency_key "
                                    "= :k"), {"k": key}).scalar_one() == 0
    _step_to_the_end(execution_id, OPEN)
    assert execution(execution_id).status == ExecutionStatus.COMPLETED
    assert (execution(execution_id).variables or {})["sent"]["outcome"] == "suppressed"


def test_a_cap_of_one_per_day_caps_the_second_send(policy: Any) -> None:
    policy({"caps": [{"max": 1, "per": "day", "channel": "email"}]})
    user = new_user()
    outcomes = []
    for _ in range(2):
        key = _to_the_send(_start(user, OPEN), OPEN)
        with session_scope() as session:
            run_action(session, key, now=OPEN)
        outcomes.append(_send_row(key).outcome)
    assert outcomes == ["sent", "capped"]


# --------------------------------------------------------------------------- zones, DST, bypasses

# Saturday 2030-03-30 21:00 UTC: Paris is past its weekday window, and on Sunday its clocks
# go forward (CET to CEST), so Monday's 09:00 is 07:00 UTC, not 08:00 as the week before.
DST_SATURDAY = dt.datetime(2030, 3, 30, 21, 0, tzinfo=dt.UTC)
DST_MONDAY_OPEN = dt.datetime(2030, 4, 1, 7, 0, tzinfo=dt.UTC)
# Sunday 2030-01-06 18:00 UTC: 19:00 in Paris, inside a 09:00-20:00 window every day.
SUNDAY_EVENING = dt.datetime(2030, 1, 6, 18, 0, tzinfo=dt.UTC)
# Monday 2030-01-07 03:00 UTC: 08:30 in Kolkata (UTC+5:30), 08:45 in Kathmandu (UTC+5:45).
NIGHT = dt.datetime(2030, 1, 7, 3, 0, tzinfo=dt.UTC)
PARIS_WINDOW = {"timezone": "Europe/Paris", "send_window": {"hours": "09:00-20:00"}}


def _send(user: uuid.UUID, now: dt.datetime, bpmn: str = "one_send.bpmn") -> str:
    """Start an execution and run its send's operator call at `now`; returns the call's key."""
    key = _to_the_send(_start(user, now, bpmn), now)
    with session_scope() as session:
        run_action(session, key, now=now)
    return key


def _deferred(user: uuid.UUID, now: dt.datetime) -> tuple[uuid.UUID, str]:
    """An execution whose send the gateway put off at `now`: (execution id, call key)."""
    execution_id = _start(user, now)
    key = _to_the_send(execution_id, now)
    with session_scope() as session:
        assert run_action(session, key, now=now).status == "deferred"
    return execution_id, key


def _release(execution_id: uuid.UUID, key: str, at: dt.datetime) -> None:
    """What the timer does at `at`: a step that asks for the call again, and the call."""
    with session_scope() as session:
        result = stepper.step(session, execution_id, execution(execution_id).state_version, now=at)
    assert result.action_key == key, result
    with session_scope() as session:
        assert run_action(session, key, now=at).status == "succeeded"


def _messages(key: str) -> int:
    with session_scope() as session:
        return session.execute(text("SELECT count(*) FROM message_log WHERE idempotency_key = :k"),
                               {"k": key}).scalar_one()


def test_a_send_deferred_over_the_spring_dst_change_goes_out_at_nine_local_on_monday(
        policy: Any) -> None:
    policy({"timezone": "Europe/Paris",
            "send_window": {"hours": "09:00-20:00", "days": ["weekdays"]}})
    execution_id, key = _deferred(new_user(), DST_SATURDAY)
    waiting = execution(execution_id)
    assert waiting.wake_at == DST_MONDAY_OPEN
    assert _send_row(key).deferred_until == DST_MONDAY_OPEN
    an_hour_early = DST_MONDAY_OPEN - dt.timedelta(hours=1)  # 09:00 had the clocks not moved
    with session_scope() as session:
        early = stepper.step(session, execution_id, waiting.state_version, now=an_hour_early)
    assert early.action_key is None and execution(execution_id).wake_at == DST_MONDAY_OPEN
    _release(execution_id, key, DST_MONDAY_OPEN)
    sent = _send_row(key)
    assert (sent.outcome, sent.sent_at, sent.deferrals) == ("sent", DST_MONDAY_OPEN, 1)
    _step_to_the_end(execution_id, DST_MONDAY_OPEN)
    assert execution(execution_id).status == ExecutionStatus.COMPLETED
    assert _messages(key) == 1


@pytest.mark.parametrize(("zone", "opens"), [
    ("Asia/Kolkata", dt.datetime(2030, 1, 7, 3, 30, tzinfo=dt.UTC)),
    ("Asia/Kathmandu", dt.datetime(2030, 1, 7, 3, 15, tzinfo=dt.UTC)),
])
def test_a_user_in_a_half_or_quarter_hour_zone_waits_for_nine_on_their_own_clock(
        policy: Any, zone: str, opens: dt.datetime) -> None:
    policy({"timezone": "UTC", "send_window": {"hours": "09:00-20:00"}})
    execution_id, key = _deferred(new_user({"timezone": zone}), NIGHT)
    assert execution(execution_id).wake_at == opens
    assert _send_row(key).deferred_until == opens
    _release(execution_id, key, opens)
    assert (_send_row(key).outcome, _send_row(key).sent_at) == ("sent", opens)


def test_an_invalid_timezone_attribute_falls_back_to_the_program_zone_with_a_warning(
        policy: Any) -> None:
    policy(PARIS_WINDOW)
    with capture_logs() as logs:
        _, key = _deferred(new_user({"timezone": "Mars/Olympus_Mons"}), EARLY)
    assert _send_row(key).deferred_until == OPEN  # 09:00 in Paris; in UTC it would be 09:00 UTC
    warnings = [entry for entry in logs if entry["event"] == "send.timezone_invalid"]
    assert len(warnings) == 1, logs
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["fallback"] == "Europe/Paris"
    assert "Mars/Olympus_Mons" in warnings[0]["warning"]


def test_a_transactional_send_skips_the_window_and_a_full_cap_but_not_consent(
        policy: Any) -> None:
    policy({**PARIS_WINDOW, "caps": [{"max": 1, "per": "24h"}]})
    user = new_user()
    first = _send(user, SUNDAY_EVENING)  # inside the window: fills the cap
    receipt = _send(user, EARLY, "send_transactional.bpmn")  # before 09:00, cap still full
    regular = _send(user, OPEN)  # in the window, within 24 h of the first: capped
    assert [_send_row(k).outcome for k in (first, receipt, regular)] == ["sent", "sent", "capped"]
    row = _send_row(receipt)
    assert (row.reason, row.transactional, row.sent_at, row.deferrals) == \
        ("transactional", True, EARLY, 0)
    assert [_messages(k) for k in (first, receipt, regular)] == [1, 1, 0]
    refused = _send(new_user({"unsubscribed": ["email"]}), EARLY, "send_transactional.bpmn")
    assert (_send_row(refused).outcome, _messages(refused)) == ("suppressed", 0)


def test_an_exclusive_gateway_on_the_outcome_takes_the_capped_branch(policy: Any) -> None:
    policy({"caps": [{"max": 1, "per": "day"}]})
    user = new_user()
    routes = []
    for _ in range(2):
        execution_id = _start(user, OPEN, "send_branch.bpmn")
        key = _to_the_send(execution_id, OPEN)
        with session_scope() as session:
            run_action(session, key, now=OPEN)
        _step_to_the_end(execution_id, OPEN)
        row = execution(execution_id)
        variables = row.variables or {}
        routes.append((row.status, variables["sent"]["outcome"], variables["route"],
                       nodes(execution_id)[-2:]))
    assert routes == [
        (ExecutionStatus.COMPLETED, "sent", "delivered", ["delivered", "end_delivered"]),
        (ExecutionStatus.COMPLETED, "capped", "capped", ["capped", "end_capped"]),
    ]


def test_a_send_released_after_its_window_closed_waits_for_the_next_one_once(
        policy: Any) -> None:
    """Released late (the window already shut again), the call is put off to tomorrow,
    and the timer that woke it (still on the row: a timer message does not clear it)
    does not keep waking it: the step it causes sets tomorrow's opening exactly."""
    policy({"timezone": "Europe/Paris", "send_window": {"hours": "09:00-09:01"}})
    execution_id = _start(new_user(), EARLY)
    key = _to_the_send(execution_id, EARLY)
    with session_scope() as session:
        assert run_action(session, key, now=EARLY).status == "deferred"
    assert execution(execution_id).wake_at == OPEN
    late = OPEN + dt.timedelta(minutes=30)  # the window was 08:00-08:01 UTC
    tomorrow = OPEN + dt.timedelta(days=1)
    with session_scope() as session:  # the timer's message, late: wake_at is still OPEN
        assert stepper.step(session, execution_id, execution(execution_id).state_version,
                            now=late).action_key == key
    with session_scope() as session:
        assert run_action(session, key, now=late).status == "deferred"
    assert _send_row(key).deferred_until == tomorrow
    with session_scope() as session:  # the stale OPEN wakes it once more ...
        result = stepper.step(session, execution_id, execution(execution_id).state_version,
                              now=late)
    assert result.action_key is None and execution(execution_id).wake_at == tomorrow
    with session_scope() as session:  # ... and no more: the row waits for tomorrow
        assert stepper.step(session, execution_id, execution(execution_id).state_version,
                            now=late).action_key is None
    assert execution(execution_id).wake_at == tomorrow
