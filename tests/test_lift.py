"""Conversion lift: Newcombe's hybrid score interval against the paper's own figures."""

from __future__ import annotations

import dataclasses
import math

import pytest

from workers.reports.lift import Lift, lift, wilson

# Newcombe (1998), Statistics in Medicine 17:873-890, Table II, method 10 (score, no
# continuity correction): (a, m, b, n) -> the 95% interval of a/m - b/n.
NEWCOMBE_TABLE_II = [
    ((56, 70, 48, 80), (0.0524, 0.3339)),
    ((9, 10, 3, 10), (0.1705, 0.8090)),
    ((5, 56, 0, 29), (-0.0381, 0.1926)),
    ((0, 10, 0, 20), (-0.1611, 0.2775)),
    ((0, 10, 0, 10), (-0.2775, 0.2775)),
    ((10, 10, 0, 20), (0.6791, 1.0000)),
    ((10, 10, 0, 10), (0.6075, 1.0000)),
]


@pytest.mark.parametrize(("counts", "interval"), NEWCOMBE_TABLE_II)
def test_newcombe_table(counts: tuple[int, int, int, int], interval: tuple[float, float]) -> None:
    a, m, b, n = counts
    result = lift(m, a, n, b)
    assert result.difference == pytest.approx(a / m - b / n)
    assert result.low == pytest.approx(interval[0], abs=5e-5)
    assert result.high == pytest.approx(interval[1], abs=5e-5)


def test_worked_example() -> None:
    # 56/70 vs 48/80: rates 0.8 and 0.6, Wilson intervals 0.6918-0.8770 and 0.4905-0.7004;
    # low = 0.2 - sqrt((0.8 - 0.6918)^2 + (0.7004 - 0.6)^2), high alike with the other ends.
    low1, high1 = wilson(56, 70, 1.959964)
    low2, high2 = wilson(48, 80, 1.959964)
    assert (low1, high1) == pytest.approx((0.6918, 0.8770), abs=5e-5)
    assert (low2, high2) == pytest.approx((0.4905, 0.7004), abs=5e-5)
    result = lift(70, 56, 80, 48)
    assert dataclasses.astuple(result) == pytest.approx((
        0.8, 0.6, 0.2, 0.2 - math.hypot(0.8 - low1, high2 - 0.6),
        0.2 + math.hypot(high1 - 0.8, 0.6 - low2), 0.2 / 0.6))


def test_a_wider_confidence_gives_a_wider_interval() -> None:
    narrow, wide = lift(500, 60, 100, 7), lift(500, 60, 100, 7, confidence=0.99)
    assert wide.low is not None and narrow.low is not None
    assert wide.high is not None and narrow.high is not None
    assert wide.low < narrow.low < narrow.high < wide.high


def test_empty_groups() -> None:
    assert lift(0, 0, 0, 0) == Lift(None, None, None, None, None, None)
    assert lift(10, 3, 0, 0) == Lift(0.3, None, None, None, None, None)
    assert lift(0, 0, 10, 3) == Lift(None, 0.3, None, None, None, None)


def interval(result: Lift) -> tuple[float, float, float]:
    assert result.low is not None and result.difference is not None and result.high is not None
    return result.low, result.difference, result.high


def test_zero_conversions() -> None:
    none = lift(1000, 0, 50, 0)
    assert none.relative is None  # no control conversions: no relative lift
    low, difference, high = interval(none)
    assert -1 < low < difference == 0 < high < 1
    some = lift(1000, 12, 50, 0)
    assert some.relative is None
    low, difference, high = interval(some)
    assert low < 0 < difference < high and difference == pytest.approx(0.012)


def test_bounds_stay_in_range() -> None:
    for counts in [(1, 1, 1, 0), (1, 0, 1, 1), (3, 3, 1000, 0), (1000, 0, 3, 3), (1, 1, 1, 1)]:
        low, difference, high = interval(lift(*counts))
        assert -1 <= low <= difference <= high <= 1


@pytest.mark.parametrize(("args", "message"), [
    ((10, 11, 10, 1), "converted of only"),
    ((10, 1, 10, 11), "control"),
    ((-1, 0, 10, 1), "negative"),
    ((10, -1, 10, 1), "negative"),
    ((10, 1, -5, 0), "negative"),
])
def test_invalid_counts(args: tuple[int, int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lift(*args)


@pytest.mark.parametrize("confidence", [0, 1, 1.5, -0.5, math.nan])
def test_invalid_confidence(confidence: float) -> None:
    with pytest.raises(ValueError, match="confidence"):
        lift(10, 1, 10, 1, confidence=confidence)
