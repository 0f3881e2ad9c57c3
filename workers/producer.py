"""The producer API: publish user events to the fleet. Needs the broker, not the database.

    from workers.producer import send_event, send_events
    send_event("user.signed_up", user="ada@example.com", data={"plan": "free"})
    send_events([{"event_type": "page.viewed", "user": "ada@example.com"}, ...])
    send_event("user.signed_up", user="ada@example.com", workspace="acme")

An event goes to the workspace it names (`workspace=`, else FLEET_WORKSPACE); an
envelope that names none belongs to the default workspace.

Publishing retries broker connection errors with backoff and raises `PublishError`
when it finally fails: a call that returns has handed the message to the broker.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from celery import Celery

from workers.celery_app import app
from workers.events.envelope import (
    WORKSPACE_NAME,
    WORKSPACE_NAME_RULE,
    Event,
    InvalidEvent,
    build_event,
    parse_event,
    with_event_id,
    with_field,
)
from workers.queues import EVENTS, TaskNames
from workers.settings import get_settings

RETRY_POLICY = {"max_retries": 6, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3.0}


class PublishError(RuntimeError):
    """The broker could not be reached after every retry; nothing was sent."""


def _publish(task: str, payload: Any, argsrepr: str, via: Celery | None) -> None:
    # argsrepr is what Flower and the logs show: ids, never the user's data.
    try:
        (via or app).send_task(task, args=[payload], queue=EVENTS, retry=True,
                               retry_policy=RETRY_POLICY, argsrepr=argsrepr)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the caller gets one error
        # Connection errors, a full Redis refusing writes, and kombu's own errors from a
        # connection left broken by one (an AttributeError on a closed client): the
        # message was not handed to the broker, so the caller must hear PublishError.
        raise PublishError(f"could not publish {task} to the broker: "
                           f"{type(exc).__name__}: {exc}") from exc


def _workspace(workspace: str | None) -> str | None:
    """The workspace name envelopes get: `workspace`, else FLEET_WORKSPACE unless it is the
    default (None: no field, which is the default workspace). InvalidEvent for a bad name.

    The rule is workers.workspaces.check_name's, taken from the envelope module: that
    module loads the database layer, which a producer must not.
    """
    name = workspace if workspace is not None else get_settings().workspace
    if workspace is None and name == "default":
        return None
    if not isinstance(name, str) or not WORKSPACE_NAME.fullmatch(name):
        raise InvalidEvent(f"a workspace name is {WORKSPACE_NAME_RULE}; got {name!r}"[:200])
    return name


def _in_workspace(raw: Any, workspace: str | None) -> Any:
    """`raw` with `workspace` set if it is a JSON object naming none (`with_field`)."""
    return raw if workspace is None else with_field(raw, "workspace", workspace)


def send_event(event_type: str, *, user: str | uuid.UUID, data: Mapping[str, Any] | None = None,
               event_id: uuid.UUID | str | None = None,
               occurred_at: dt.datetime | str | None = None,
               workspace: str | None = None,
               via: Celery | None = None) -> uuid.UUID:
    """Validate and publish one event as one message; returns its event_id.

    Raises `InvalidEvent` for a bad envelope (nothing is sent) and `PublishError`
    when the broker cannot be reached. `workspace`: the name of the workspace it
    belongs to (default: FLEET_WORKSPACE). `via`: another fleet's Celery app (the
    benchmarks' and chaos runs' scratch fleets); the configured one by default.
    """
    event = build_event(event_type, user=user, data=data, event_id=event_id,
                        occurred_at=occurred_at, workspace=_workspace(workspace))
    _publish(TaskNames.INGEST, event.to_message(), f"[event {event.event_id}]", via)
    return event.event_id


def send_events(events: Iterable[Mapping[str, Any] | Event], *, validate: bool = True,
                workspace: str | None = None, via: Celery | None = None) -> int:
    """Publish many events as one message (for high-volume producers); returns the count.

    With `validate` (the default) a bad envelope raises `InvalidEvent` before anything
    is sent. With `validate=False` events go as they are and the workers dead-letter
    the bad ones (each good one is still ingested) — for relaying input you do not own.
    `workspace` (default: FLEET_WORKSPACE) goes to the events that name none of their
    own; a bad name raises `InvalidEvent` either way.
    """
    name = _workspace(workspace)
    batch: list[Any] = []
    for item in events:
        if isinstance(item, Event):
            batch.append(_in_workspace(item.to_message(), name))
        elif validate:
            batch.append(parse_event(_in_workspace(dict(item), name)).to_message())
        else:  # an id now (JSON strings too), so a re-sent batch is recognised as the same events
            raw = dict(item) if isinstance(item, Mapping) else item
            batch.append(with_event_id(_in_workspace(raw, name), uuid.uuid4()))
    if batch:
        publish_batch(batch, via)
    return len(batch)


def publish_batch(batch: list[Any], via: Celery | None = None) -> None:
    """Publish already-formed envelopes as one ingest message (used by the outbox relay)."""
    _publish(TaskNames.INGEST_BATCH, batch, f"[{len(batch)} events]", via)
