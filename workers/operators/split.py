"""`split`: a sticky A/B split. Sends the user down one branch and records the exposure.

The branch is `split_hash.assign` of the user, the workflow's name and the node, so
it is the same on every worker and on every re-entry, with no assignment to look up
first. The exposure (`split_exposures`, owned here) is written in the operator call's
transaction, once per execution and node (`ON CONFLICT DO NOTHING`): a second call
for them (a loop back to the split) records nothing and returns the variant recorded
first, so the branch taken always matches the exposure. The result is
`{"variant": NAME}`; an exclusive gateway after the task branches on it
(`ab["variant"] == "treatment"` with `resultVariable="ab"`).

Declared order: parameters are stored evaluated as jsonb, which sorts object keys,
so the order written in the BPMN (which decides the cumulative buckets and the
baseline of the lift) is read back from the execution's deployed spec when
`variants` is a dict literal there. A `variants` computed from variables keeps the
order jsonb gives it: the same on every worker, so still sticky.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from db.models import SplitExposure, Workflow, WorkflowExecution
from workers.engine.specs import SPECS
from workers.operators.context import OperatorContext, OperatorError, param
from workers.operators.split_hash import (
    SplitError,
    Variants,
    assign,
    declared_names,
    parse_variants,
)


def split(ctx: OperatorContext, params: dict[str, Any]) -> dict[str, Any]:
    """Assign the user a variant of `variants` ({name: weight}) and record the exposure."""
    raw = param(params, "variants", dict)
    try:
        variants = parse_variants(_in_declared_order(ctx, raw))
    except SplitError as exc:
        raise OperatorError(f"parameter 'variants': {exc}") from None
    workflow = ctx.session.get(Workflow, ctx.workflow_id)
    if workflow is None:
        raise OperatorError(f"workflow {ctx.workflow_id} no longer exists")
    variant = assign(ctx.user_id, workflow.name, ctx.node_id, variants)
    return {"variant": record_exposure(ctx, variants, variant)}


def record_exposure(ctx: OperatorContext, variants: Variants, variant: str) -> str:
    """Insert the exposure unless this execution and node have one; the variant recorded."""
    recorded = ctx.session.execute(
        pg_insert(SplitExposure).values(
            execution_id=ctx.execution_id, workflow_id=ctx.workflow_id, node_id=ctx.node_id,
            user_id=ctx.user_id, variant=variant, position=variants.names.index(variant),
            created_at=ctx.now)
        .on_conflict_do_nothing(constraint="uq_split_exposures_execution_node")
        .returning(SplitExposure.variant)).scalar_one_or_none()
    if recorded is not None:
        return recorded
    return ctx.session.execute(select(SplitExposure.variant).where(
        SplitExposure.execution_id == ctx.execution_id,
        SplitExposure.node_id == ctx.node_id)).scalar_one()


def _in_declared_order(ctx: OperatorContext, variants: dict[str, Any]) -> dict[str, Any]:
    """`variants` reordered as the BPMN writes them, when its text says (see the module)."""
    execution = ctx.session.get(WorkflowExecution, ctx.execution_id)
    if execution is None or execution.workflow_version is None:
        return variants
    loaded = SPECS.get(ctx.session, execution.workflow_id, execution.workflow_version)
    for spec in _task_specs(loaded.spec, loaded.subprocess_specs):
        if getattr(spec, "bpmn_id", None) != ctx.node_id:
            continue
        expression = ((getattr(spec, "operation_params", None) or {}).get("variants") or {})
        names = declared_names(expression.get("value") or "") if isinstance(
            expression, dict) else None
        if names is not None and sorted(names) == sorted(variants):
            return {name: variants[name] for name in names}
    return variants


def _task_specs(spec: Any, subprocess_specs: dict[str, Any]) -> Iterator[Any]:
    for process in (spec, *subprocess_specs.values()):
        yield from process.task_specs.values()
