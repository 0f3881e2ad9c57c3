"""Operators on static segment membership."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from db.models import UserSegment
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
    changed = set_static_members(ctx.session, segment.id, [ctx.user_id], add=True)
    return {"segment": segment.name, "added": changed}


def remove_from_segment(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    segment = _static_segment(ctx, params)
    changed = set_static_members(ctx.session, segment.id, [ctx.user_id], add=False)
    return {"segment": segment.name, "removed": changed}
