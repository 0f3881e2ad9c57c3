"""Operators on static segment membership."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from db.models import UserSegment
from workers.events.outbox import add_segment_transitions
from workers.operators.context import OperatorContext, OperatorError, param
from workers.rules.segments import set_static_members


def _static_segment(ctx: OperatorContext, params: dict[str, Any]) -> UserSegment:
    name = param(params, "segment", str)
    segment = ctx.session.execute(
        select(UserSegment).where(UserSegment.name == name)).scalar_one_or_none()
    if segment is None or segment.kind != "static":
        raise OperatorError(f"no static segment named {name!r}")
    return segment


def add_to_segment(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    segment = _static_segment(ctx, params)
    change = set_static_members(ctx.session, segment.id, [ctx.user_id], add=True)
    add_segment_transitions(ctx.session, change.transitions, ctx.now)
    return {"segment": segment.name, "added": change.changed}


def remove_from_segment(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    segment = _static_segment(ctx, params)
    change = set_static_members(ctx.session, segment.id, [ctx.user_id], add=False)
    add_segment_transitions(ctx.session, change.transitions, ctx.now)
    return {"segment": segment.name, "removed": change.changed}
