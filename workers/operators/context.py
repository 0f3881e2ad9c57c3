"""What an operator is given: the call's context, its parameters, and the error it raises."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import User
from workers.errors import PermanentError
from workers.events.ingest import IngestResult

EVENT_NAMESPACE = uuid.UUID("5b0c1a8e-8d0f-4a55-9a3c-0f1e1e5e7a11")


class OperatorError(PermanentError):
    """The operator cannot succeed with these parameters; the execution fails with this message."""


class Deferred(Exception):  # noqa: N818 (not an error: the call is put off)
    """The send gateway put the call off until `until` (outside the user's send window)."""

    def __init__(self, until: dt.datetime) -> None:
        super().__init__(f"deferred until {until.isoformat()}")
        self.until = until


@dataclass
class OperatorContext:
    session: Session
    execution_id: uuid.UUID
    workflow_id: uuid.UUID
    user_id: uuid.UUID
    node_id: str
    key: str  # the idempotency key of this call
    now: dt.datetime
    # Ingests of events emitted in this transaction; their follow-up work is sent after commit.
    ingested: list[IngestResult] = field(default_factory=list)
    # (channel, outcome) of the send gateway's decision, when the operator sends to the user.
    send: tuple[str, str] | None = None

    def event_id(self, purpose: str) -> uuid.UUID:
        """A deterministic event id: the same call always emits the same event."""
        return uuid.uuid5(EVENT_NAMESPACE, f"{self.key}:{purpose}")


Operator = Callable[[OperatorContext, dict[str, Any]], dict[str, Any]]


def param(params: dict[str, Any], name: str, kind: type | tuple[type, ...],
          default: Any = ...) -> Any:
    """Parameter `name` of type `kind`; `default` when absent or null, else it is required."""
    if name not in params or params[name] is None:
        if default is ...:
            raise OperatorError(f"parameter {name!r} is required")
        return default
    value = params[name]
    if not isinstance(value, kind):
        raise OperatorError(f"parameter {name!r} must be {getattr(kind, '__name__', kind)}, "
                            f"got {type(value).__name__}")
    return value


def load_user(ctx: OperatorContext, lock: bool = False) -> User:
    """The execution's user (locked FOR UPDATE when `lock`); a deleted user fails the call."""
    query = select(User).where(User.id == ctx.user_id)
    user = ctx.session.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if user is None:
        raise OperatorError(f"user {ctx.user_id} no longer exists")
    return user
