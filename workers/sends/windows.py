"""Send windows in the user's time zone: when a message may go out, and when it next may.

A window is local wall-clock hours ("09:00-20:00") opening on some days of the week.
Each day it opens on gives one interval of instants, from the first instant the local
clock reads the start (or later) to the first instant it reads the end (or later):

- a start or end that the clocks skip (spring forward) falls at the end of the gap, so
  a 02:30 opening on a day that jumps from 02:00 to 03:00 opens at 03:00;
- one that the clocks repeat (fall back) falls at its first occurrence;
- a window whose end is not after its start crosses midnight and belongs to the day it
  opens on: "22:00-02:00" on weekdays is open Friday 23:00 and Saturday 01:00, not
  Saturday 23:00. "24:00" is the midnight that ends the day ("00:00-24:00": all day).

Pure functions of their arguments (the clock is a parameter), so tests fix it.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ALL_DAYS = frozenset(range(1, 8))
DAY_GROUPS = {"all": ALL_DAYS, "weekdays": frozenset(range(1, 6)), "weekends": frozenset({6, 7})}
MAX_ZONE_NAME = 64  # the longest IANA name is 32 characters; longer values are not looked up
DAY = dt.timedelta(days=1)
# Days ahead searched for an opening: a week, plus a day the clocks skip (Pacific/Apia
# skipped 2011-12-30), plus the day before today whose window may still be open.
_HORIZON_DAYS = 16

_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
# IANA names: ASCII segments separated by '/'. No '.', so no '..', no leading '/', no NUL.
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*")


@dataclass(frozen=True)
class SendWindow:
    """Local wall-clock hours in which sends go out, opening on some ISO weekdays (1=Mon)."""

    start: dt.time
    end: dt.time  # end <= start: the window crosses midnight ("22:00-02:00")
    days: frozenset[int] = ALL_DAYS

    def __post_init__(self) -> None:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("send window times are local wall-clock times, without a zone")
        if not self.days or not self.days <= ALL_DAYS:
            raise ValueError(f"send window days must be ISO weekdays 1-7, not {sorted(self.days)}")

    @property
    def length(self) -> dt.timedelta:
        """Wall-clock length: past midnight when end <= start, a whole day when they are equal."""
        base = dt.date(2000, 1, 1)
        span = (dt.datetime.combine(base, self.end) - dt.datetime.combine(base, self.start)) % DAY
        return span or DAY


def parse_window(hours: str, days: Sequence[str] | None = None) -> SendWindow:
    """A window from "HH:MM-HH:MM" (24 h; "24:00" as the end) and day names (None: every day).

    Days are names from WEEKDAYS (any case), or one of "weekdays", "weekends", "all" as
    the list's only item. Raises ValueError naming the bad part.
    """
    if not isinstance(hours, str):
        raise ValueError(f"send window hours must be a string HH:MM-HH:MM, not {type(hours).__name__}")
    parts = [part.strip() for part in hours.split("-")]
    if len(parts) != 2:
        raise ValueError(f"send window {hours!r} is not HH:MM-HH:MM (e.g. 09:00-20:00)")
    start_text, end_text = parts
    start = _clock(start_text, "start", may_be_24=False)
    end = _clock(end_text, "end", may_be_24=True)
    if start_text == end_text:
        raise ValueError(f"send window {hours!r} starts and ends at the same time "
                         "(00:00-24:00 is the whole day)")
    return SendWindow(start, end, _days(days))


def _clock(text: str, part: str, *, may_be_24: bool) -> dt.time:
    if may_be_24 and text == "24:00":
        return dt.time(0)
    match = _CLOCK.fullmatch(text)
    if match is None:
        latest = "24:00" if may_be_24 else "23:59"
        raise ValueError(f"send window {part} {text!r} is not a time HH:MM from 00:00 to {latest}")
    return dt.time(int(match[1]), int(match[2]))


def _days(days: Sequence[str] | None) -> frozenset[int]:
    if days is None:
        return ALL_DAYS
    if isinstance(days, str) or not isinstance(days, Sequence):
        raise ValueError(f"send window days must be a list of day names (e.g. [mon, tue] or "
                         f"[weekdays]), not {type(days).__name__}")
    if not days:
        raise ValueError("send window days is empty: name at least one day, or leave it out "
                         "for every day")
    chosen: set[int] = set()
    for item in days:
        name = item.strip().lower() if isinstance(item, str) else ""
        if name in DAY_GROUPS:
            if len(days) != 1:
                raise ValueError(f"send window day {item!r} must be the only item of the list")
            return DAY_GROUPS[name]
        if name not in WEEKDAYS:
            raise ValueError(f"send window day {item!r} is not one of {', '.join(WEEKDAYS)}, "
                             f"{', '.join(DAY_GROUPS)}")
        chosen.add(WEEKDAYS.index(name) + 1)
    return frozenset(chosen)


def resolve_timezone(value: object, default: ZoneInfo) -> tuple[ZoneInfo, str | None]:
    """The zone a user attribute names: (zone, None), or (default, a one-line reason) if invalid.

    A missing value (None) is no error: the default, without a warning. Never raises.
    Absurd values (not a string, too long, not shaped like an IANA name: path
    separators, '..', NUL) are refused before any lookup touches the filesystem.
    """
    if value is None:
        return default, None
    if not isinstance(value, str):
        return default, f"timezone is not a string (got {type(value).__name__})"
    if not value:
        return default, "timezone is empty"
    if len(value) > MAX_ZONE_NAME:
        return default, (f"timezone is {len(value)} characters long "
                         f"(an IANA name has at most {MAX_ZONE_NAME})")
    if _ZONE_NAME.fullmatch(value) is None:
        return default, f"timezone {_shown(value)} is not shaped like an IANA name (e.g. Europe/Paris)"
    zone = _lookup(value)
    if zone is None:
        return default, f"timezone {value!r} is not a known IANA time zone"
    return zone, None


def _shown(value: str) -> str:
    text = repr(value)  # escapes newlines and control characters: the warning stays one line
    return text if len(text) <= 40 else text[:37] + "..."


@lru_cache(maxsize=1024)
def _lookup(name: str) -> ZoneInfo | None:
    """The zone, or None; cached either way, so a bad value seen on every send costs one lookup."""
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, OSError):  # not found, not a TZif file, a directory
        return None


def next_open(now: dt.datetime, zone: ZoneInfo, window: SendWindow) -> dt.datetime | None:
    """None when `now` (aware) is inside the window; otherwise the UTC instant it next opens."""
    today = _aware(now).astimezone(zone).date()
    # A window that opened yesterday may still be open; none opened earlier can be.
    for offset in range(-1, _HORIZON_DAYS):
        day = today + dt.timedelta(days=offset)
        if day.isoweekday() not in window.days:
            continue
        opens_at = dt.datetime.combine(day, window.start)
        opens, closes = _instant(opens_at, zone), _instant(opens_at + window.length, zone)
        if opens >= closes:  # the whole window falls in a gap the clocks skip
            continue
        if now < opens:
            return opens
        if now < closes:
            return None
    raise AssertionError(f"no send window opens within {_HORIZON_DAYS} days")  # pragma: no cover


def local_day_bounds(now: dt.datetime, zone: ZoneInfo) -> tuple[dt.datetime, dt.datetime]:
    """The UTC [start, end) of the user's calendar day containing `now` (23 or 25 h on DST days)."""
    day = _aware(now).astimezone(zone).date()
    midnight = dt.datetime.combine(day, dt.time())
    start, end = _instant(midnight, zone), _instant(midnight + DAY, zone)
    if end <= now:  # the clocks fell back across midnight (St. John's until 2011): `now` is
        # in the repeated hour of the day, which ends at the second midnight.
        end = (midnight + DAY).replace(tzinfo=zone, fold=1).astimezone(dt.UTC)
    return start, end


def _aware(now: dt.datetime) -> dt.datetime:
    if now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    return now


def _instant(wall: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """The first UTC instant at which the local clock reads `wall` (naive) or later.

    That is `wall` itself when it exists, its first occurrence when the clocks repeat it
    (fold=0), and the end of the gap when they skip it.
    """
    first = wall.replace(tzinfo=zone).astimezone(dt.UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first
    # In a gap, fold=0 and fold=1 lie either side of the transition (a whole second in
    # tzdata): the clock reads less than `wall` before it and more after it.
    other = wall.replace(tzinfo=zone, fold=1).astimezone(dt.UTC)
    low, high = math.floor(min(first, other).timestamp()), math.ceil(max(first, other).timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if dt.datetime.fromtimestamp(middle, zone).replace(tzinfo=None) >= wall:
            high = middle
        else:
            low = middle
    return dt.datetime.fromtimestamp(high, dt.UTC)
