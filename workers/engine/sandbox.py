"""The restricted expression language of BPMN scripts and conditions.

No arbitrary code from definitions (docs/architecture.md, decision 8).

SpiffWorkflow's default script engine hands every expression to Python's
`eval`/`exec`. Nothing here does: sources are parsed with `ast` and walked by a
small interpreter that knows only a whitelist, so there is no path to imports,
dunder attributes, files or sockets, and every run is bounded.

Expressions: literals, variables, arithmetic (+ - * / // % **), comparisons
(== != < <= > >= in, not in, is None), and/or/not, `a if c else b`, subscripts and
slices, list/tuple/dict/set displays, f-strings without format specs, `%` formatting,
calls of the functions below and of a few methods on str/dict/list/datetime/timedelta.
Scripts add: assignment (names and subscripts, augmented too), if/elif/else,
`for` over a sequence (with break/continue), expression statements and pass.
No while, def, lambda, class, import, comprehension, global, with, try, del.

Functions: len min max sum abs round int float str bool sorted any all range list
dict set, and for lifecycle work now() (aware UTC), days(n) hours(n) minutes(n)
seconds(n) (timedelta), parse_datetime(s) (ISO 8601). Only len abs bool int float
may be passed as values (`sorted(xs, key=len)`); the others can only be called.

Limits: source 20,000 characters, 5,000 syntax nodes, nesting 60, 200,000 steps and
1 s of wall clock per run, integers of 512 bits, strings and sequences of 100,000
items, 1,000,000 items and characters built per run (memory), 1,000,000 items
looked at by one comparison, hash, sort or sum, values nested 100 deep, no value
that contains itself. Sizes are checked before a builtin builds its result (`str`,
f-strings, `%`, `join`, `replace`, `sum`, `sorted`, `*`, `+`), since a builtin
running in C cannot be stopped; the wall clock also interrupts the run itself
(SIGALRM, in a process's main thread). A script must leave only storable
variables: JSON values, dates and durations, 1,000,000 items and characters in all.
Exceeding one raises SandboxError, as does any error at run time.
"""

from __future__ import annotations

import ast
import copy
import datetime as dt
import functools
import math
import operator
import re
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from workers.engine.values import (
    CONTAINERS,
    MAX_STORED,
    Refused,
    TooLarge,
    check_storable,
    measure,
    reaches,
)

MAX_SOURCE = 20_000
MAX_NODES = 5_000
MAX_DEPTH = 60
MAX_STEPS = 200_000
MAX_SECONDS = 1.0
MAX_INT_BITS = 512
MAX_LEN = 100_000
MAX_BUILT = 1_000_000
MAX_INSPECTED = 1_000_000


class SandboxError(Exception):
    """The source is not allowed, or failed while running; the message says why and where."""


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


def _parse_datetime(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_LEN:
        raise SandboxError(f"range of {len(r)} items is longer than {MAX_LEN}")
    return r


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": len, "min": min, "max": max, "sum": sum, "abs": abs, "round": round,
    "int": int, "float": float, "str": str, "bool": bool, "sorted": sorted, "any": any,
    "all": all, "range": _range, "list": list, "dict": dict, "set": set,
    "now": lambda: dt.datetime.now(dt.UTC),
    "days": lambda n: dt.timedelta(days=n), "hours": lambda n: dt.timedelta(hours=n),
    "minutes": lambda n: dt.timedelta(minutes=n), "seconds": lambda n: dt.timedelta(seconds=n),
    "parse_datetime": _parse_datetime,
}
# Cheap on any argument, so a builtin may call them (sorted(xs, key=len)); `str` or
# `sum` passed as a key would run once per item, past every size check.
VALUE_FUNCTIONS = frozenset({"len", "abs", "bool", "int", "float"})
# Functions that return one of their arguments (or its items) rather than a new value.
_PICKERS = frozenset({"min", "max"})
# Functions that compare, hash or sort their arguments' items.
_INSPECTING = frozenset({"min", "max", "sorted", "set", "dict", "sum"})

METHODS: dict[type, frozenset[str]] = {
    str: frozenset({"lower", "upper", "strip", "lstrip", "rstrip", "startswith", "endswith",
                    "replace", "split", "join", "title", "capitalize", "count", "find",
                    "isdigit", "isalpha"}),
    dict: frozenset({"get", "keys", "values", "items"}),
    list: frozenset({"append", "extend", "pop", "index", "count"}),
    dt.datetime: frozenset({"isoformat", "weekday", "date"}),
    dt.date: frozenset({"isoformat", "weekday"}),
    dt.timedelta: frozenset({"total_seconds"}),
}
ATTRIBUTES: dict[type, frozenset[str]] = {
    dt.datetime: frozenset({"year", "month", "day", "hour", "minute", "second"}),
    dt.date: frozenset({"year", "month", "day"}),
    dt.timedelta: frozenset({"days", "seconds"}),
}

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
_UNARY: dict[type, Callable[[Any], Any]] = {
    ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_,
}
_CONVERSIONS: dict[int, Callable[[Any], str]] = {-1: str, ord("s"): str, ord("r"): repr,
                                                 ord("a"): ascii}
_SIZED = (str, list, tuple, dict, set, bytes)
# %-format directives: `*` widths and widths or precisions past MAX_LEN build huge text.
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")

_EXPRESSION_NODES: tuple[type, ...] = (
    ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Store, ast.BinOp, ast.UnaryOp,
    ast.BoolOp, ast.And, ast.Or, ast.Compare, ast.IfExp, ast.Subscript, ast.Slice, ast.List,
    ast.Tuple, ast.Dict, ast.Set, ast.Call, ast.keyword, ast.Attribute, ast.JoinedStr,
    ast.FormattedValue, *_BINARY, *_COMPARE, *_UNARY,
)
_STATEMENT_NODES: tuple[type, ...] = (
    ast.Module, ast.Assign, ast.AugAssign, ast.If, ast.For, ast.Pass, ast.Break, ast.Continue,
    ast.Expr,
)


def _where(node: ast.AST) -> str:
    line = getattr(node, "lineno", None)
    return f" (line {line}, column {getattr(node, 'col_offset', 0) + 1})" if line else ""


def _assigned_names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def check(source: str, mode: Literal["eval", "exec"] = "eval") -> ast.AST:
    """Parse and validate statically; returns the tree. Raises SandboxError.

    A workflow runs the same few scripts and conditions on every step, so checked
    trees are cached per source (they are only read afterwards, never changed).
    """
    if not isinstance(source, str):
        raise SandboxError("source must be text")
    if len(source) > MAX_SOURCE:
        raise SandboxError(f"source longer than {MAX_SOURCE} characters")
    return _checked(source, mode)


@functools.lru_cache(maxsize=2048)
def _checked(source: str, mode: Literal["eval", "exec"]) -> ast.AST:
    try:
        tree = ast.parse(source, mode=mode)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise SandboxError(f"not valid syntax: {exc}") from None
    allowed = _EXPRESSION_NODES + (_STATEMENT_NODES if mode == "exec" else ())
    assigned: set[str] = set()  # the source's own variables: they shadow function names
    typed: list[ast.Subscript] = []  # list[int] and the like, unless `list` is a variable
    count = 0

    def visit(node: ast.AST, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise SandboxError(f"more than {MAX_NODES} syntax nodes")
        if depth > MAX_DEPTH:
            raise SandboxError(f"nested deeper than {MAX_DEPTH}{_where(node)}")
        if not isinstance(node, allowed):
            hint = _INSTEAD.get(type(node).__name__, "")
            raise SandboxError(f"{type(node).__name__} is not allowed{_where(node)}"
                               + (f": {hint}" if hint else ""))
        if isinstance(node, ast.Name):
            if node.id.startswith("_"):
                raise SandboxError(f"name {node.id!r} is not allowed{_where(node)}")
            if isinstance(node.ctx, ast.Store):
                assigned.add(node.id)
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                raise SandboxError(f"attribute {node.attr!r} is not allowed{_where(node)}")
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, (ast.Name, ast.Attribute)):
                raise SandboxError(f"only named functions and methods can be called{_where(node)}")
            if isinstance(node.func, ast.Name) and node.func.id not in FUNCTIONS:
                raise SandboxError(f"unknown function {node.func.id!r}{_where(node)}")
            if any(isinstance(a, ast.Starred) for a in node.args) or any(
                    k.arg is None for k in node.keywords):
                raise SandboxError(f"* and ** arguments are not allowed{_where(node)}")
        elif isinstance(node, ast.Subscript):
            if isinstance(node.value, ast.Name) and node.value.id in FUNCTIONS:
                typed.append(node)
        elif isinstance(node, ast.FormattedValue) and node.format_spec is not None:
            raise SandboxError(f"format specs in f-strings are not allowed{_where(node)}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.For)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                if not all(isinstance(e, (ast.Name, ast.Subscript)) for e in elements):
                    raise SandboxError(f"can only assign to names and subscripts{_where(node)}")
        elif isinstance(node, ast.For) and node.orelse:
            raise SandboxError(f"for ... else is not allowed{_where(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, depth + 1)

    visit(tree, 0)
    for node in typed:
        if node.value.id not in assigned:  # type: ignore[attr-defined]
            raise SandboxError(f"{node.value.id}[...] is a type or a function, "  # type: ignore[attr-defined]
                               f"not a value{_where(node)}")
    _fold_constants(tree, source)
    if isinstance(tree, ast.Module):
        _refuse_unstorable_variables(tree, assigned)
    return tree


def never_storable(node: ast.expr, assigned: Collection[str] = ()) -> str | None:
    """What an expression always evaluates to when no execution can store that, else None.

    `assigned` are the source's own variable names (they shadow function names).
    """
    if isinstance(node, ast.Set):
        return "a set (store a list instead)"
    if isinstance(node, ast.Constant) and (
            isinstance(node.value, (bytes, complex))
            or (isinstance(node.value, float) and not math.isfinite(node.value))):
        return f"the value {node.value!r}"
    if isinstance(node, ast.Name) and node.id in FUNCTIONS and node.id not in assigned:
        return f"the function {node.id}"
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name) and node.func.id in ("range", "set"):
            return f"a {node.func.id} (store list(...) of it instead)"
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("keys", "values", "items"):
            return f"a dict_{node.func.attr} view (store list(...) of it instead)"
    return None


def _refuse_unstorable_variables(module: ast.Module, assigned: set[str]) -> None:
    """A variable whose last assignment, at the script's top level, can never be stored.

    Names also assigned inside if/for bodies are left to the run-time check.
    """
    last: dict[str, ast.expr | None] = {}
    for statement in module.body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    last[target.id] = statement.value
                else:
                    last.update(dict.fromkeys(_assigned_names(target)))
        elif isinstance(statement, (ast.AugAssign, ast.If, ast.For)):
            last.update(dict.fromkeys(_assigned_names(statement)))
    for name, value in last.items():
        what = never_storable(value, assigned) if value is not None else None
        if what is not None:
            raise SandboxError(f"variable {name!r} is left holding {what}, which an execution "
                               f"cannot store{_where(value)}")  # type: ignore[arg-type]


_CONSTANT_ONLY = (ast.Constant, ast.BinOp, ast.UnaryOp, *_BINARY, *_UNARY)


# What to write instead of syntax the interpreter does not run, where there is a way.
_INSTEAD = {
    "ListComp": "build the list with a for loop and .append()",
    "SetComp": "build the list with a for loop and .append()",
    "DictComp": "build the dict with a for loop (d[k] = v)",
    "GeneratorExp": "build a list with a for loop and .append()",
    "Delete": "assign None, or build a new dict without the key",
    "While": "use a for loop over range(n), or a loop drawn with a gateway",
    "Lambda": "write the expression where it is used",
    "FunctionDef": "write the code inline; scripts cannot define functions",
    "Import": "scripts cannot import; the helpers now(), days(n), hours(n) and "
              "parse_datetime(s) are there without one",
    "ImportFrom": "scripts cannot import; the helpers now(), days(n), hours(n) and "
                  "parse_datetime(s) are there without one",
    "Try": "let the node fail (the execution records the error), or test the value first",
}


def _fold_constants(tree: ast.AST, source: str) -> None:
    """Evaluate arithmetic on literals at check time, so 9**9**9 is refused at deploy."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and all(isinstance(n, _CONSTANT_ONLY)
                                               for n in ast.walk(node)):
            _guard(source, functools.partial(_Interpreter({}).eval, node))


class _Interpreter:
    def __init__(self, variables: dict[str, Any]) -> None:
        self.vars = variables
        self.steps = 0
        self.built = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise SandboxError(f"more than {MAX_STEPS} steps")
        if self.steps % 1000 == 0 and time.monotonic() > self.deadline:
            raise SandboxError(f"ran longer than {MAX_SECONDS} s")

    @staticmethod
    def bounded(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and \
                value.bit_length() > MAX_INT_BITS:
            raise SandboxError(f"integer larger than {MAX_INT_BITS} bits")
        if isinstance(value, _SIZED) and len(value) > MAX_LEN:
            raise SandboxError(f"value longer than {MAX_LEN} items")
        return value

    def charge(self, units: int) -> None:
        """Count items and characters built: the run's memory bound."""
        self.built += units
        if self.built > MAX_BUILT:
            raise SandboxError(f"built more than {MAX_BUILT} items and characters")

    def new(self, value: Any) -> Any:
        """A value the run just built: bounded, and its size counted."""
        self.bounded(value)
        if isinstance(value, _SIZED):
            self.charge(len(value))
        return value

    @staticmethod
    def inspect(node: ast.AST, *values: Any) -> None:
        """Before a builtin compares, hashes or sorts values: their items, however shared."""
        for value in values:
            if type(value) in CONTAINERS:
                try:
                    measure(value, MAX_INSPECTED)
                except TooLarge:
                    raise SandboxError(f"a value of more than {MAX_INSPECTED} items (shared "
                                       f"ones counted each time) cannot be compared, hashed "
                                       f"or sorted{_where(node)}") from None

    @staticmethod
    def text_room(node: ast.AST, value: Any, room: int) -> None:
        """Before str()/repr() of a value: its text must fit in `room` characters."""
        if type(value) in CONTAINERS:
            try:
                measure(value, max(room, 0), text=True)
            except TooLarge:
                raise SandboxError(f"text longer than {MAX_LEN} characters{_where(node)}") \
                    from None

    # ------------------------------------------------------------------ expressions

    def eval(self, node: ast.AST) -> Any:  # noqa: C901 - one branch per node type
        self.tick()
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.vars:
                return self.vars[node.id]
            if node.id in VALUE_FUNCTIONS:
                return FUNCTIONS[node.id]
            if node.id in FUNCTIONS:
                raise SandboxError(f"function {node.id!r} can only be called{_where(node)}")
            raise SandboxError(f"name {node.id!r} is not defined{_where(node)}")
        if isinstance(node, ast.BinOp):
            left, right = self.eval(node.left), self.eval(node.right)
            self.precheck_binary(node.op, left, right, node)
            return self.new(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self.eval(node.operand))
        if isinstance(node, ast.BoolOp):
            result: Any = None
            for value in node.values:
                result = self.eval(value)
                if isinstance(node.op, ast.And) and not result:
                    return result
                if isinstance(node.op, ast.Or) and result:
                    return result
            return result
        if isinstance(node, ast.Compare):
            left = self.eval(node.left)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self.eval(comparator)
                if not isinstance(op, (ast.Is, ast.IsNot)):
                    self.inspect(node, left, right)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)
        if isinstance(node, ast.Subscript):
            container = self.subscriptable(self.eval(node.value), node)
            index = self.eval(node.slice)
            if isinstance(index, slice):
                return self.new(container[index])
            self.inspect(node, index)
            return container[index]
        if isinstance(node, ast.Slice):
            return slice(*(self.eval(p) if p is not None else None
                           for p in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.List):
            return self.new([self.eval(e) for e in node.elts])
        if isinstance(node, ast.Tuple):
            return self.new(tuple(self.eval(e) for e in node.elts))
        if isinstance(node, ast.Set):
            elements = [self.eval(e) for e in node.elts]
            self.inspect(node, *elements)
            return self.new(set(elements))
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise SandboxError(f"** in dict displays is not allowed{_where(node)}")
            pairs = [(self.eval(k), self.eval(v))  # type: ignore[arg-type]
                     for k, v in zip(node.keys, node.values, strict=True)]
            self.inspect(node, *(k for k, _ in pairs))
            return self.new(dict(pairs))
        if isinstance(node, ast.JoinedStr):
            return self.new(self.joined(node))
        if isinstance(node, ast.Attribute):
            target = self.eval(node.value)
            if node.attr not in ATTRIBUTES.get(type(target), frozenset()):
                raise SandboxError(f"attribute {node.attr!r} of {type(target).__name__} "
                                   f"is not allowed{_where(node)}")
            return getattr(target, node.attr)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise SandboxError(f"{type(node).__name__} is not allowed{_where(node)}")

    @staticmethod
    def subscriptable(container: Any, node: ast.AST) -> Any:
        if callable(container):  # list[int] is a type, not data
            raise SandboxError(f"a function cannot be subscripted{_where(node)}")
        return container

    def joined(self, node: ast.JoinedStr) -> str:
        parts: list[str] = []
        used = 0
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                item = self.eval(value.value)
                self.text_room(node, item, MAX_LEN - used)
                text = _CONVERSIONS.get(value.conversion, str)(item)
            elif isinstance(value, ast.Constant):
                text = str(value.value)
            else:
                continue
            used += len(text)
            if used > MAX_LEN:
                raise SandboxError(f"text longer than {MAX_LEN} characters{_where(node)}")
            parts.append(text)
        return "".join(parts)

    def precheck_binary(self, op: ast.operator, left: Any, right: Any, node: ast.AST) -> None:
        """Refuse results too large to compute before computing them (9**9**9, 'a'*10**9)."""
        if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int) \
                and right > 0 and abs(left) > 1:
            if right * math.log2(abs(left)) > MAX_INT_BITS:
                raise SandboxError(f"power too large{_where(node)}")
        elif isinstance(op, ast.Mult):
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                        and len(seq) * max(n, 0) > MAX_LEN:
                    raise SandboxError(f"repetition longer than {MAX_LEN}{_where(node)}")
        elif isinstance(op, ast.Add) and isinstance(left, (str, list, tuple)) \
                and isinstance(right, type(left)) and len(left) + len(right) > MAX_LEN:
            raise SandboxError(f"result longer than {MAX_LEN}{_where(node)}")
        elif isinstance(op, ast.Mod) and isinstance(left, str):
            for match in _PERCENT.finditer(left):
                for number in match.groups():
                    if number == "*" or (number is not None and int(number) > MAX_LEN):
                        raise SandboxError(f"% width or precision {number} is not "
                                           f"allowed{_where(node)}")
            self.text_room(node, right, MAX_LEN - len(left))

    def precheck_call(self, name: str, args: list[Any], kwargs: dict[str, Any],
                      node: ast.AST) -> None:
        """Size what a builtin is about to build or look at before it runs in C."""
        if name == "str" and args:
            self.text_room(node, args[0], MAX_LEN)
        elif name == "round":
            digits = args[1] if len(args) > 1 else kwargs.get("ndigits")
            if isinstance(digits, int) and digits < -MAX_INT_BITS:
                raise SandboxError(f"round() to {digits} digits is not allowed{_where(node)}")
        if name in _INSPECTING:
            self.inspect(node, *args, *kwargs.values())
        if name == "sum" and args:
            self.precheck_sum(args[0], args[1] if len(args) > 1 else kwargs.get("start", 0),
                              node)

    def precheck_sum(self, items: Any, start: Any, node: ast.AST) -> None:
        """sum() of lists or tuples copies the growing result once per item: quadratic."""
        if not isinstance(start, (list, tuple)) or type(items) not in CONTAINERS:
            return
        length, copied = len(start), 0
        for item in items:
            length += len(item) if isinstance(item, (list, tuple)) else 0
            copied += length
            if length > MAX_LEN or copied > MAX_INSPECTED:
                raise SandboxError(f"sum() would copy more than {MAX_INSPECTED} items or "
                                   f"build more than {MAX_LEN}; extend a list in a loop "
                                   f"instead{_where(node)}")

    def precheck_method(self, target: Any, name: str, args: list[Any], node: ast.AST) -> None:
        """Methods that build text or store into a container, sized or checked first."""
        size = 0
        if isinstance(target, str) and name == "replace" and len(args) >= 2 \
                and isinstance(args[0], str) and isinstance(args[1], str):
            size = len(target) + target.count(args[0]) * len(args[1])
        elif isinstance(target, str) and name == "join" and args:
            items = args[0]
            if isinstance(items, str):
                size = len(items) * (len(target) + 1)
            elif type(items) in CONTAINERS and set(map(type, items)) <= {str}:
                size = sum(map(len, items)) + len(target) * max(len(items) - 1, 0)
        elif isinstance(target, list) and name in ("append", "extend") and args:
            for item in (args[0] if name == "extend" and type(args[0]) in CONTAINERS
                         else args[:1]):
                self.refuse_cycle(target, item, node)
        elif name in ("index", "count", "get"):
            self.inspect(node, target if isinstance(target, list) else None, *args)
        if size > MAX_LEN:
            raise SandboxError(f"result longer than {MAX_LEN}{_where(node)}")

    @staticmethod
    def refuse_cycle(container: Any, value: Any, node: ast.AST) -> None:
        if type(value) in CONTAINERS and reaches(value, container):
            raise SandboxError(f"a value cannot contain itself{_where(node)}")

    def call(self, node: ast.Call) -> Any:
        args = [self.eval(a) for a in node.args]
        kwargs = {k.arg: self.eval(k.value) for k in node.keywords if k.arg}
        if isinstance(node.func, ast.Name):
            name = node.func.id
            self.precheck_call(name, args, kwargs, node)
            result = FUNCTIONS[name](*args, **kwargs)
            return self.bounded(result) if name in _PICKERS else self.new(result)
        assert isinstance(node.func, ast.Attribute)
        target = self.eval(node.func.value)
        if node.func.attr not in METHODS.get(type(target), frozenset()):
            raise SandboxError(f"method {node.func.attr!r} of {type(target).__name__} "
                               f"is not allowed{_where(node)}")
        self.precheck_method(target, node.func.attr, args, node)
        before = len(target) if isinstance(target, list) else 0
        result = getattr(target, node.func.attr)(*args, **kwargs)
        if isinstance(target, list):  # append / extend must not grow past the bounds
            self.bounded(target)
            self.charge(max(len(target) - before, 0))
        return self.new(result) if isinstance(target, str) else self.bounded(result)

    # ------------------------------------------------------------------ statements

    def run(self, statements: list[ast.stmt]) -> None:
        for statement in statements:
            self.tick()
            if isinstance(statement, ast.Assign):
                value = self.eval(statement.value)
                for target in statement.targets:
                    self.assign(target, value)
            elif isinstance(statement, ast.AugAssign):
                current = self.eval(_as_load(statement.target))
                value = self.eval(statement.value)
                self.precheck_binary(statement.op, current, value, statement)
                self.assign(statement.target, self.new(_BINARY[type(statement.op)](current,
                                                                                   value)))
            elif isinstance(statement, ast.If):
                self.run(statement.body if self.eval(statement.test) else statement.orelse)
            elif isinstance(statement, ast.For):
                for item in self.new(list(self.eval(statement.iter))):
                    self.assign(statement.target, item)
                    try:
                        self.run(statement.body)
                    except _Break:
                        break
                    except _Continue:
                        continue
            elif isinstance(statement, ast.Expr):
                self.eval(statement.value)
            elif isinstance(statement, ast.Break):
                raise _Break
            elif isinstance(statement, ast.Continue):
                raise _Continue

    def assign(self, target: ast.AST, value: Any) -> None:
        if isinstance(target, ast.Name):
            self.vars[target.id] = value
        elif isinstance(target, ast.Subscript):
            container = self.subscriptable(self.eval(target.value), target)
            index = self.eval(target.slice)
            self.inspect(target, index)
            self.refuse_cycle(container, value, target)
            container[index] = value
            self.bounded(container)
            self.charge(1)
        elif isinstance(target, ast.Tuple):
            values = self.new(list(value))
            if len(values) != len(target.elts):
                raise SandboxError(f"cannot unpack {len(values)} values into "
                                   f"{len(target.elts)}{_where(target)}")
            for element, item in zip(target.elts, values, strict=True):
                self.assign(element, item)


def _as_load(target: ast.expr) -> ast.expr:
    return ast.Subscript(value=target.value, slice=target.slice, ctx=ast.Load()) \
        if isinstance(target, ast.Subscript) else ast.Name(id=target.id, ctx=ast.Load())  # type: ignore[attr-defined]


@contextmanager
def _wall_clock(seconds: float) -> Iterator[None]:
    """Interrupt the run after `seconds` with SIGALRM, even inside a long Python-level step.

    Signals reach only a process's main thread (where a Celery prefork pool process
    runs its tasks); elsewhere, or when another ITIMER_REAL would fire first, the
    interpreter's own clock check is the limit. A later timer (a test's timeout, say)
    is put back with its remaining time.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    other, other_interval = signal.getitimer(signal.ITIMER_REAL)
    if 0 < other <= seconds:
        yield
        return
    armed = True

    def on_alarm(signum: int, frame: Any) -> None:
        if armed:
            raise SandboxError(f"ran longer than {MAX_SECONDS} s")

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            armed = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if other > 0:
                left = other - (time.monotonic() - started)
                signal.setitimer(signal.ITIMER_REAL, max(left, 0.001), other_interval)


def _guard(source: str, run: Callable[[], Any]) -> Any:
    try:
        with _wall_clock(MAX_SECONDS):
            return run()
    except SandboxError:
        raise
    except Refused as exc:
        raise SandboxError(str(exc)) from None
    except (_Break, _Continue):
        raise SandboxError("break or continue outside a loop") from None
    except RecursionError:
        raise SandboxError("nested too deeply") from None
    except Exception as exc:  # every other failure is the script's, reported as such
        raise SandboxError(f"{type(exc).__name__}: {exc} in {source[:200]!r}") from None


def evaluate(expression: str, variables: Mapping[str, Any]) -> Any:
    """Evaluate an expression against variables (which it cannot change)."""
    tree = check(expression, "eval")
    # A copy, so a condition cannot change the data it reads (e.g. with list.append).
    return _guard(expression, lambda: _Interpreter(copy.deepcopy(dict(variables))).eval(tree))


def execute(script: str, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Run a script; returns the variables as the script left them, all storable."""
    tree = check(script, "exec")
    assert isinstance(tree, ast.Module)
    interpreter = _Interpreter(dict(variables))

    def run() -> None:
        interpreter.run(tree.body)
        _refuse_unstorable(interpreter.vars)

    _guard(script, run)
    return interpreter.vars


def _refuse_unstorable(variables: Mapping[str, Any]) -> None:
    """What a script leaves is saved with the execution: refuse here what cannot be."""
    stored = 0
    for name, value in variables.items():
        stored += check_storable(f"variable {name!r}", value)
        if stored > MAX_STORED:
            raise SandboxError(f"the variables are larger than {MAX_STORED} items and "
                               "characters written out, more than an execution can store")
