"""`send_webhook` with `to_user: true` passes the send gateway on channel `webhook`.

The BPMN's URL has no listener, so a call that got past the gateway would fail
(a connection error, retried); a suppressed or held-out one must not try at all.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import text

from db.models import ActionDelivery
from db.session import session_scope
from tests.workflow_helpers import deploy, execution, new_user, store_messaging
from workers.engine import control, stepper
from workers.operators.deliveries import run_action
from workers.sends import suppressions
from workers.sends.holdout import in_holdout

pytestmark = pytest.mark.servers


@pytest.fixture()
def holdout_policy() -> Iterator[str]:
    """A program holdout of 50% under a salt of this test's own; yields the salt."""
    salt = f"hook-{uuid.uuid4().hex[:8]}"
    store_messaging({"holdout": {"percent": 50, "salt": salt}})
    yield salt
    store_messaging(None)


STARTED: list[uuid.UUID] = []


@pytest.fixture(autouse=True)
def _cancel_the_executions() -> Iterator[None]:
    """Left in flight here, a reaper's re-send would run them in the session's worker."""
    yield
    with session_scope() as session:
        for execution_id in STARTED:
            with contextlib.suppress(control.ControlError):
                control.cancel(session, execution_id)
    STARTED.clear()


def _to_the_call(user: uuid.UUID) -> tuple[uuid.UUID, str]:
    with session_scope() as session:
        execution_id = control.start(session, deploy("webhook_to_user.bpmn"), user, {})
    STARTED.append(execution_id)
    version = 0
    while True:
        with session_scope() as session:
            result = stepper.step(session, execution_id, version)
        if result.action_key is not None:
            return execution_id, result.action_key
        assert result.next_version is not None, result
        version = result.next_version


def _email(user: uuid.UUID) -> str:
    with session_scope() as session:
        return str(session.execute(text("SELECT email FROM users WHERE id = :u"),
                                   {"u": user}).scalar_one())


def test_a_user_suppressed_on_webhook_gets_no_call() -> None:
    user = new_user()
    with session_scope() as session:
        suppressions.add(session, _email(user), "webhook", reason="asked us to stop")
    execution_id, key = _to_the_call(user)
    with session_scope() as session:
        assert run_action(session, key).status == "succeeded"  # no HTTP call was tried
        delivery = session.get(ActionDelivery, key)
        assert delivery is not None and delivery.send_outcome == "suppressed"
        assert delivery.result is not None and delivery.result["outcome"] == "suppressed"
    assert execution(execution_id).status == "running"  # it goes on with its next step


def test_a_user_suppressed_on_email_only_gets_the_call() -> None:
    user = new_user()
    with session_scope() as session:
        suppressions.add(session, _email(user), "email")
    _, key = _to_the_call(user)
    with pytest.raises(httpx.ConnectError), session_scope() as session:
        run_action(session, key)  # past the gateway: the call is tried, and fails
    with session_scope() as session:  # ... and its transaction, the decision too, rolled back
        assert session.execute(text("SELECT count(*) FROM sends WHERE key = :k"),
                               {"k": key}).scalar_one() == 0


def test_held_out_users_get_no_call_and_the_others_do(holdout_policy: str) -> None:
    users = [new_user() for _ in range(12)]
    held = [u for u in users if in_holdout(holdout_policy, u, 50)]
    treated = [u for u in users if u not in held]
    assert held and treated, "12 users at 50%: both groups (fails once in 2,048 runs)"
    for user in held:
        _, key = _to_the_call(user)
        with session_scope() as session:
            assert run_action(session, key).status == "succeeded"
            delivery = session.get(ActionDelivery, key)
            assert delivery is not None and delivery.send_outcome == "held_out"
    _, key = _to_the_call(treated[0])
    with pytest.raises(httpx.ConnectError), session_scope() as session:
        run_action(session, key)
