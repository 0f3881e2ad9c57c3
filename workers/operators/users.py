"""Operators on the execution's user: lifecycle stage and attributes."""

from __future__ import annotations

from typing import Any

from db.models import LIFECYCLE_STAGES, UserLifecycleHistory
from workers.events.envelope import IDENTIFY
from workers.events.outbox import add_segment_transitions
from workers.operators.context import OperatorContext, OperatorError, load_user, param
from workers.operators.events import emit
from workers.rules.membership import MembershipResolver
from workers.rules.triggers import process_triggers


def set_lifecycle_stage(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """Move the user to `stage`; history row, audit event `lifecycle.stage_changed`."""
    stage = param(params, "stage", str)
    if stage not in LIFECYCLE_STAGES:
        raise OperatorError(f"unknown lifecycle stage {stage!r} (expected one of "
                            f"{', '.join(LIFECYCLE_STAGES)})")
    user = load_user(ctx, lock=True)
    previous = user.current_lifecycle_stage
    if previous == stage:
        return {"changed": False, "stage": stage}
    user.current_lifecycle_stage = stage
    user.updated_at = ctx.now
    ctx.session.add(UserLifecycleHistory(
        user_id=user.id, from_stage=previous, to_stage=stage, transitioned_at=ctx.now,
        workflow_execution_id=ctx.execution_id, metadata_={"node_id": ctx.node_id}))
    ctx.session.flush()
    # Segments on user.stage change with it: recompute now, entries and exits included.
    membership = MembershipResolver(ctx.session, ctx.now,
                                    process_triggers().get(ctx.session).segments)
    membership.reevaluate([user.id])
    add_segment_transitions(ctx.session, membership.transitions, ctx.now)
    emit(ctx, "lifecycle.stage_changed",
         {"from": previous, "to": stage, "execution_id": str(ctx.execution_id)}, "stage")
    return {"changed": True, "from": previous, "stage": stage}


def update_user_attributes(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """Merge `attributes` into the user's (null removes a key), as a `user.identify` event."""
    attributes = param(params, "attributes", dict)
    emit(ctx, IDENTIFY, attributes, "attributes")
    return {"updated": sorted(attributes)}
