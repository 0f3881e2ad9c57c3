"""`send_message` and the channels it delivers through (email, sms, push)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.models import MessageLog
from workers.operators.context import OperatorContext, OperatorError, load_user, param
from workers.operators.gate import gate


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
        row = session.execute(pg_insert(MessageLog).values(
            idempotency_key=message.idempotency_key, execution_id=message.execution_id,
            user_id=message.user_id, channel=message.channel, recipient=message.recipient,
            template=message.template, subject=message.subject, body=message.body,
        ).on_conflict_do_nothing().returning(MessageLog.id)).scalar_one_or_none()
        return {"message_log_id": row, "duplicate": row is None}


MESSAGE_CHANNELS = ("email", "sms", "push")
# Channel name -> implementation; a deployment registers real providers here.
CHANNELS: dict[str, Channel] = {}
DEFAULT_CHANNEL = LocalLogChannel()


def send_message(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """Send `body` (or `template`) on `channel` (email/sms/push) to `to` (default: the user).

    The send gateway decides first (consent, holdout, send window, caps); unless it
    says `sent` the channel is not called and the workflow gets the outcome as the
    result (`outcome`, `reason`), and goes on. `transactional: true` skips holdout,
    window and caps (receipts, password resets), not consent.
    """
    channel = param(params, "channel", str, "email")
    if channel not in MESSAGE_CHANNELS and channel not in CHANNELS:
        raise OperatorError(f"channel must be one of {', '.join(MESSAGE_CHANNELS)} "
                            f"(or a registered one): {channel!r}")
    template = param(params, "template", str, None)
    body = param(params, "body", str, None)
    if template is None and body is None:
        raise OperatorError("send_message needs a 'template' or a 'body'")
    user = load_user(ctx)
    recipient = param(params, "to", str, None) or user.email
    decision = gate(ctx, channel, recipient, param(params, "transactional", bool, False), user)
    if decision.outcome != "sent":
        return {"channel": channel, "to": recipient, **decision.as_result()}
    message = OutgoingMessage(ctx.key, channel, recipient, template,
                              param(params, "subject", str, None), body, ctx.execution_id,
                              ctx.user_id)
    result = CHANNELS.get(channel, DEFAULT_CHANNEL).send(ctx.session, message)
    return {"channel": channel, "to": recipient, **result, **decision.as_result()}
