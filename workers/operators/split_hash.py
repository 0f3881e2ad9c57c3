"""Sticky A/B assignment: which branch of a split a user takes, from a hash alone.

A user's bucket (0..9999) is the holdout's md5 bucket (workers/sends/holdout.py) with
the salt `split:<workflow name>:<node id>`, so every worker, restart and re-entry of
the same user computes the same branch from the same three strings, and two splits
(other node, other workflow) draw independent groups. The buckets are dealt out by
cumulative weight in the declared order: with {"control": 1, "treatment": 3} buckets
0..2499 are `control`, 2500..9999 `treatment`. The arithmetic is exact (fractions of
the weights as written: 0.1 is 1/10), so a boundary bucket is where the declaration
says, the same on every machine.

Validation lives here too (pure, no database), so the operator and a deploy-time
check give the same messages. A weight must give its variant at least one of the
10,000 buckets: a smaller share could never be drawn.
"""

from __future__ import annotations

import ast
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from workers.sends.holdout import BUCKETS, bucket

MIN_VARIANTS = 2
MAX_VARIANTS = 100
NAME_RULE = "an identifier: letters, digits and _, not starting with a digit, at most 64"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
EXAMPLE = '{"control": 50, "treatment": 50}'


class SplitError(ValueError):
    """A split's `variants` cannot be used; the message says which variant and why."""


@dataclass(frozen=True)
class Variants:
    """Validated variants in their declared order (the first is the baseline of the lift)."""

    names: tuple[str, ...]
    weights: tuple[Fraction, ...]

    def choose(self, bucket_: int) -> str:
        """The variant owning `bucket_`: the first whose cumulative share passes it."""
        if not 0 <= bucket_ < BUCKETS:
            raise ValueError(f"bucket must be 0..{BUCKETS - 1}, not {bucket_}")
        total = sum(self.weights)
        cumulative = Fraction(0)
        for name, weight in zip(self.names, self.weights, strict=True):
            cumulative += weight
            if bucket_ * total < cumulative * BUCKETS:
                return name
        return self.names[-1]  # unreachable: the last cumulative share is all buckets

    def shares(self) -> dict[str, float]:
        """{variant: its weight as a fraction of the total}."""
        total = sum(self.weights)
        return {n: float(w / total) for n, w in zip(self.names, self.weights, strict=True)}


def parse_variants(value: object) -> Variants:
    """`value` checked as a mapping of branch name to positive weight, in its order."""
    if not isinstance(value, Mapping):
        raise SplitError(f"variants must be a mapping of branch name to weight, like {EXAMPLE}; "
                         f"got {type(value).__name__}")
    if not MIN_VARIANTS <= len(value) <= MAX_VARIANTS:
        raise SplitError(f"variants needs {MIN_VARIANTS} to {MAX_VARIANTS} branches, got "
                         f"{len(value)}" + (f" ({', '.join(map(repr, value))})" if value else ""))
    names: list[str] = []
    weights: list[Fraction] = []
    for name, weight in value.items():
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise SplitError(f"variant name {name!r} is not {NAME_RULE}")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise SplitError(f"weight of variant {name!r} must be a positive number, got "
                             f"{weight!r} ({type(weight).__name__})")
        if not math.isfinite(weight) or weight <= 0:
            raise SplitError(f"weight of variant {name!r} must be a positive number, got {weight!r}")
        names.append(name)
        # A float as written (its shortest repr): 0.1 is 1/10, not the binary double's value.
        weights.append(Fraction(weight) if isinstance(weight, int) else Fraction(repr(weight)))
    total = sum(weights)
    for name, weight in zip(names, weights, strict=True):
        if weight * BUCKETS < total:
            raise SplitError(f"weight of variant {name!r} is {float(weight / total):.4%} of the "
                             f"total: each variant needs at least one bucket in {BUCKETS:,} "
                             f"({1 / BUCKETS:.2%})")
    return Variants(tuple(names), tuple(weights))


def split_bucket(user_id: uuid.UUID | str, workflow: str, node_id: str) -> int:
    """The user's bucket (0..9999) for the split `node_id` of the workflow named `workflow`."""
    return bucket(f"split:{workflow}:{node_id}", user_id)


def assign(user_id: uuid.UUID | str, workflow: str, node_id: str,
           variants: Mapping[str, Any] | Variants) -> str:
    """The branch the user takes at this split: the same on every worker and every re-entry."""
    checked = variants if isinstance(variants, Variants) else parse_variants(variants)
    return checked.choose(split_bucket(user_id, workflow, node_id))


def declared_names(expression: str) -> tuple[str, ...] | None:
    """The keys of a dict literal `expression`, in the order written; None if it is not one.

    Operator parameters are stored as jsonb, which does not keep key order; the
    operator reads the declared order back from the BPMN text with this.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None
    if not isinstance(tree.body, ast.Dict):
        return None
    names: list[str] = []
    for key in tree.body.keys:
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            return None  # a `**spread` (None) or a computed key: no written order
        names.append(key.value)
    return tuple(names)


def check_declaration(params: Mapping[str, Any]) -> None:
    """Deploy-time check of a split service task's parameters (the BPMN's expressions).

    `params` is the spec's `operation_params` ({name: {"value": expression, ...}}) or
    {name: expression}. A `variants` written as a literal is validated now; one
    computed from variables can only be checked when it runs (the operator does).
    """
    if "variants" not in params:
        raise SplitError(f"parameter 'variants' is required, like {EXAMPLE}")
    raw = params["variants"]
    expression = raw.get("value") if isinstance(raw, Mapping) else raw
    if not isinstance(expression, str):
        raise SplitError("parameter 'variants' must be an expression")
    try:
        value = ast.literal_eval(expression.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return  # not a literal: evaluated, and checked, at run time
    try:
        parse_variants(value)
    except SplitError as exc:
        raise SplitError(f"parameter 'variants': {exc}") from None
