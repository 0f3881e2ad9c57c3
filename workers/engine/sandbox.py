"""The restricted expression language of BPMN scripts and conditions (DESIGN decision 8).

SpiffWorkflow's default script engine hands every expression to Python's
`eval`/`exec`. Nothing here does: sources are parsed with `ast` and walked by a
small interpreter that knows only a whitelist, so there is no path to imports,
dunder attributes, files or sockets, and every run is bounded.

Expressions: literals, variables, arithmetic (+ - * / // % **), comparisons
(== != < <= > >= in, not in, is None), and/or/not, `a if c else b`, subscripts and
slices, list/tuple/dict/set displays, f-strings without format specs, calls of the
functions below and of a few methods on str/dict/list/datetime/timedelta.
Scripts add: assignment (names and subscripts, augmented too), if/elif/else,
`for` over a sequence (with break/continue), expression statements and pass.
No while, def, lambda, class, import, comprehension, global, with, try, del.

Functions: len min max sum abs round int float str bool sorted any all range list
dict set, and for lifecycle work now() (aware UTC), days(n) hours(n) minutes(n)
seconds(n) (timedelta), parse_datetime(s) (ISO 8601).

Limits: source 20,000 characters, 5,000 AST nodes, nesting 60, 200,000 steps and
1 s of wall clock per run, integers of 512 bits, strings and sequences of 100,000
items. Exceeding one raises SandboxError, as does any error at run time.
"""

from __future__ import annotations

import ast
import copy
import datetime as dt
import math
import operator
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

MAX_SOURCE = 20_000
MAX_NODES = 5_000
MAX_DEPTH = 60
MAX_STEPS = 200_000
MAX_SECONDS = 1.0
MAX_INT_BITS = 512
MAX_LEN = 100_000


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


def check(source: str, mode: Literal["eval", "exec"] = "eval") -> ast.AST:
    """Parse and validate statically; returns the tree. Raises SandboxError."""
    if not isinstance(source, str):
        raise SandboxError("source must be text")
    if len(source) > MAX_SOURCE:
        raise SandboxError(f"source longer than {MAX_SOURCE} characters")
    try:
        tree = ast.parse(source, mode=mode)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise SandboxError(f"not valid syntax: {exc}") from None
    allowed = _EXPRESSION_NODES + (_STATEMENT_NODES if mode == "exec" else ())
    count = 0

    def visit(node: ast.AST, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise SandboxError(f"more than {MAX_NODES} syntax nodes")
        if depth > MAX_DEPTH:
            raise SandboxError(f"nested deeper than {MAX_DEPTH}{_where(node)}")
        if not isinstance(node, allowed):
            raise SandboxError(f"{type(node).__name__} is not allowed{_where(node)}")
        if isinstance(node, ast.Name):
            if node.id.startswith("_"):
                raise SandboxError(f"name {node.id!r} is not allowed{_where(node)}")
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
    _fold_constants(tree, source)
    return tree


_CONSTANT_ONLY = (ast.Constant, ast.BinOp, ast.UnaryOp, *_BINARY, *_UNARY)


def _fold_constants(tree: ast.AST, source: str) -> None:
    """Evaluate arithmetic on literals at check time, so 9**9**9 is refused at deploy."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and all(isinstance(n, _CONSTANT_ONLY)
                                               for n in ast.walk(node)):
            _guard(source, lambda n=node: _Interpreter({}).eval(n))


class _Interpreter:
    def __init__(self, variables: dict[str, Any]) -> None:
        self.vars = variables
        self.steps = 0
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
        if isinstance(value, (str, list, tuple, dict, set, bytes)) and len(value) > MAX_LEN:
            raise SandboxError(f"value longer than {MAX_LEN} items")
        return value

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
            if node.id in FUNCTIONS:
                return FUNCTIONS[node.id]
            raise SandboxError(f"name {node.id!r} is not defined{_where(node)}")
        if isinstance(node, ast.BinOp):
            left, right = self.eval(node.left), self.eval(node.right)
            self.precheck_binary(node.op, left, right, node)
            return self.bounded(_BINARY[type(node.op)](left, right))
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
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)
        if isinstance(node, ast.Subscript):
            return self.eval(node.value)[self.eval(node.slice)]
        if isinstance(node, ast.Slice):
            return slice(*(self.eval(p) if p is not None else None
                           for p in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.List):
            return self.bounded([self.eval(e) for e in node.elts])
        if isinstance(node, ast.Tuple):
            return self.bounded(tuple(self.eval(e) for e in node.elts))
        if isinstance(node, ast.Set):
            return self.bounded({self.eval(e) for e in node.elts})
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise SandboxError(f"** in dict displays is not allowed{_where(node)}")
            return self.bounded({self.eval(k): self.eval(v)  # type: ignore[arg-type]
                                 for k, v in zip(node.keys, node.values, strict=True)})
        if isinstance(node, ast.JoinedStr):
            return self.bounded("".join(
                str(self.eval(v.value)) if isinstance(v, ast.FormattedValue) else str(v.value)
                for v in node.values if isinstance(v, (ast.FormattedValue, ast.Constant))))
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
    def precheck_binary(op: ast.operator, left: Any, right: Any, node: ast.AST) -> None:
        """Refuse results too large to compute before computing them (9**9**9, 'a'*10**9)."""
        if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int) \
                and right > 0 and abs(left) > 1:
            if right * math.log2(abs(left)) > MAX_INT_BITS:
                raise SandboxError(f"power too large{_where(node)}")
        if isinstance(op, ast.Mult):
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                        and len(seq) * max(n, 0) > MAX_LEN:
                    raise SandboxError(f"repetition longer than {MAX_LEN}{_where(node)}")

    @staticmethod
    def precheck_method(target: Any, name: str, args: list[Any], node: ast.AST) -> None:
        """str.replace and str.join can build huge strings in one call: size them first."""
        size = 0
        if isinstance(target, str) and name == "replace" and len(args) >= 2:
            size = len(target) + target.count(str(args[0])) * len(str(args[1]))
        elif isinstance(target, str) and name == "join" and args:
            items = list(args[0]) if not isinstance(args[0], (str, list, tuple)) else args[0]
            size = sum(len(str(i)) for i in items) + len(target) * len(items)
        if size > MAX_LEN:
            raise SandboxError(f"result longer than {MAX_LEN}{_where(node)}")

    def call(self, node: ast.Call) -> Any:
        args = [self.eval(a) for a in node.args]
        kwargs = {k.arg: self.eval(k.value) for k in node.keywords if k.arg}
        if isinstance(node.func, ast.Name):
            function = FUNCTIONS[node.func.id]
        else:
            assert isinstance(node.func, ast.Attribute)
            target = self.eval(node.func.value)
            if node.func.attr not in METHODS.get(type(target), frozenset()):
                raise SandboxError(f"method {node.func.attr!r} of {type(target).__name__} "
                                   f"is not allowed{_where(node)}")
            self.precheck_method(target, node.func.attr, args, node)
            function = getattr(target, node.func.attr)
            result = self.bounded(function(*args, **kwargs))
            self.bounded(target)  # list.append / extend must not grow past the bound
            return result
        return self.bounded(function(*args, **kwargs))

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
                self.assign(statement.target, self.bounded(_BINARY[type(statement.op)](current,
                                                                                      value)))
            elif isinstance(statement, ast.If):
                self.run(statement.body if self.eval(statement.test) else statement.orelse)
            elif isinstance(statement, ast.For):
                for item in list(self.eval(statement.iter)):
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
            container = self.eval(target.value)
            container[self.eval(target.slice)] = value
            self.bounded(container)
        elif isinstance(target, ast.Tuple):
            values = list(value)
            if len(values) != len(target.elts):
                raise SandboxError(f"cannot unpack {len(values)} values into "
                                   f"{len(target.elts)}{_where(target)}")
            for element, item in zip(target.elts, values, strict=True):
                self.assign(element, item)


def _as_load(target: ast.expr) -> ast.expr:
    return ast.Subscript(value=target.value, slice=target.slice, ctx=ast.Load()) \
        if isinstance(target, ast.Subscript) else ast.Name(id=target.id, ctx=ast.Load())  # type: ignore[attr-defined]


def _guard(source: str, run: Callable[[], Any]) -> Any:
    try:
        return run()
    except SandboxError:
        raise
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
    """Run a script; returns the variables as the script left them."""
    tree = check(script, "exec")
    assert isinstance(tree, ast.Module)
    interpreter = _Interpreter(dict(variables))
    _guard(script, lambda: interpreter.run(tree.body))
    return interpreter.vars
