"""How big a sandbox value is, and whether it can be stored: measured with a budget.

Builtins such as `str`, `==`, `sorted` and `json.dumps` run in C: once called they
cannot be interrupted, and they work on a value as written out, which can be far
larger than the value in memory (a list of 10,000 references to one 100 kB string
is 80 kB in memory and 1 GB as text). So the sandbox measures a value before it
hands it to such a builtin. A walk visits each container once (a shared one is
counted every time it appears, as `str()` or JSON would write it) and stops as soon
as the size passes its budget, so measuring never costs the written-out size.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable
from typing import Any

MAX_NESTING = 100  # containers inside containers; json and repr recurse in C
MAX_STORED = 1_000_000  # items and characters of the variables a script leaves

_VIEWS: tuple[type, ...] = (type({}.keys()), type({}.values()), type({}.items()))
CONTAINERS: frozenset[type] = frozenset({list, tuple, set, frozenset, dict, *_VIEWS})
_JSON_SCALARS = (str, int, float, bool, type(None))
# What SpiffWorkflow's serializer turns into JSON besides JSON's own types (workers.engine.state).
SERIALIZED: tuple[type, ...] = (dt.datetime, dt.date, dt.timedelta)
# jsonb refuses NUL; a lone surrogate cannot be encoded as UTF-8.
_REFUSED_CHARACTERS = re.compile("[\x00\ud800-\udfff]")


class Refused(ValueError):
    """The value is too large for the budget, contains itself, is nested too deeply,
    or cannot be stored; the message says which."""


class TooLarge(Refused):
    """The walk spent its budget before reaching the end of the value."""


def _children(value: Any) -> Iterable[Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield item
    else:
        yield from value


def measure(value: Any, limit: int, *, text: bool = False) -> int:
    """Items in `value` written out (with `text`, a lower bound on its `str()` length).

    Raises TooLarge past `limit`, Refused for a value that contains itself or is
    nested deeper than MAX_NESTING. A container shared by several others is walked
    once and its size counted each time it appears, as `str()` would write it.
    """
    done: dict[int, tuple[int, int]] = {}  # id -> (units, height) of containers walked
    on_path: set[int] = set()

    def visit(item: Any, depth: int) -> tuple[int, int]:
        kind = type(item)
        if kind not in CONTAINERS:
            return (len(item) + 2 if text and kind is str else 1), 0
        key = id(item)
        if key in done:
            units, height = done[key]
        elif key in on_path:
            raise Refused("a value that contains itself")
        elif depth >= MAX_NESTING:
            raise Refused(f"a value nested deeper than {MAX_NESTING}")
        else:
            units, height = walk(item, kind, depth)
            done[key] = units, height
        if depth + height > MAX_NESTING:
            raise Refused(f"a value nested deeper than {MAX_NESTING}")
        return units, height

    def walk(item: Any, kind: type, depth: int) -> tuple[int, int]:
        if kind is not dict:
            types = set(map(type, item))
            if types.isdisjoint(CONTAINERS):  # flat: sized in C, no walk
                units = 2 + len(item) * (3 if text else 1)
                if text and str in types:
                    units += sum(len(s) for s in item if type(s) is str)
                if units > limit:
                    raise TooLarge(f"larger than {limit}")
                return units, 1
        on_path.add(id(item))
        units, height = 2, 1
        for child in _children(item):
            child_units, child_height = visit(child, depth + 1)
            units += child_units
            height = max(height, child_height + 1)
            if units > limit:
                raise TooLarge(f"larger than {limit}")
        on_path.discard(id(item))
        return units, height

    return visit(value, 0)[0]


def reaches(value: Any, target: Any) -> bool:
    """Whether `target` (a container) is inside `value`: storing `value` in it would
    make it contain itself. Each container is visited once, however often it is shared."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if item is target:
            return True
        if type(item) in CONTAINERS and id(item) not in seen:
            seen.add(id(item))
            if type(item) is dict or not CONTAINERS.isdisjoint(map(type, item)):
                stack.extend(c for c in _children(item) if type(c) in CONTAINERS)
    return False


def _describe(value: Any) -> str:
    kind = type(value)
    if kind is float:
        return f"the number {value}, which JSON has no form for"
    if kind is str:
        return "text with a NUL character or a lone surrogate"
    if kind in (set, frozenset):
        return f"a {kind.__name__} (store a list instead)"
    if kind in _VIEWS:
        return f"a {kind.__name__} view (store list(...) of it instead)"
    if isinstance(value, (dt.date, dt.timedelta)):
        return f"a {kind.__name__} (store its isoformat() or total_seconds() instead)"
    if callable(value):
        return f"the function {getattr(value, '__name__', kind.__name__)}"
    return f"a {kind.__name__}"


def check_storable(label: str, value: Any, *, limit: int = MAX_STORED,
                   extra: tuple[type, ...] = SERIALIZED) -> int:
    """Refuse what the engine state cannot hold; returns the units the value used.

    Storable: JSON values (dicts with str/int/float/bool/None keys, lists, tuples,
    text without NUL or lone surrogates, finite numbers, booleans, None) and the
    `extra` types, nested at most MAX_NESTING deep, without cycles, at most
    `limit` items and characters written out. The error starts with `label`
    ("variable 'x'") and the path inside the value.
    """
    done: dict[int, tuple[int, int]] = {}  # id -> (units, height) of containers checked
    on_path: set[int] = set()
    path: list[Any] = []

    def refuse(what: str) -> Refused:
        where = "".join(f"[{key!r}]" for key in path)
        return Refused(f"{label}{where} holds {what}, which cannot be stored")

    def scalar(item: Any) -> int | None:
        """Units of a storable scalar; None if it is not one."""
        kind = type(item)
        if kind is str:
            return len(item) if _REFUSED_CHARACTERS.search(item) is None else None
        if kind is float:
            return 1 if math.isfinite(item) else None
        if kind not in CONTAINERS and isinstance(item, (*_JSON_SCALARS, *extra)):
            return 1
        return None

    def visit(item: Any) -> tuple[int, int]:
        if type(item) not in (list, tuple, dict):
            units = scalar(item)
            if units is None:
                raise refuse(_describe(item))
            return units, 0
        key = id(item)
        if key in done:
            units, height = done[key]
        elif key in on_path:
            raise refuse("a value that contains itself")
        elif len(path) >= MAX_NESTING:
            raise refuse(f"a value nested deeper than {MAX_NESTING}")
        else:
            on_path.add(key)
            units, height = walk(item)
            on_path.discard(key)
            done[key] = units, height
        if len(path) + height > MAX_NESTING:
            raise refuse(f"a value nested deeper than {MAX_NESTING}")
        return units, height

    def walk(item: Any) -> tuple[int, int]:
        units, height = 1, 1
        pairs = item.items() if type(item) is dict else enumerate(item)
        for index, child in pairs:
            path.append(index)
            if type(item) is dict:
                key_units = scalar(index) if type(index) in _JSON_SCALARS else None
                if key_units is None:
                    raise refuse(f"a key that is {_describe(index)}")
                units += key_units
            child_units, child_height = visit(child)
            path.pop()
            units += child_units
            height = max(height, child_height + 1)
            if units > limit:
                raise Refused(f"{label} is larger than {limit} items and characters written "
                              "out, more than an execution can store")
        return units, height

    return visit(value)[0]
