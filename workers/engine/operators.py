"""Service-task operators: the side effects a workflow may have, by name.

A BPMN service task names an operator and its parameters (SpiffArena's
`spiffworkflow:serviceTaskOperator`); the parameters are expressions evaluated
against the execution's variables by the sandbox when the node is reached. The
operator then runs on the `actions` queue (`workers.engine.actions`) in a
transaction that also marks its `action_deliveries` row done, so an operator that
writes to the database takes effect exactly once. `send_webhook` leaves the
database: it sends the delivery key as `Idempotency-Key`, so a redelivery after a
crash between the response and the commit can be recognised by the receiver.

New operators register with `@operator("name")`; `fleet apply` refuses a BPMN
whose service task names an operator that is not registered.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import LIFECYCLE_STAGES, MessageLog, User, UserLifecycleHistory, UserSegment
from workers.errors import PermanentError, TransientError
from workers.settings import get_settings

EVENT_NAMESPACE = uuid.UUID("5b0c1a8e-8d0f-4a55-9a3c-0f1e1e5e7a11")


class OperatorError(PermanentError):
    """The operator cannot succeed with these parameters; the execution fails with this message."""


@dataclass
class OperatorContext:
    session: Session
    execution_id: uuid.UUID
    user_id: uuid.UUID
    node_id: str
    key: str  # the idempotency key of this call
    now: dt.datetime
    # Events recorded in this transaction; the caller sends their follow-up work after commit.
    ingested: list[Any] = field(default_factory=list)

    def event_id(self, purpose: str) -> uuid.UUID:
        """A deterministic event id: the same call always emits the same event."""
        return uuid.uuid5(EVENT_NAMESPACE, f"{self.key}:{purpose}")

    def emit(self, event_type: str, data: dict[str, Any], purpose: str) -> uuid.UUID:
        """Record an event for the execution's user now, through the ingest pipeline."""
        from workers.events.envelope import build_event
        from workers.events.ingest import ingest
        from workers.rules.triggers import process_triggers

        event = build_event(event_type, user=self.user_id, data=data,
                            event_id=self.event_id(purpose), occurred_at=self.now)
        result = ingest(self.session, [event.to_message()], source=f"operator:{self.node_id}",
                        triggers=process_triggers(), now=self.now)
        if result.rejected:
            raise OperatorError(f"event {event_type!r} was rejected (see fleet dlq list)")
        self.ingested.append(result)
        return event.event_id


Operator = Callable[[OperatorContext, dict[str, Any]], dict[str, Any]]
OPERATORS: dict[str, Operator] = {}


def operator(name: str) -> Callable[[Operator], Operator]:
    def register(fn: Operator) -> Operator:
        OPERATORS[name] = fn
        return fn
    return register


def operator_names() -> frozenset[str]:
    return frozenset(OPERATORS)


def _param(params: dict[str, Any], name: str, kind: type | tuple[type, ...],
           default: Any = ...) -> Any:
    if name not in params or params[name] is None:
        if default is ...:
            raise OperatorError(f"parameter {name!r} is required")
        return default
    value = params[name]
    if not isinstance(value, kind):
        raise OperatorError(f"parameter {name!r} must be {getattr(kind, '__name__', kind)}, "
                            f"got {type(value).__name__}")
    return value


def _user(ctx: OperatorContext, lock: bool = False) -> User:
    query = select(User).where(User.id == ctx.user_id)
    user = ctx.session.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if user is None:
        raise OperatorError(f"user {ctx.user_id} no longer exists")
    return user


@operator("set_lifecycle_stage")
def set_lifecycle_stage(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """Move the user to `stage`; history row, audit event `lifecycle.stage_changed`."""
    stage = _param(params, "stage", str)
    if stage not in LIFECYCLE_STAGES:
        raise OperatorError(f"unknown lifecycle stage {stage!r} (expected one of "
                            f"{', '.join(LIFECYCLE_STAGES)})")
    user = _user(ctx, lock=True)
    previous = user.current_lifecycle_stage
    if previous == stage:
        return {"changed": False, "stage": stage}
    user.current_lifecycle_stage = stage
    user.updated_at = ctx.now
    ctx.session.add(UserLifecycleHistory(
        user_id=user.id, from_stage=previous, to_stage=stage, transitioned_at=ctx.now,
        workflow_execution_id=ctx.execution_id, metadata_={"node_id": ctx.node_id}))
    ctx.session.flush()
    ctx.emit("lifecycle.stage_changed",
             {"from": previous, "to": stage, "execution_id": str(ctx.execution_id)}, "stage")
    return {"changed": True, "from": previous, "stage": stage}


@operator("update_user_attributes")
def update_user_attributes(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """Merge `attributes` into the user's (null removes a key), as a `user.identify` event."""
    from workers.events.envelope import IDENTIFY

    attributes = _param(params, "attributes", dict)
    ctx.emit(IDENTIFY, attributes, "attributes")
    return {"updated": sorted(attributes)}


@operator("emit_event")
def emit_event(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """Record an event of `event_type` with `data` for the user; triggers react to it."""
    event_type = _param(params, "event_type", str)
    data = _param(params, "data", dict, {})
    event_id = ctx.emit(event_type, data, "emit")
    return {"event_id": str(event_id)}


def _static_segment(ctx: OperatorContext, params: dict[str, Any]) -> UserSegment:
    name = _param(params, "segment", str)
    segment = ctx.session.execute(
        select(UserSegment).where(UserSegment.name == name)).scalar_one_or_none()
    if segment is None or segment.kind != "static":
        raise OperatorError(f"no static segment named {name!r}")
    return segment


@operator("add_to_segment")
def add_to_segment(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    from workers.rules.segments import set_static_members

    segment = _static_segment(ctx, params)
    changed = set_static_members(ctx.session, segment.id, [ctx.user_id], add=True)
    return {"segment": segment.name, "added": changed}


@operator("remove_from_segment")
def remove_from_segment(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    from workers.rules.segments import set_static_members

    segment = _static_segment(ctx, params)
    changed = set_static_members(ctx.session, segment.id, [ctx.user_id], add=False)
    return {"segment": segment.name, "removed": changed}


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class OutgoingMessage:
    idempotency_key: str
    channel: str
    recipient: str
    template: str | None
    subject: str | None
    body: str | None
    execution_id: uuid.UUID
    user_id: uuid.UUID


class Channel:
    """Delivers messages of one kind (email, sms, push). Must be idempotent by key."""

    def send(self, session: Session, message: OutgoingMessage) -> dict[str, Any]:
        raise NotImplementedError


class LocalLogChannel(Channel):
    """The default channel: the message is written to `message_log`, so all works offline."""

    def send(self, session: Session, message: OutgoingMessage) -> dict[str, Any]:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        row = session.execute(pg_insert(MessageLog).values(
            idempotency_key=message.idempotency_key, execution_id=message.execution_id,
            user_id=message.user_id, channel=message.channel, recipient=message.recipient,
            template=message.template, subject=message.subject, body=message.body,
        ).on_conflict_do_nothing().returning(MessageLog.id)).scalar_one_or_none()
        return {"message_log_id": row, "duplicate": row is None}


# Channel name -> implementation; a deployment registers real providers here.
CHANNELS: dict[str, Channel] = {}
DEFAULT_CHANNEL = LocalLogChannel()


@operator("send_message")
def send_message(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """Send `body` (or `template`) on `channel` (email/sms/push) to `to` (default: the user)."""
    channel = _param(params, "channel", str, "email")
    template = _param(params, "template", str, None)
    body = _param(params, "body", str, None)
    if template is None and body is None:
        raise OperatorError("send_message needs a 'template' or a 'body'")
    recipient = _param(params, "to", str, None) or _user(ctx).email
    message = OutgoingMessage(ctx.key, channel, recipient, template,
                              _param(params, "subject", str, None), body, ctx.execution_id,
                              ctx.user_id)
    result = CHANNELS.get(channel, DEFAULT_CHANNEL).send(ctx.session, message)
    return {"channel": channel, "to": recipient, **result}


# --------------------------------------------------------------------------- webhooks


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Fleet-Signature header: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@operator("send_webhook")
def send_webhook(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """POST JSON `payload` to `url`, signed, with the call's idempotency key.

    2xx succeeds; timeouts, connection errors, 429 and 5xx are transient (retried
    with backoff and jitter by the actions task); other statuses fail the node.
    """
    url = _param(params, "url", str)
    if not url.startswith(("http://", "https://")):
        raise OperatorError(f"url must be http(s): {url!r}")
    payload = _param(params, "payload", (dict, list), {})
    settings = get_settings()
    body = json.dumps(payload, default=str, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": ctx.key,
               "User-Agent": "lifecycle-fleet"}
    if settings.webhook_secret:
        headers["X-Fleet-Signature"] = sign(settings.webhook_secret, int(time.time()), body)
    response = httpx.post(url, content=body, headers=headers, timeout=settings.webhook_timeout)
    if response.status_code == 429 or response.status_code >= 500:
        raise TransientError(f"webhook {url} answered {response.status_code}")
    if response.status_code >= 300:
        raise OperatorError(f"webhook {url} answered {response.status_code}")
    return {"status": response.status_code}
