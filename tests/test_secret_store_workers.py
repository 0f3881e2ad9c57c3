"""A real actions worker signs `send_webhook` with the workspace's stored signing key and sends
its stored channel token, and neither the values nor the keys end up anywhere else: not in
any table (delivery params, results, errors, variables, steps, dead letters), the task
arguments Flower sees (task events), nor the worker's log, whether the call succeeds,
fails at the endpoint or cannot decrypt (a worker with the wrong key).
"""

from __future__ import annotations

import hmac
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import text

from db.models import DEFAULT_WORKSPACE_ID
from db.session import session_scope
from tests.fleet_namespace import Fleet, own_fleet
from tests.helpers import wait_for
from tests.workflow_helpers import BPMN, deploy_xml, new_user, wait_status
from workers.queues import TaskNames
from workers.secrets import store
from workers.secrets.crypto import Keyring, key_id

pytestmark = pytest.mark.servers

KEY, WRONG_KEY = Fernet.generate_key(), Fernet.generate_key()
SIGNING = f"stored-signing-{uuid.uuid4().hex}"
TOKEN = f"stored-token-{uuid.uuid4().hex}"
FALLBACK = f"env-signing-{uuid.uuid4().hex}"
NEVER_SHOWN = (SIGNING, TOKEN, KEY.decode(), WRONG_KEY.decode())


def _put(name: str, value: str) -> None:
    with session_scope() as session:
        store.put(session, DEFAULT_WORKSPACE_ID, name, SecretStr(value), Keyring.from_keys([KEY]))


@pytest.fixture(scope="module")
def stored() -> Iterator[None]:
    _put(store.WEBHOOK_SIGNING_KEY, SIGNING)
    _put("crm_token", TOKEN)
    yield
    with session_scope() as session:
        session.execute(text("DELETE FROM workspace_secrets WHERE workspace_id = :w"),
                        {"w": DEFAULT_WORKSPACE_ID})


@pytest.fixture(scope="module")
def fleet(stored: None) -> Iterator[Fleet]:
    with own_fleet("secrets", "workflows,actions", FLEET_SECRET_KEYS=KEY.decode(),
                   FLEET_WEBHOOK_SECRET=FALLBACK) as module_fleet:
        yield module_fleet


Received = list[tuple[dict[str, str], bytes]]


@pytest.fixture()
def endpoint() -> Iterator[tuple[str, Received, list[int]]]:
    """A local HTTP endpoint: its URL, the (headers, body) it got, and the status it answers
    (a list of one, to change)."""
    received: Received = []
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(status[0])
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received, status
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def task_events(fleet: Fleet) -> Iterator[list[dict[str, Any]]]:
    """The task events the workers send (what Flower shows, task arguments included)."""
    events: list[dict[str, Any]] = []
    ready = threading.Event()
    with fleet.app.connection() as connection:
        receiver = fleet.app.events.Receiver(connection, handlers={"*": events.append})

        def capture() -> None:
            ready.set()
            receiver.capture(limit=None, timeout=None, wakeup=False)

        thread = threading.Thread(target=capture, daemon=True)
        thread.start()
        ready.wait(10)
        try:
            yield events
        finally:
            receiver.should_stop = True
            thread.join(timeout=10)


def workflow(url: str) -> str:
    """engine_webhook.bpmn posting to `url` with `auth_secret: crm_token`."""
    xml = (BPMN / "engine_webhook.bpmn").read_text().replace(
        '<spiffworkflow:parameter id="url" type="str" value="hook_url"/>',
        f'<spiffworkflow:parameter id="url" type="str" value="&quot;{url}&quot;"/>'
        '<spiffworkflow:parameter id="auth_secret" type="str" value="&quot;crm_token&quot;"/>')
    assert "auth_secret" in xml
    return deploy_xml(xml)


def signed_by(secret: str, header: str, body: bytes) -> bool:
    """True if X-Fleet-Signature `header` is the HMAC of `body` under `secret`."""
    from workers.operators.webhooks import sign

    timestamp = int(header.split(",")[0].removeprefix("t="))
    return hmac.compare_digest(header, sign(secret, timestamp, body))


def tables_holding(*needles: str) -> list[str]:
    """Tables with a row whose text (bytea as hex) contains one of `needles`."""
    found = []
    with session_scope() as session:
        tables = session.execute(text(
            "SELECT format('%I', c.relname) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') "
            "AND NOT c.relispartition")).scalars().all()
        for table in tables:
            clauses, params = [], {}
            for i, needle in enumerate(needles):
                clauses.append(f"strpos(x::text, :t{i}) > 0 OR strpos(x::text, :h{i}) > 0")
                params |= {f"t{i}": needle, f"h{i}": needle.encode().hex()}
            if session.execute(text(f"SELECT EXISTS (SELECT 1 FROM {table} x WHERE "
                                    f"{' OR '.join(clauses)})"), params).scalar():
                found.append(table)
    return found


def assert_nowhere(fleet: Fleet, events: list[dict[str, Any]]) -> None:
    assert tables_holding(*NEVER_SHOWN) == []
    for worker in fleet.workers:
        log = worker.log()
        assert not [s for s in NEVER_SHOWN if s in log], "a secret in the worker's log"
    shown = repr(events)
    assert not [s for s in NEVER_SHOWN if s in shown], "a secret in a task event"


def delivery(execution_id: uuid.UUID) -> Any:
    with session_scope() as session:
        return session.execute(text(
            "SELECT status, params, result, error_message, attempts FROM action_deliveries "
            "WHERE execution_id = :e"), {"e": execution_id}).one()


def test_the_actions_worker_signs_with_the_stored_key_and_sends_the_stored_token(
        fleet: Fleet, endpoint: tuple[str, Received, list[int]],
        task_events: list[dict[str, Any]]) -> None:
    url, received, _ = endpoint
    [execution_id] = fleet.start(workflow(url), [new_user()])
    wait_status(execution_id, "completed", timeout=60)
    [(headers, body)] = received
    header = headers["x-fleet-signature"]
    assert signed_by(SIGNING, header, body)  # the stored key ...
    assert not signed_by(FALLBACK, header, body)  # ... not the variable
    assert headers["authorization"] == f"Bearer {TOKEN}"
    row = delivery(execution_id)
    assert row.status == "succeeded" and row.params["auth_secret"] == "crm_token"
    # What the workers sent about their tasks: an actions.run carries the delivery key only.
    wait_for(lambda: any(e.get("name") == TaskNames.RUN_ACTION for e in task_events),
             timeout=10, message="the actions.run task event")
    runs = [e for e in task_events if e.get("name") == TaskNames.RUN_ACTION]
    assert all(str(execution_id) in e["args"] for e in runs), runs
    assert_nowhere(fleet, task_events)
    # The scan sees text, jsonb and bytea (as hex): the secret's name is in the delivery's
    # params, and a piece of its ciphertext in its row.
    with session_scope() as session:
        token = bytes(session.execute(text(
            "SELECT ciphertext FROM workspace_secrets WHERE name = 'crm_token'")).scalar_one())
    assert {"action_deliveries", "workspace_secrets"} <= set(tables_holding("crm_token"))
    assert tables_holding(token[20:40].decode()) == ["workspace_secrets"]
    assert "action.succeeded" in fleet.workers[0].log()


def test_a_failing_endpoint_leaves_no_secret_in_errors(
        fleet: Fleet, endpoint: tuple[str, Received, list[int]],
        task_events: list[dict[str, Any]]) -> None:
    url, received, status = endpoint
    status[0] = 503  # transient: retried (3 times in the tests), then the node fails
    [execution_id] = fleet.start(workflow(url), [new_user()])
    row = wait_status(execution_id, "failed", timeout=90)
    assert len(received) == 4 and all(h["authorization"] == f"Bearer {TOKEN}"
                                      for h, _ in received)
    failed = delivery(execution_id)
    assert failed.status == "failed" and "answered 503" in failed.error_message
    assert "answered 503" in (row.error_message or "")
    assert_nowhere(fleet, task_events)


def test_without_a_stored_signing_key_the_variable_signs(
        fleet: Fleet, endpoint: tuple[str, Received, list[int]]) -> None:
    url, received, _ = endpoint
    with session_scope() as session:
        assert store.delete_(session, DEFAULT_WORKSPACE_ID, store.WEBHOOK_SIGNING_KEY)
    try:
        [execution_id] = fleet.start(workflow(url), [new_user()])
        wait_status(execution_id, "completed", timeout=60)
    finally:
        _put(store.WEBHOOK_SIGNING_KEY, SIGNING)
    [(headers, body)] = received
    assert signed_by(FALLBACK, headers["x-fleet-signature"], body)


def test_a_worker_with_the_wrong_key_fails_the_call_naming_the_secret_not_its_value(
        stored: None, endpoint: tuple[str, Received, list[int]]) -> None:
    url, received, _ = endpoint
    with own_fleet("secrets-wrong", "workflows,actions",
                   FLEET_SECRET_KEYS=WRONG_KEY.decode()) as wrong:
        [execution_id] = wrong.start(workflow(url), [new_user()])
        wait_status(execution_id, "failed", timeout=90)
        failed = delivery(execution_id)
        assert received == []  # nothing was sent
        assert failed.status == "failed" and failed.attempts == 4  # retried: a rollout may fix it
        assert ("UndecryptableSecret: secret 'crm_token' of workspace 'default' cannot be "
                f"decrypted with the configured keys ({key_id(WRONG_KEY)}): it was encrypted "
                f"under key {key_id(KEY)}") in failed.error_message
        assert_nowhere(wrong, [])
