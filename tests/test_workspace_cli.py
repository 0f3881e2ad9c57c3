"""Workspaces at the edges: `fleet workspace create|list`, the global `--workspace`, and
the producer's `workspace` envelope field.

The assertions hold with row-level security in place or not (migration 0021): they look
at which workspace a command enters (db/tenancy.py's scope) and at the envelopes sent,
not at rows that a policy would hide.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from celery import Celery
from pydantic import ValidationError
from typer.testing import CliRunner

from db import tenancy
from db.models import DEFAULT_WORKSPACE_ID
from workers.cli.main import app
from workers.events.envelope import InvalidEvent, build_event
from workers.queues import EVENTS
from workers.settings import Settings, get_settings

pytestmark = pytest.mark.servers

TAG = uuid.uuid4().hex[:8]


def fleet(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _created(name: str) -> uuid.UUID:
    result = fleet("workspace", "create", name)
    assert result.exit_code == 0, result.output
    return uuid.UUID(result.stdout.strip())


# --------------------------------------------------------------------------- fleet workspace


def test_create_prints_the_id_and_says_when_it_exists() -> None:
    name = f"ws-{TAG}-a"
    first = _created(name)
    again = fleet("workspace", "create", name)
    assert again.exit_code == 0, again.output
    assert uuid.UUID(again.stdout.strip()) == first
    assert f"workspace {name} exists already" in again.stderr


def test_list_shows_every_workspace_with_its_id_and_creation_time() -> None:
    name = f"ws-{TAG}-b"
    workspace_id = _created(name)
    listed = fleet("workspace", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["default"]["id"] == str(DEFAULT_WORKSPACE_ID)
    assert rows[name]["id"] == str(workspace_id) and rows[name]["created_at"]
    table = fleet("workspace", "list")
    assert table.exit_code == 0 and name in table.stdout and str(workspace_id) in table.stdout


def test_invalid_names_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = fleet("workspace", "create", "Not Valid")
    assert bad.exit_code == 2 and "a workspace name is 1-63 characters" in bad.stderr
    assert "Not Valid" not in fleet("workspace", "list").stdout
    global_bad = fleet("--workspace", "-leading-dash", "status")
    assert global_bad.exit_code == 2 and "invalid --workspace" in global_bad.stderr
    monkeypatch.setenv("FLEET_WORKSPACE", "UPPER")
    with pytest.raises(ValidationError, match="FLEET_WORKSPACE"):
        Settings()
    monkeypatch.setenv("FLEET_WORKSPACE", "")  # blank is unset
    assert Settings().workspace == "default"
    monkeypatch.delenv("FLEET_WORKSPACE")
    with pytest.raises(InvalidEvent, match="workspace name"):
        send_event_to(None, workspace="x" * 64)
    with pytest.raises(InvalidEvent, match="workspace name"):
        send_events_to(None, [{"event_type": "t.x", "user": "a@example.com"}], validate=False,
                       workspace="a/b")


# --------------------------------------------------------------------------- --workspace


@pytest.fixture()
def scopes(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The workspace scope `fleet secret list` ran its query in, one entry per run.

    The store's queries are stubbed: the scope is what this proves, and while the
    application role does not exist yet (before migration 0021) no query could run in one.
    """
    from workers.secrets import store

    seen: list[object] = []

    def list_(session: Any, workspace_id: uuid.UUID) -> list[Any]:
        seen.append(tenancy.current_scope())
        return []

    monkeypatch.setattr(store, "workspace_id", lambda session, name: uuid.uuid4())
    monkeypatch.setattr(store, "list_", list_)
    return seen


def test_every_command_runs_in_the_global_workspace(scopes: list[object]) -> None:
    name = f"ws-{TAG}-c"
    workspace_id = _created(name)
    assert fleet("secret", "list").exit_code == 0
    assert fleet("--workspace", name, "secret", "list").exit_code == 0
    assert fleet("--workspace", str(workspace_id), "secret", "list").exit_code == 0  # an id too
    # The command's own --workspace still wins over the global one.
    assert fleet("--workspace", name, "secret", "list", "--workspace", "default").exit_code == 0
    assert scopes == [DEFAULT_WORKSPACE_ID, workspace_id, workspace_id, DEFAULT_WORKSPACE_ID]


def test_fleet_workspace_env_is_the_global_default(scopes: list[object],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ws-{TAG}-d"
    workspace_id = _created(name)
    monkeypatch.setenv("FLEET_WORKSPACE", name)
    get_settings.cache_clear()
    try:
        assert fleet("secret", "list").exit_code == 0
        assert fleet("--workspace", "default", "secret", "list").exit_code == 0
    finally:
        monkeypatch.delenv("FLEET_WORKSPACE")
        get_settings.cache_clear()
    assert scopes == [workspace_id, DEFAULT_WORKSPACE_ID]


def test_an_unknown_workspace_exits_2_with_one_line(scopes: list[object]) -> None:
    name = f"nowhere-{TAG}"
    for args in (["secret", "list"], ["emit", "t.x", "--user", "a@example.com"],
                 ["user", "export", "a@example.com"]):
        result = fleet("--workspace", name, *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr == f"no workspace named '{name}' (fleet workspace create {name})\n"
    assert scopes == []
    # No lookup where none is needed: help, and the commands that make workspaces.
    assert fleet("--workspace", name, "secret", "list", "--help").exit_code == 0
    assert fleet("--workspace", name, "workspace", "list").exit_code == 0
    assert fleet("--workspace", name, "workspace", "create", name).exit_code == 0
    assert fleet("--workspace", name, "secret", "list").exit_code == 0  # it exists now


# --------------------------------------------------------------------------- the producer


def _sent(via: Celery) -> list[Any]:
    """The envelopes of the next message on `via`'s events queue (taken off it)."""
    with via.connection_for_read() as conn, conn.SimpleQueue(via.amqp.queues[EVENTS]) as queue:
        message = queue.get(timeout=10)
        message.ack()
    (payload,), _, _ = message.payload
    return payload if isinstance(payload, list) else [payload]


def send_event_to(via: Celery | None, **kwargs: Any) -> uuid.UUID:
    from workers.producer import send_event

    return send_event("test.workspace", user="ada@example.com", via=via, **kwargs)


def send_events_to(via: Celery | None, events: list[Any], **kwargs: Any) -> int:
    from workers.producer import send_events

    return send_events(events, via=via, **kwargs)


def test_send_event_puts_the_workspace_in_the_envelope(private_app: Celery,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    send_event_to(private_app, workspace="acme")
    assert _sent(private_app)[0]["workspace"] == "acme"
    send_event_to(private_app)
    assert "workspace" not in _sent(private_app)[0]  # no field: the default workspace
    monkeypatch.setenv("FLEET_WORKSPACE", "beta")
    get_settings.cache_clear()
    try:
        send_event_to(private_app)
        assert _sent(private_app)[0]["workspace"] == "beta"
        send_event_to(private_app, workspace="default")  # given: kept, even the default
        assert _sent(private_app)[0]["workspace"] == "default"
    finally:
        monkeypatch.delenv("FLEET_WORKSPACE")
        get_settings.cache_clear()


@pytest.mark.parametrize("validate", [True, False])
def test_send_events_fills_in_the_workspace_where_none_is_named(private_app: Celery,
                                                                validate: bool) -> None:
    events: list[Any] = [
        {"event_type": "test.workspace", "user": "a@example.com"},
        {"event_type": "test.workspace", "user": "b@example.com", "workspace": "other"},
        build_event("test.workspace", user="c@example.com"),
    ]
    assert send_events_to(private_app, events, validate=validate, workspace="acme") == 3
    assert [e["workspace"] for e in _sent(private_app)] == ["acme", "other", "acme"]
    send_events_to(private_app, events[:1], validate=validate)
    assert "workspace" not in _sent(private_app)[0]


def test_fleet_emit_sends_to_the_global_workspace(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Any) -> None:
    import workers.producer

    name = f"ws-{TAG}-e"
    _created(name)
    published: list[Any] = []
    monkeypatch.setattr(workers.producer, "_publish",
                        lambda task, payload, argsrepr, via: published.append(payload))
    one = fleet("--workspace", name, "emit", "test.workspace", "--user", "a@example.com")
    assert one.exit_code == 0, one.output
    lines = tmp_path / "events.jsonl"
    lines.write_text(json.dumps({"event_type": "test.workspace", "user": "b@example.com"})
                     + "\n")
    batch = fleet("--workspace", name, "emit", "--file", str(lines))
    assert batch.exit_code == 0, batch.output
    plain = fleet("emit", "test.workspace", "--user", "a@example.com")
    assert plain.exit_code == 0, plain.output
    assert published[0]["workspace"] == name and published[1][0]["workspace"] == name
    assert "workspace" not in published[2]
