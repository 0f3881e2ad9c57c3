"""The condition language: one parser, one AST (see docs/conditions.md).

Trigger and segment conditions are JSON. `parse` turns them into frozen nodes,
rejecting anything invalid with a `ConditionError` that names the offending part
by JSON pointer. Two back ends compile the same AST: `python_backend` (per-event
evaluation) and `sql_backend` (set-based segment refresh); they must agree, and a
property test checks that they do.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 32
MAX_NODES = 500
MAX_STRING = 1000
MAX_LIST = 1000
MAX_DURATION = dt.timedelta(days=3660)

COLUMN_FIELDS = {"event.type", "user.email", "user.stage", "user.id", "user.created_at"}
JSON_ROOTS = ("event.data", "user.attributes")
TIMESTAMP_FIELDS = {"user.created_at"}
COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "starts_with",
               "exists", "within_last", "older_than")
ORDERING = {"gt", "gte", "lt", "lte"}
TIME_OPS = {"within_last", "older_than"}

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DURATION_RE = re.compile(r"^(\d{1,6})([smhdw])$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# The ISO-8601 forms both back ends read as timestamps (a date, or date and time,
# optionally with seconds, fractions and a Z / ±HH:MM offset; no offset means UTC).
TIMESTAMP_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?$"
)
TIMESTAMP_RE_SQL = (
    r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?$"
)

Scalar = str | int | float | bool


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
    """'30m', '12h', '7d', '2w' → timedelta (also used by trigger cooldowns and TTLs)."""
    if not isinstance(text, str) or not (m := _DURATION_RE.match(text)):
        raise ConditionError(path, f"expected a duration like '30m', '12h', '7d', got {text!r}")
    delta = dt.timedelta(**{_DURATION_UNITS[m.group(2)]: int(m.group(1))})
    if delta > MAX_DURATION:
        raise ConditionError(path, "duration longer than 10 years")
    return delta


def parse_timestamp(value: Any) -> dt.datetime | None:
    """An ISO-8601 string in the accepted forms → aware datetime (naive = UTC), else None."""
    if not isinstance(value, str) or not TIMESTAMP_RE.match(value):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:  # e.g. 2026-02-31
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(value: Any, path: str) -> Scalar:
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ConditionError(path, f"string longer than {MAX_STRING} characters")
        if "\x00" in value:
            raise ConditionError(path, "string contains a NUL character")
        return value
    if isinstance(value, bool) or is_number(value):
        if isinstance(value, float) and (value != value or abs(value) == float("inf")):
            raise ConditionError(path, "numbers must be finite")
        return value
    raise ConditionError(path, f"expected a string, number or boolean, got {type(value).__name__}")


def _field(name: Any, path: str) -> Field:
    if not isinstance(name, str):
        raise ConditionError(path, "field must be a string")
    if name in COLUMN_FIELDS:
        return Field(name)
    for root in JSON_ROOTS:
        if name.startswith(root + "."):
            keys = tuple(name[len(root) + 1:].split("."))
            if len(keys) > 8 or not all(_SEGMENT_RE.match(k) for k in keys):
                raise ConditionError(path, f"bad key path in {name!r} (keys: letters, digits, _ -)")
            return Field(root, keys)
    raise ConditionError(
        path, f"unknown field {name!r} (expected one of {sorted(COLUMN_FIELDS)} or "
              "event.data.<key> / user.attributes.<key>)")


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, allow_event: bool) -> None:
        self.allow_event = allow_event
        self.nodes = 0

    def node(self, obj: Any, path: str, depth: int) -> Node:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ConditionError(path, f"more than {MAX_NODES} conditions")
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
            return Compare(field, op, tuple(_scalar(v, f"{vpath}/{i}") for i, v in enumerate(raw)))
        value = _scalar(raw, vpath)
        if op in ORDERING and isinstance(value, bool):
            raise ConditionError(vpath, f"{op} compares numbers or strings, not booleans")
        if op == "starts_with" and not isinstance(value, str):
            raise ConditionError(vpath, "starts_with needs a string")
        if not field.is_json and not isinstance(value, str):
            raise ConditionError(vpath, f"{field.root} is a string field")
        return Compare(field, op, value)


def parse(obj: Any, *, allow_event: bool = True) -> Node:
    """Parse a JSON condition; `allow_event=False` for segments (no event in scope)."""
    return _Parser(allow_event).node(obj, "", 0)


def segment_refs(node: Node) -> frozenset[str]:
    """Every segment a condition mentions, for prefetching memberships."""
    if isinstance(node, InSegment):
        return frozenset({node.ref})
    if isinstance(node, (All, AnyOf)):
        return frozenset().union(*(segment_refs(c) for c in node.children))
    if isinstance(node, Not):
        return segment_refs(node.child)
    return frozenset()
