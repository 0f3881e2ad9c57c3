"""Holdout assignment: sticky, evenly spread, independent per salt, and the same in SQL."""

from __future__ import annotations

import math
import random
import uuid

import pytest
from sqlalchemy import Engine, text

from workers.sends.holdout import BUCKETS, bucket, bucket_sql, holdout_sql, in_holdout, threshold

USER = uuid.UUID("12345678-9abc-4def-8123-456789abcdef")
SALTS = ["holdout", "2026-h2", "it's", 'say "hi"', "a:b", "ünïcødé ✓ 控制组 🎲", "\\x' OR 1=1 --"]


def uuids(count: int, seed: int) -> list[uuid.UUID]:
    rng = random.Random(seed)
    return [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(count)]


def test_bucket_is_a_known_constant() -> None:
    # md5("holdout:12345678-9abc-4def-8123-456789abcdef") starts 639d6540 = 1671259456:
    # the same on every worker and under any PYTHONHASHSEED (hash() would not be).
    assert bucket("holdout", USER) == 1671259456 % BUCKETS == 9456
    assert bucket("2026-h2", uuid.UUID(int=0)) == 9973


def test_a_user_id_string_is_the_uuid() -> None:
    assert bucket("holdout", str(USER)) == bucket("holdout", str(USER).upper()) == 9456
    assert bucket("holdout", USER.hex) == 9456
    with pytest.raises(ValueError):
        bucket("holdout", "not-a-uuid")


def test_sticky() -> None:
    for user in uuids(200, seed=1):
        answers = {in_holdout("s", user, 7.5) for _ in range(5)}
        assert len(answers) == 1


@pytest.mark.parametrize("percent", [1, 5, 10, 33.3, 50])
def test_spread_within_four_sigma(percent: float) -> None:
    users = uuids(10_000, seed=2)
    held = sum(in_holdout("holdout", user, percent) for user in users)
    p = percent / 100
    assert abs(held - len(users) * p) <= 4 * math.sqrt(len(users) * p * (1 - p))


def test_zero_and_hundred_percent() -> None:
    users = uuids(2_000, seed=3)
    assert not any(in_holdout("holdout", user, 0) for user in users)
    assert all(in_holdout("holdout", user, 100) for user in users)


@pytest.mark.parametrize("percent", [-0.1, 100.5, math.nan, math.inf])
def test_percent_out_of_range(percent: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 100"):
        in_holdout("holdout", USER, percent)


def test_salts_draw_independent_groups() -> None:
    users = uuids(10_000, seed=4)
    first = {user for user in users if in_holdout("2026-h1", user, 10)}
    second = {user for user in users if in_holdout("2026-h2", user, 10)}
    both = len(first & second)
    # Independent 10% groups share 1% of users: 100 expected, sigma about 10.
    expected = len(users) * 0.01
    assert abs(both - expected) <= 4 * math.sqrt(expected * 0.99)


def test_sql_names_are_checked() -> None:
    with pytest.raises(ValueError, match="column"):
        bucket_sql("user_id; DROP TABLE users", "salt")
    with pytest.raises(ValueError, match="bind parameter"):
        bucket_sql("user_id", ":salt")
    with pytest.raises(ValueError, match="bind parameter"):
        holdout_sql("e.user_id", "salt", "percent)")


PERCENTS = [0, 0.005, 0.015, 0.025, 0.5, 1.5, 5, 12.345, 33.33, 50, 99.99, 100]


@pytest.mark.servers
def test_sql_agrees_with_python(engine: Engine) -> None:
    users = uuids(2_000, seed=5)
    with engine.connect() as conn:
        for salt in SALTS:
            rows = conn.execute(
                text(f"SELECT u, {bucket_sql('t.u', 'salt')} FROM unnest(CAST(:ids AS uuid[])) "
                     "AS t(u)"), {"ids": users, "salt": salt}).all()
            assert len(rows) == len(users)
            assert {u: b for u, b in rows} == {u: bucket(salt, u) for u in users}, salt
            # Buckets from the upper half of the 32-bit range are where a signed cast would
            # go negative: there are some, and SQL agrees on them.
            assert min(b for _, b in rows) >= 0
        for percent in PERCENTS:
            held = set(conn.execute(
                text(f"SELECT t.u FROM unnest(CAST(:ids AS uuid[])) AS t(u) "
                     f"WHERE {holdout_sql('t.u', 'salt', 'percent')}"),
                {"ids": users, "salt": "holdout", "percent": percent}).scalars())
            assert held == {u for u in users if in_holdout("holdout", u, percent)}, percent
            sql_threshold = conn.execute(
                text("SELECT round(CAST(:p AS double precision) * 10000 / 100)"),
                {"p": percent}).scalar_one()
            assert sql_threshold == threshold(percent), percent
        high = conn.execute(text("SELECT ('x' || 'ffffffff')::bit(32)::bigint")).scalar_one()
        assert high == 2**32 - 1
