"""SQL back end of the condition language: a boolean expression over `users`.

`select(users.c.id).where(compile_sql(node, now=...))` evaluates a condition for
every user at once (segment refresh over millions of users, no rows in Python).
Event fields become bound parameters. Every leaf is wrapped in COALESCE(…, false)
so SQL's NULL never leaks through NOT: the logic is two-valued, as in Python.
Casts out of jsonb are guarded by jsonb_typeof in CASE, so a value of the wrong
type is false, never an error.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Numeric,
    Text,
    and_,
    bindparam,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import TIMESTAMP as PG_TIMESTAMP

from db.models import LifecycleEvent, User, UserSegment, UserSegmentMembership
from workers.rules.conditions import (
    TIMESTAMP_RE_SQL,
    All,
    AnyOf,
    Compare,
    Field,
    InSegment,
    Node,
    Not,
    Performed,
    is_number,
)

users = User.__table__
TS = PG_TIMESTAMP(timezone=True)
_ORDER = {"gt": "__gt__", "gte": "__ge__", "lt": "__lt__", "lte": "__le__"}


def _num(value: Any) -> ColumnElement[Any]:
    return cast(literal(repr(value) if isinstance(value, float) else str(value), Text), Numeric)


class _Json:
    """Typed views of one jsonb path: its type, and guarded text/number/boolean casts."""

    def __init__(self, root: ColumnElement[Any], keys: tuple[str, ...]) -> None:
        self.value = func.jsonb_extract_path(root, *[literal(k, Text) for k in keys])
        self.type = func.jsonb_typeof(self.value)
        self.text = func.jsonb_extract_path_text(root, *[literal(k, Text) for k in keys])
        self.number = case((self.type == "number", cast(self.value, Numeric)))
        self.boolean = case((self.type == "boolean", cast(self.value, Boolean)))

    def eq(self, want: Any) -> ColumnElement[bool]:
        if isinstance(want, bool):
            return and_(self.type == "boolean", self.boolean == want)
        if is_number(want):
            return and_(self.type == "number", self.number == _num(want))
        return and_(self.type == "string", self.text == want)

    def timestamp(self) -> ColumnElement[Any]:
        return case((and_(self.type == "string", self.text.op("~")(TIMESTAMP_RE_SQL)),
                     func.fleet_try_timestamptz(self.text)))


def _json_compare(node: Compare, j: _Json, now: dt.datetime) -> ColumnElement[bool]:
    op, want = node.op, node.value
    if op == "exists":
        return and_(j.value.is_not(None), j.type != "null")
    if op in ("within_last", "older_than"):
        since = literal(now - want, TS)
        return j.timestamp() >= since if op == "within_last" else j.timestamp() < since
    if op == "eq":
        return j.eq(want)
    if op == "ne":
        if isinstance(want, bool):
            return and_(j.type == "boolean", j.boolean != want)
        if is_number(want):
            return and_(j.type == "number", j.number != _num(want))
        return and_(j.type == "string", j.text != want)
    if op in _ORDER:
        if is_number(want):
            return and_(j.type == "number", getattr(j.number, _ORDER[op])(_num(want)))
        return and_(j.type == "string", getattr(j.text.collate("C"), _ORDER[op])(want))
    if op in ("in", "not_in"):
        found = or_(false(), *(j.eq(option) for option in want))
        if op == "in":
            return found
        return and_(j.type.in_(("string", "number", "boolean")), not_(found))
    if op == "contains":
        in_array = and_(j.type == "array",
                        j.value.op("@>")(cast(literal(json.dumps([want]), Text), JSONB)))
        if isinstance(want, str):
            return or_(and_(j.type == "string", func.strpos(j.text, want) > 0), in_array)
        return in_array
    if op == "starts_with":
        return and_(j.type == "string", func.starts_with(j.text, want))
    raise AssertionError(f"unhandled operator {op}")


def _column(field: Field, event_type: str) -> ColumnElement[Any]:
    return {
        "event.type": literal(event_type, Text),
        "user.email": users.c.email,
        "user.stage": users.c.current_lifecycle_stage,
        "user.id": cast(users.c.id, Text),
        "user.created_at": users.c.created_at,
    }[field.root]


def _column_compare(node: Compare, col: ColumnElement[Any], now: dt.datetime) -> ColumnElement[bool]:
    op, want = node.op, node.value
    if op == "exists":
        return col.is_not(None)
    if node.field.is_timestamp:
        if op in ("within_last", "older_than"):
            since = literal(now - want, TS)
            return col >= since if op == "within_last" else col < since
        value = literal(want, TS)
        if op in _ORDER:
            return getattr(col, _ORDER[op])(value)
        return col == value if op == "eq" else col != value
    if op in ("in", "not_in"):
        options = [o for o in want if isinstance(o, str)]
        found = col.in_(options) if options else false()
        return found if op == "in" else and_(col.is_not(None), not_(found))
    if op == "eq":
        return col == want
    if op == "ne":
        return col != want
    if op in _ORDER:
        return getattr(col.collate("C"), _ORDER[op])(want)
    if op == "contains":
        return func.strpos(col, want) > 0
    if op == "starts_with":
        return func.starts_with(col, want)
    raise AssertionError(f"{op} does not apply to {node.field.root}")


def compile_sql(node: Node, *, now: dt.datetime, event_type: str = "",
                event_data: dict[str, Any] | None = None) -> ColumnElement[bool]:
    """Compile an AST into a boolean SQL expression over the `users` table."""
    data = bindparam(None, event_data or {}, type_=JSONB)

    def build(n: Node) -> ColumnElement[bool]:
        if isinstance(n, All):
            return and_(true(), *(build(c) for c in n.children))
        if isinstance(n, AnyOf):
            return or_(false(), *(build(c) for c in n.children))
        if isinstance(n, Not):
            return not_(build(n.child))
        if isinstance(n, InSegment):
            m, s = UserSegmentMembership.__table__, UserSegment.__table__
            return exists(
                select(1).select_from(m.join(s, s.c.id == m.c.segment_id)).where(
                    m.c.user_id == users.c.id,
                    or_(s.c.name == n.ref, cast(s.c.id, Text) == n.ref),
                    or_(m.c.valid_until.is_(None), m.c.valid_until > literal(now, TS)),
                ).correlate(users)
            )
        if isinstance(n, Performed):
            e = LifecycleEvent.__table__
            where = [e.c.user_id == users.c.id, e.c.event_type == n.event_type]
            if n.within is not None:
                where.append(e.c.created_at >= literal(now - n.within, TS))
            counted = (select(func.count()).select_from(e).where(*where)
                       .correlate(users).scalar_subquery())
            return counted >= n.at_least
        if n.field.is_json:
            root = data if n.field.root == "event.data" else users.c.attributes
            leaf = _json_compare(n, _Json(root, n.field.path), now)
        else:
            leaf = _column_compare(n, _column(n.field, event_type), now)
        return func.coalesce(leaf, false())

    return build(node)
