"""The fleet's one duration syntax: '30s', '10m', '12h', '7d', '2w'.

Used by conditions (`within_last`), trigger cooldowns, segment TTLs, goal windows
and message waits' look-back, in the program file and in BPMN properties alike.
Top level, so the engine can read it without knowing the condition language.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

MAX_DURATION = dt.timedelta(days=3660)
MAX_LOOKBACK = dt.timedelta(days=90)  # a message wait's look-back into the audit log

_DURATION_RE = re.compile(r"([0-9]{1,6})([smhdw])")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: Any) -> dt.timedelta:
    """The duration `text` names; ValueError (its message meant for the user) otherwise."""
    if not isinstance(text, str) or not (m := _DURATION_RE.fullmatch(text)):
        raise ValueError(f"expected a duration like '30m', '12h', '7d', got {text!r}")
    delta = dt.timedelta(**{_DURATION_UNITS[m.group(2)]: int(m.group(1))})
    if delta > MAX_DURATION:
        raise ValueError("duration longer than 10 years")
    return delta


def parse_lookback(text: Any) -> dt.timedelta:
    """A message wait's look-back: a duration of at most `MAX_LOOKBACK`."""
    window = parse_duration(text)
    if window > MAX_LOOKBACK:
        raise ValueError(f"at most {MAX_LOOKBACK.days} days")
    return window
