"""Python back end of the condition language: compile once, evaluate per event.

`compile_python(node)` returns a closure tree; evaluating it does no parsing and
no allocation beyond the field lookups. Semantics (docs/conditions.md) are the
SQL back end's: a comparison on a missing field or a value of another JSON type
is false, and `not` of it is true.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.rules.conditions import (
    All,
    AnyOf,
    Compare,
    Field,
    InSegment,
    Node,
    Not,
    Performed,
    is_number,
    parse_timestamp,
)

MISSING: Any = object()


@dataclass
class EvalContext:
    """What a condition can see while one event is evaluated for one user."""

    event_type: str
    event_data: dict[str, Any]
    user_id: uuid.UUID
    user_email: str
    user_stage: str
    user_attributes: dict[str, Any]
    user_created_at: dt.datetime | None
    now: dt.datetime
    is_member: Callable[[str], bool]
    count_events: Callable[[str, dt.timedelta | None], int]


Predicate = Callable[[EvalContext], bool]


def _getter(field: Field) -> Callable[[EvalContext], Any]:
    if field.is_json:
        keys = field.path
        from_event = field.root == "event.data"

        def get(ctx: EvalContext) -> Any:
            value: Any = ctx.event_data if from_event else ctx.user_attributes
            for key in keys:
                if not isinstance(value, dict) or key not in value:
                    return MISSING
                value = value[key]
            return MISSING if value is None else value

        return get
    column: dict[str, Callable[[EvalContext], Any]] = {
        "event.type": lambda ctx: ctx.event_type,
        "user.email": lambda ctx: ctx.user_email,
        "user.stage": lambda ctx: ctx.user_stage,
        "user.id": lambda ctx: str(ctx.user_id),
        "user.created_at": lambda ctx: MISSING if ctx.user_created_at is None
        else ctx.user_created_at,
    }
    return column[field.root]


def same_type(a: Any, b: Any) -> bool:
    """JSON type equality: numbers with numbers, strings with strings, booleans alone."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if is_number(a):
        return is_number(b)
    return isinstance(a, str) and isinstance(b, str)


def _typed_eq(a: Any, b: Any) -> bool:
    return same_type(a, b) and a == b


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _compare(node: Compare) -> Predicate:  # noqa: C901 - one branch per operator
    get, op, want = _getter(node.field), node.op, node.value
    if op == "exists":
        return lambda ctx: get(ctx) is not MISSING
    if op in ("within_last", "older_than"):
        window: dt.timedelta = want

        def timed(ctx: EvalContext) -> bool:
            value = get(ctx)
            when = value if isinstance(value, dt.datetime) else parse_timestamp(value)
            if when is None:
                return False
            return when >= ctx.now - window if op == "within_last" else when < ctx.now - window

        return timed
    if node.field.is_timestamp:
        order = _ORDER.get(op)

        def at(ctx: EvalContext) -> bool:
            value = get(ctx)
            if value is MISSING:
                return False
            if order is not None:
                return order(value, want)
            return (value == want) == (op == "eq")

        return at
    if op in ("eq", "ne"):
        return lambda ctx: (v := get(ctx)) is not MISSING and same_type(v, want) and (
            (v == want) == (op == "eq"))
    if op in _ORDER:
        order = _ORDER[op]
        return lambda ctx: (v := get(ctx)) is not MISSING and same_type(v, want) and order(v, want)
    if op in ("in", "not_in"):
        options = want

        def member(ctx: EvalContext) -> bool:
            v = get(ctx)
            if v is MISSING or isinstance(v, (dict, list)):
                return False
            found = any(_typed_eq(v, o) for o in options)
            return found if op == "in" else not found

        return member
    if op == "contains":
        def contains(ctx: EvalContext) -> bool:
            v = get(ctx)
            if isinstance(v, str):
                return isinstance(want, str) and want in v
            if isinstance(v, list):
                return any(_typed_eq(item, want) for item in v)
            return False

        return contains
    if op == "starts_with":
        return lambda ctx: isinstance(v := get(ctx), str) and v.startswith(want)
    raise AssertionError(f"unhandled operator {op}")


def compile_python(node: Node) -> Predicate:
    """Compile an AST into a predicate over an EvalContext."""
    if isinstance(node, All):
        children = [compile_python(c) for c in node.children]
        return lambda ctx: all(c(ctx) for c in children)
    if isinstance(node, AnyOf):
        children = [compile_python(c) for c in node.children]
        return lambda ctx: any(c(ctx) for c in children)
    if isinstance(node, Not):
        child = compile_python(node.child)
        return lambda ctx: not child(ctx)
    if isinstance(node, InSegment):
        ref = node.ref
        return lambda ctx: ctx.is_member(ref)
    if isinstance(node, Performed):
        event_type, at_least, within = node.event_type, node.at_least, node.within
        return lambda ctx: ctx.count_events(event_type, within) >= at_least
    return _compare(node)
