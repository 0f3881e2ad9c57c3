"""Events recorded by operators, through the same ingest pipeline as producers' events."""

from __future__ import annotations

import uuid
from typing import Any

from workers.events.envelope import build_event
from workers.events.ingest import ingest
from workers.operators.context import OperatorContext, OperatorError, param
from workers.rules.triggers import process_triggers


def emit(ctx: OperatorContext, event_type: str, data: dict[str, Any], purpose: str) -> uuid.UUID:
    """Record an event for the execution's user now; triggers react to it after commit."""
    event = build_event(event_type, user=ctx.user_id, data=data,
                        event_id=ctx.event_id(purpose), occurred_at=ctx.now)
    result = ingest(ctx.session, [event.to_message()], source=f"operator:{ctx.node_id}",
                    triggers=process_triggers(), now=ctx.now)
    if result.rejected:
        raise OperatorError(f"event {event_type!r} was rejected (see fleet dlq list)")
    ctx.ingested.append(result)
    return event.event_id


def emit_event(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """Record an event of `event_type` with `data` for the user; triggers react to it."""
    event_type = param(params, "event_type", str)
    data = param(params, "data", dict, {})
    event_id = emit(ctx, event_type, data, "emit")
    return {"event_id": str(event_id)}
