"""The condition language: one parser, one AST (see docs/conditions.md).

Trigger and segment conditions are JSON. `parse` turns them into frozen nodes,
rejecting anything invalid with a `ConditionError` that names the offending part
by JSON pointer. Two back ends compile the same AST: `python_backend` (per-event
evaluation) and `sql_backend` (set-based segment refresh); they must agree, and a
property test checks that they do.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Any

from workers import durations

MAX_DEPTH = 32
MAX_NODES = 500
MAX_STRING = 1000
MAX_LIST = 1000
# What `fleet apply` accepts (docs/conditions.md): conditions plus list values. Stored
# conditions are parsed without it, so a definition applied earlier keeps working.
MAX_COST = 10_000
# Numbers compare as IEEE-754 doubles; from this magnitude on a number rounds to infinity
# (Python's float() and PostgreSQL's float8 alike) and is not a comparable number.
DOUBLE_LIMIT = 2**1024 - 2**970

COLUMN_FIELDS = {"event.type", "user.email", "user.stage", "user.id", "user.created_at"}
JSON_ROOTS = ("event.data", "user.attributes")
TIMESTAMP_FIELDS = {"user.created_at"}
COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "starts_with",
               "exists", "within_last", "older_than")
ORDERING = {"gt", "gte", "lt", "lte"}
TIME_OPS = {"within_last", "older_than"}

_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The ISO-8601 forms both back ends read as timestamps, written in the regex syntax both
# engines read alike (Python: fullmatch; PostgreSQL: `~`), so that a matching string is
# always a real instant for both parsers and neither has to catch an error: a date of
# the proleptic Gregorian calendar (years 0001-9999, 29 February in leap years only),
# optionally a time (hours to 23, seconds to 59: PostgreSQL alone would take 24:00 and
# :60) with up to six fraction digits, optionally Z or an offset up to ±15:59 (Python
# alone would take more). No offset means UTC.
_YEAR = "([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_LEAP_YEAR = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"({_YEAR}-((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)"
         f"|(0[13578]|1[02])-31)|{_LEAP_YEAR}-02-29)")
_TIME = r"[T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
_OFFSET = "(Z|[+-](0[0-9]|1[0-5]):[0-5][0-9])"
TIMESTAMP_PATTERN = f"^{_DATE}({_TIME}{_OFFSET}?)?$"
OFFSET_PATTERN = f"{_OFFSET}$"
_TIMESTAMP_RE = re.compile(TIMESTAMP_PATTERN)

Scalar = str | float | bool


class ConditionError(ValueError):
    """An invalid condition; `path` is a JSON pointer to the offending part."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path or "/"
        self.message = message
        super().__init__(f"invalid condition at {self.path}: {message}")


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class Field:
    """`root` is a column field or a JSON root; `path` the keys below a JSON root."""

    root: str
    path: tuple[str, ...] = ()

    @property
    def is_json(self) -> bool:
        return self.root in JSON_ROOTS

    @property
    def is_timestamp(self) -> bool:
        return self.root in TIMESTAMP_FIELDS


@dataclass(frozen=True)
class All:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class AnyOf:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class Compare:
    field: Field
    op: str
    # A scalar, a tuple of scalars (in / not_in), a timedelta (time ops),
    # a datetime (ordering on a timestamp column), or None (exists).
    value: Any


@dataclass(frozen=True)
class InSegment:
    ref: str


@dataclass(frozen=True)
class Performed:
    event_type: str
    at_least: int
    within: dt.timedelta | None


Node = All | AnyOf | Not | Compare | InSegment | Performed
TRUE = All(())


# --------------------------------------------------------------------------- helpers


def parse_duration(text: Any, path: str = "") -> dt.timedelta:
    """workers.durations.parse_duration, its error a ConditionError at `path`."""
    try:
        return durations.parse_duration(text)
    except ValueError as exc:
        raise ConditionError(path, str(exc)) from None


def parse_timestamp(value: Any) -> dt.datetime | None:
    """An ISO-8601 string in the accepted forms → aware datetime (naive = UTC), else None."""
    if not isinstance(value, str) or not _TIMESTAMP_RE.fullmatch(value):
        return None
    parsed = dt.datetime.fromisoformat(value)  # cannot fail on what the pattern matched
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def as_double(value: Any) -> float | None:
    """A JSON number as the double both back ends compare; None for anything else.

    Per event, so exact types: a bool is not a number, and neither is inf, NaN or an
    integer too large for a double (what `1e400` becomes after a jsonb round trip).
    """
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int:
        return float(value) if -DOUBLE_LIMIT < value < DOUBLE_LIMIT else None
    return None


def _scalar(value: Any, path: str) -> Scalar:
    """A condition's value; numbers become the doubles they are compared as."""
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ConditionError(path, f"string longer than {MAX_STRING} characters")
        if "\x00" in value:
            raise ConditionError(path, "string contains a NUL character")
        return value
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        number = as_double(value)
        if number is None:
            raise ConditionError(path, "numbers must be finite doubles (magnitude below 1.8e308)")
        return number
    raise ConditionError(path, f"expected a string, number or boolean, got {type(value).__name__}")


def _field(name: Any, path: str) -> Field:
    if not isinstance(name, str):
        raise ConditionError(path, "field must be a string")
    if name in COLUMN_FIELDS:
        return Field(name)
    for root in JSON_ROOTS:
        if name.startswith(root + "."):
            keys = tuple(name[len(root) + 1:].split("."))
            if len(keys) > 8 or not all(_SEGMENT_RE.fullmatch(k) for k in keys):
                raise ConditionError(path, f"bad key path in {name!r} (keys: letters, digits, _ -)")
            return Field(root, keys)
    raise ConditionError(
        path, f"unknown field {name!r} (expected one of {sorted(COLUMN_FIELDS)} or "
              "event.data.<key> / user.attributes.<key>)")


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, allow_event: bool, max_cost: int | None) -> None:
        self.allow_event = allow_event
        self.max_cost = max_cost
        self.nodes = 0
        self.cost = 0

    def charge(self, amount: int, path: str) -> None:
        """Count conditions and list values; refuse at the part that exceeds `max_cost`."""
        self.cost += amount
        if self.max_cost is not None and self.cost > self.max_cost:
            raise ConditionError(path, f"the condition costs more than {self.max_cost:,} "
                                       "(conditions + list values, see docs/conditions.md)")

    def node(self, obj: Any, path: str, depth: int) -> Node:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ConditionError(path, f"more than {MAX_NODES} conditions")
        self.charge(1, path)
        if depth > MAX_DEPTH:
            raise ConditionError(path, f"nested deeper than {MAX_DEPTH} levels")
        if not isinstance(obj, dict):
            raise ConditionError(path, f"expected an object, got {type(obj).__name__}")
        if not obj:
            return TRUE
        keys = set(obj)
        for combinator in ("all", "any"):
            if combinator in keys:
                self._only(obj, {combinator}, path)
                items = obj[combinator]
                if not isinstance(items, list):
                    raise ConditionError(f"{path}/{combinator}", "expected a list of conditions")
                children = tuple(self.node(c, f"{path}/{combinator}/{i}", depth + 1)
                                 for i, c in enumerate(items))
                return All(children) if combinator == "all" else AnyOf(children)
        if "not" in keys:
            self._only(obj, {"not"}, path)
            return Not(self.node(obj["not"], f"{path}/not", depth + 1))
        if "in_segment" in keys:
            self._only(obj, {"in_segment"}, path)
            ref = obj["in_segment"]
            if not isinstance(ref, str) or not 1 <= len(ref) <= 255:
                raise ConditionError(f"{path}/in_segment", "expected a segment name or id")
            return InSegment(ref)
        if "performed" in keys:
            self._only(obj, {"performed"}, path)
            return self.performed(obj["performed"], f"{path}/performed")
        if "field" in keys or "op" in keys:
            return self.compare(obj, path)
        raise ConditionError(path, f"unknown condition keys {sorted(keys)} (expected all, any, "
                                   "not, in_segment, performed, or field/op/value)")

    @staticmethod
    def _only(obj: dict[str, Any], allowed: set[str], path: str) -> None:
        extra = set(obj) - allowed
        if extra:
            raise ConditionError(f"{path}/{sorted(extra)[0]}", "unexpected key")

    def performed(self, obj: Any, path: str) -> Performed:
        if not isinstance(obj, dict):
            raise ConditionError(path, "expected {event_type, at_least?, within?}")
        self._only(obj, {"event_type", "at_least", "within"}, path)
        event_type = obj.get("event_type")
        if not isinstance(event_type, str) or not 1 <= len(event_type) <= 100:
            raise ConditionError(f"{path}/event_type", "expected an event type")
        at_least = obj.get("at_least", 1)
        if not isinstance(at_least, int) or isinstance(at_least, bool) or not 1 <= at_least <= 10**6:
            raise ConditionError(f"{path}/at_least", "expected an integer from 1 to 1000000")
        within = obj.get("within")
        return Performed(event_type, at_least,
                         None if within is None else parse_duration(within, f"{path}/within"))

    def compare(self, obj: dict[str, Any], path: str) -> Compare:
        self._only(obj, {"field", "op", "value"}, path)
        field = _field(obj.get("field"), f"{path}/field")
        if field.root.startswith("event.") and not self.allow_event:
            raise ConditionError(f"{path}/field", "event fields are not available here (segments)")
        op = obj.get("op")
        if op not in COMPARISONS:
            raise ConditionError(f"{path}/op", f"unknown operator {op!r} (expected one of "
                                               f"{', '.join(COMPARISONS)})")
        vpath = f"{path}/value"
        if op == "exists":
            if "value" in obj:
                raise ConditionError(vpath, "exists takes no value (wrap it in not for absence)")
            return Compare(field, op, None)
        if "value" not in obj:
            raise ConditionError(vpath, f"{op} needs a value")
        raw = obj["value"]
        if op in TIME_OPS:
            if not (field.is_timestamp or field.is_json):
                raise ConditionError(f"{path}/field", f"{op} needs a timestamp field")
            return Compare(field, op, parse_duration(raw, vpath))
        if field.is_timestamp:
            if op not in ORDERING | {"eq", "ne"}:
                raise ConditionError(f"{path}/op", f"{op} does not apply to a timestamp")
            when = parse_timestamp(raw)
            if when is None:
                raise ConditionError(vpath, "expected an ISO-8601 timestamp")
            return Compare(field, op, when)
        if op in ("in", "not_in"):
            if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_LIST:
                raise ConditionError(vpath, f"{op} needs a list of 1 to {MAX_LIST} values")
            self.charge(len(raw), vpath)
            return Compare(field, op, tuple(_scalar(v, f"{vpath}/{i}") for i, v in enumerate(raw)))
        value = _scalar(raw, vpath)
        if op in ORDERING and isinstance(value, bool):
            raise ConditionError(vpath, f"{op} compares numbers or strings, not booleans")
        if op == "starts_with" and not isinstance(value, str):
            raise ConditionError(vpath, "starts_with needs a string")
        if not field.is_json and not isinstance(value, str):
            raise ConditionError(vpath, f"{field.root} is a string field")
        return Compare(field, op, value)


def parse(obj: Any, *, allow_event: bool = True, max_cost: int | None = None) -> Node:
    """Parse a JSON condition; `allow_event=False` for segments (no event in scope).

    `max_cost` (MAX_COST when a definition is applied) bounds conditions + list values.
    """
    return _Parser(allow_event, max_cost).node(obj, "", 0)


def segment_refs(node: Node) -> frozenset[str]:
    """Every segment a condition mentions, for prefetching memberships."""
    if isinstance(node, InSegment):
        return frozenset({node.ref})
    if isinstance(node, (All, AnyOf)):
        return frozenset().union(*(segment_refs(c) for c in node.children))
    if isinstance(node, Not):
        return segment_refs(node.child)
    return frozenset()
