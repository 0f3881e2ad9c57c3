"""Holdout assignment: which users are in a control group, the same in Python and in SQL.

A user's bucket (0..9999) is a hash of a salt and the user id; a holdout of p percent
is the buckets below round(p * 100). Sticky without a table: every worker, restart
and report computes the same answer from the same two strings, so there is no
assignment row to create and no race between two workers creating it. A new salt
draws a new, independent group.

md5 because it is built into both Python (hashlib) and PostgreSQL (md5(text)), gives
the same bytes everywhere (unlike Python's hash(), which PYTHONHASHSEED changes) and
is stable across versions. It is used to spread users evenly, not for security: a
user who could choose their id could choose their group, which does not matter here.
The first 8 hex digits are read as an unsigned 32-bit number: in PostgreSQL
`('x' || h)::bit(32)::bigint` is unsigned (a bigint holds all 32 bits; it is the
`::int` cast that would go negative), which the SQL test checks on real values.
"""

from __future__ import annotations

import hashlib
import re
import uuid

BUCKETS = 10_000

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?")


def bucket(salt: str, user_id: uuid.UUID | str) -> int:
    """The user's bucket for this salt, 0 to BUCKETS - 1."""
    key = f"{salt}:{_canonical(user_id)}"
    return int(hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()[:8], 16) % BUCKETS


def in_holdout(salt: str, user_id: uuid.UUID | str, percent: float) -> bool:
    """Whether the user is held out of a `percent` (0..100) holdout: 0 never, 100 always."""
    return bucket(salt, user_id) < threshold(percent)


def threshold(percent: float) -> int:
    """The buckets held out, below this one. Rounded half to even, as PostgreSQL's round(float8)."""
    if not 0 <= percent <= 100:
        raise ValueError(f"holdout percent must be between 0 and 100, not {percent}")
    return round(percent * BUCKETS / 100)


def bucket_sql(user_column: str, salt_param: str) -> str:
    """SQL computing bucket(): `user_column` a uuid column ("e.user_id"), `salt_param` a bind name.

    The salt is bound (":salt_param"), never spliced in, so any text is safe. Both names
    are checked to be plain identifiers, so they cannot smuggle SQL either.
    """
    column, param = _column(user_column), _param(salt_param)
    return (f"((('x' || substr(md5(CAST(:{param} AS text) || ':' || {column}::text), 1, 8))"
            f"::bit(32)::bigint) % {BUCKETS})")


def holdout_sql(user_column: str, salt_param: str, percent_param: str) -> str:
    """A boolean SQL expression matching in_holdout(); the percent is a bind parameter too."""
    percent = _param(percent_param)
    return (f"({bucket_sql(user_column, salt_param)} < "
            f"round(CAST(:{percent} AS double precision) * {BUCKETS} / 100))")


def _canonical(user_id: uuid.UUID | str) -> str:
    """str() of the UUID, lowercase and hyphenated, as PostgreSQL's uuid::text writes it."""
    return str(user_id if isinstance(user_id, uuid.UUID) else uuid.UUID(user_id))


def _column(name: str) -> str:
    if _COLUMN.fullmatch(name) is None:
        raise ValueError(f"not a column name: {name!r}")
    return name


def _param(name: str) -> str:
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"not a bind parameter name: {name!r}")
    return name
