"""Conversion lift of treated vs held-out users, with a confidence interval of the difference.

The interval is Newcombe's hybrid score interval (method 10 of Newcombe, "Interval
estimation for the difference between independent proportions: comparison of eleven
methods", Statistics in Medicine 17, 1998), built from the Wilson score interval of
each rate. Unlike the textbook Wald interval it stays inside [-1, 1], and it is
well behaved for small groups and for rates near 0 or 1, which is where holdouts
live (a 5% control group of a small program; conversions of a few percent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


@dataclass(frozen=True)
class Lift:
    """Rates are fractions; None where a group is empty (or, for `relative`, control is 0)."""

    treated_rate: float | None
    control_rate: float | None
    difference: float | None  # treated - control (absolute, as a fraction)
    low: float | None  # the confidence interval of the difference
    high: float | None
    relative: float | None  # difference / control_rate when control_rate > 0

    def in_points(self) -> str:
        """The difference and its interval in percentage points, e.g. "+2.1 [-0.4, +4.6]";
        "-" while a group is empty."""
        if self.difference is None or self.low is None or self.high is None:
            return "-"
        return f"{self.difference * 100:+.1f} [{self.low * 100:+.1f}, {self.high * 100:+.1f}]"


def lift(treated: int, treated_converted: int, control: int, control_converted: int,
         confidence: float = 0.95) -> Lift:
    """The lift of `treated` users over `control` users, with its `confidence` interval."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    _check("treated", treated, treated_converted)
    _check("control", control, control_converted)
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    treated_rate = treated_converted / treated if treated else None
    control_rate = control_converted / control if control else None
    if treated_rate is None or control_rate is None:
        return Lift(treated_rate, control_rate, None, None, None, None)
    low1, high1 = wilson(treated_converted, treated, z)
    low2, high2 = wilson(control_converted, control, z)
    difference = treated_rate - control_rate
    low = difference - math.hypot(treated_rate - low1, high2 - control_rate)
    high = difference + math.hypot(high1 - treated_rate, control_rate - low2)
    relative = difference / control_rate if control_rate > 0 else None
    return Lift(treated_rate, control_rate, difference, max(low, -1.0), min(high, 1.0), relative)


def wilson(converted: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of converted / n (n > 0) at the normal quantile z."""
    rate = converted / n
    scale = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(centre - half, 0.0), min(centre + half, 1.0)


def _check(group: str, n: int, converted: int) -> None:
    if n < 0 or converted < 0:
        raise ValueError(f"{group}: counts must not be negative ({converted} of {n})")
    if converted > n:
        raise ValueError(f"{group}: {converted} converted of only {n} users")
