"""Python back end of the condition language: compile once, evaluate per event.

`compile_python(node)` returns a closure tree; evaluating it does no parsing and
no allocation beyond the field lookups, and an `in` list is a frozenset per JSON
type, so its cost does not grow with the list. Semantics (docs/conditions.md) are
the SQL back end's: a comparison on a missing field or a value of another JSON
type is false, and `not` of it is true; numbers compare as doubles.
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
    Scalar,
    as_double,
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


def _equals(want: Scalar) -> Callable[[Any], bool]:
    """Equality with one condition value: JSON types kept apart, numbers as doubles."""
    if isinstance(want, bool):
        return lambda v: v is want
    if isinstance(want, str):
        return lambda v: isinstance(v, str) and v == want
    return lambda v: as_double(v) == want


def _differs(want: Scalar) -> Callable[[Any], bool]:
    """`ne`: a value of the same JSON type that is not equal (missing is not "different")."""
    if isinstance(want, bool):
        return lambda v: isinstance(v, bool) and v is not want
    if isinstance(want, str):
        return lambda v: isinstance(v, str) and v != want
    return lambda v: (n := as_double(v)) is not None and n != want


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _member(options: tuple[Scalar, ...], wanted: bool) -> Callable[[Any], bool]:
    """`in` (wanted=True) / `not_in`: one set lookup per JSON type, whatever the list size."""
    strings = frozenset(o for o in options if isinstance(o, str))
    numbers = frozenset(o for o in options if type(o) is float)
    booleans = frozenset(o for o in options if isinstance(o, bool))

    def member(v: Any) -> bool:
        if isinstance(v, str):
            return (v in strings) is wanted
        if isinstance(v, bool):
            return (v in booleans) is wanted
        n = as_double(v)
        return n is not None and (n in numbers) is wanted

    return member


def _timed(node: Compare, get: Callable[[EvalContext], Any]) -> Predicate:
    window: dt.timedelta = node.value
    since_now = node.op == "within_last"
    column = node.field.is_timestamp

    def timed(ctx: EvalContext) -> bool:
        value = get(ctx)
        when = (None if value is MISSING else value) if column else parse_timestamp(value)
        if when is None:
            return False
        return when >= ctx.now - window if since_now else when < ctx.now - window

    return timed


def _at(node: Compare, get: Callable[[EvalContext], Any]) -> Predicate:
    """A comparison with the timestamp column (the parser made the value a datetime)."""
    order, want, equal = _ORDER.get(node.op), node.value, node.op == "eq"

    def at(ctx: EvalContext) -> bool:
        value = get(ctx)
        if value is MISSING:
            return False
        if order is not None:
            return order(value, want)
        return (value == want) is equal

    return at


def _contains(want: Scalar) -> Callable[[Any], bool]:
    """A string in a string, or an element equal to `want` in an array."""
    element = _equals(want)

    def contains(v: Any) -> bool:
        if isinstance(v, str):
            return isinstance(want, str) and want in v
        if isinstance(v, list):
            return any(element(item) for item in v)
        return False

    return contains


def _test(node: Compare) -> Callable[[Any], bool]:
    """The comparison as a test of the field's value."""
    op, want = node.op, node.value
    if op == "exists":
        return lambda v: v is not MISSING
    if op == "eq":
        return _equals(want)
    if op == "ne":
        return _differs(want)
    if op in _ORDER:
        order = _ORDER[op]
        if isinstance(want, str):
            return lambda v: isinstance(v, str) and order(v, want)
        return lambda v: (n := as_double(v)) is not None and order(n, want)
    if op in ("in", "not_in"):
        return _member(want, op == "in")
    if op == "contains":
        return _contains(want)
    if op == "starts_with":
        return lambda v: isinstance(v, str) and v.startswith(want)
    raise AssertionError(f"unhandled operator {op}")


def _compare(node: Compare) -> Predicate:
    get = _getter(node.field)
    if node.op in ("within_last", "older_than"):
        return _timed(node, get)
    if node.field.is_timestamp and node.op != "exists":
        return _at(node, get)
    test = _test(node)
    return lambda ctx: test(get(ctx))


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
