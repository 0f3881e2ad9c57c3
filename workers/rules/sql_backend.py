"""SQL back end of the condition language: a boolean expression over `users`.

`select(users.c.id).where(compile_sql(node, now=...))` evaluates a condition for
every user at once (segment refresh over millions of users, no rows in Python).
Event fields become bound parameters. Every leaf is wrapped in COALESCE(…, false)
so SQL's NULL never leaks through NOT: the logic is two-valued, as in Python.
Casts out of jsonb are guarded by jsonb_typeof in CASE, so a value of the wrong
type is false, never an error. `in` lists travel as one array parameter per JSON
type in the list, never one parameter per value (PostgreSQL takes 65,535 at most).
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Numeric,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    literal_column,
    not_,
    null,
    or_,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY, DOUBLE_PRECISION, JSONB
from sqlalchemy.dialects.postgresql import TIMESTAMP as PG_TIMESTAMP

from db.models import LifecycleEvent, User, UserSegment, UserSegmentMembership
from workers.rules.conditions import (
    DOUBLE_LIMIT,
    OFFSET_PATTERN,
    TIMESTAMP_PATTERN,
    All,
    AnyOf,
    Compare,
    Field,
    InSegment,
    Node,
    Not,
    Performed,
    Scalar,
)

users = User.__table__
TS = PG_TIMESTAMP(timezone=True)
DOUBLE: DOUBLE_PRECISION[float] = DOUBLE_PRECISION()
_ORDER = {"gt": "__gt__", "gte": "__ge__", "lt": "__lt__", "lte": "__le__"}
# float8 refuses a numeric that rounds to 0 or to infinity, where Python's float() gives
# 0.0 or inf; so those are decided before the cast, exactly: a magnitude of at most half
# the smallest subnormal (2**-1075) rounds to 0, one from DOUBLE_LIMIT on is no number.
# Named parameters: one of each per statement, however many comparisons use them.
_ROUNDS_TO_ZERO = bindparam("fleet_double_zero", Decimal(f"{5**1075}e-1075"), type_=Numeric)
_ROUNDS_TO_INF = bindparam("fleet_double_limit", Decimal(DOUBLE_LIMIT), type_=Numeric)
_ZERO = literal_column("0::float8", DOUBLE)
# jsonb_typeof names inline: a parameter each would be four per comparison.
_STRING, _NUMBER, _BOOLEAN, _ARRAY, _NULL = (literal_column(f"'{t}'", Text) for t in (
    "string", "number", "boolean", "array", "null"))


def _double(value: ColumnElement[Any], json_type: ColumnElement[Any]) -> ColumnElement[Any]:
    """A jsonb number rounded to the double Python's json would read; NULL for the rest."""
    number = cast(value, Numeric)
    size = func.abs(number)
    return case((json_type != _NUMBER, null()), (size >= _ROUNDS_TO_INF, null()),
                (size <= _ROUNDS_TO_ZERO, _ZERO), else_=cast(number, DOUBLE))


def _key(key: str) -> ColumnElement[Any]:
    """A key inline in the SQL (the parser allows only [A-Za-z0-9_-]): no parameter."""
    return cast(bindparam(None, key, Text, literal_execute=True), Text)


def _array(values: list[Any], item: Any) -> ColumnElement[Any]:
    """One array parameter: `= ANY(CAST(:p AS text[]))`."""
    return any_(cast(bindparam(None, values, ARRAY(item)), ARRAY(item)))


def _split(options: tuple[Scalar, ...]) -> tuple[list[str], list[float], list[bool]]:
    """An `in` list by JSON type (the parser made every number a float)."""
    return ([o for o in options if isinstance(o, str)],
            [o for o in options if type(o) is float],
            [o for o in options if isinstance(o, bool)])


class _Json:
    """Typed views of one jsonb path: its type, and guarded text/number/boolean casts.

    The path is followed with `->` and text keys, which address object members only
    (`jsonb_extract_path` would also index arrays with "1" or "-1"; Python does not).
    """

    def __init__(self, root: ColumnElement[Any], keys: tuple[str, ...]) -> None:
        parent = root
        for key in keys[:-1]:
            parent = parent.op("->", return_type=JSONB)(_key(key))
        self.value = parent.op("->", return_type=JSONB)(_key(keys[-1]))
        self.text = parent.op("->>", return_type=Text)(_key(keys[-1]))
        self.type = func.jsonb_typeof(self.value)
        self.number = _double(self.value, self.type)
        self.boolean = case((self.type == _BOOLEAN, cast(self.value, Boolean)))

    def eq(self, want: Scalar) -> ColumnElement[bool]:
        if isinstance(want, bool):
            return and_(self.type == _BOOLEAN, self.boolean == want)
        if isinstance(want, str):
            return and_(self.type == _STRING, self.text == want)
        return self.number == literal(want, DOUBLE)

    def ne(self, want: Scalar) -> ColumnElement[bool]:
        if isinstance(want, bool):
            return and_(self.type == _BOOLEAN, self.boolean != want)
        if isinstance(want, str):
            return and_(self.type == _STRING, self.text != want)
        return self.number != literal(want, DOUBLE)

    def one_of(self, options: tuple[Scalar, ...]) -> ColumnElement[bool]:
        strings, numbers, booleans = _split(options)
        found = [self.eq(b) for b in dict.fromkeys(booleans)]
        if strings:
            found.append(and_(self.type == _STRING, self.text == _array(strings, Text)))
        if numbers:
            found.append(and_(self.type == _NUMBER, self.number == _array(numbers, DOUBLE)))
        return or_(false(), *found)

    def comparable(self) -> ColumnElement[bool]:
        """A scalar `not_in` can speak about: a string, a boolean or a double."""
        return or_(self.type == _STRING, self.type == _BOOLEAN, self.number.is_not(None))

    def element(self, want: Scalar) -> ColumnElement[bool]:
        """An array with an element equal to `want` (typed; numbers as doubles)."""
        has: ColumnElement[bool]
        if not isinstance(want, (str, bool)):  # jsonb containment compares exact decimals
            item = func.jsonb_array_elements(self.value).table_valued("value")
            has = exists(select(1).select_from(item).where(
                _double(item.c.value, func.jsonb_typeof(item.c.value)) == literal(want, DOUBLE)
            ).correlate(users))
        else:
            has = self.value.op("@>")(cast(literal(json.dumps([want]), Text), JSONB))
        return case((self.type == _ARRAY, has), else_=false())

    def timestamp(self) -> ColumnElement[Any]:
        """The instant a timestamp string names, else NULL.

        The pattern admits only strings PostgreSQL reads without error, so the casts need
        no exception handler (a plpgsql one would open a subtransaction per row, which a
        parallel scan refuses).
        """
        text = self.text
        instant = case((text.op("~")(OFFSET_PATTERN), cast(text, TS)),
                       else_=func.timezone("UTC", cast(text, PG_TIMESTAMP())))
        return case((and_(self.type == _STRING, text.op("~")(TIMESTAMP_PATTERN)), instant))


def _json_compare(node: Compare, j: _Json, now: dt.datetime) -> ColumnElement[bool]:
    op, want = node.op, node.value
    if op == "exists":
        return and_(j.value.is_not(None), j.type != _NULL)
    if op in ("within_last", "older_than"):
        since = literal(now - want, TS)
        return j.timestamp() >= since if op == "within_last" else j.timestamp() < since
    if op == "eq":
        return j.eq(want)
    if op == "ne":
        return j.ne(want)
    if op in _ORDER:
        if isinstance(want, str):
            return and_(j.type == _STRING, getattr(j.text.collate("C"), _ORDER[op])(want))
        return getattr(j.number, _ORDER[op])(literal(want, DOUBLE))
    if op == "in":
        return j.one_of(want)
    if op == "not_in":
        return and_(j.comparable(), not_(j.one_of(want)))
    if op == "contains":
        if isinstance(want, str):
            return or_(and_(j.type == _STRING, func.strpos(j.text, want) > 0), j.element(want))
        return j.element(want)
    if op == "starts_with":
        return and_(j.type == _STRING, func.starts_with(j.text, want))
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
        strings = _split(want)[0]
        found = col == _array(strings, Text) if strings else false()
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
