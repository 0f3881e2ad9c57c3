"""Send windows in the user's time zone, with fixed clocks: DST both ways, odd offsets, weekdays.

Expected instants are written in UTC, worked out by hand from each zone's 2026 rules
(noted beside each case), so a test failing says which rule the code got wrong.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.sends.windows import (
    MAX_ZONE_NAME,
    SendWindow,
    _lookup,
    local_day_bounds,
    next_open,
    parse_window,
    resolve_timezone,
)

UTC = ZoneInfo("UTC")


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


# (zone, hours, days, now, next opening or None when inside)
CASES = [
    # New York 2026-03-08: 02:00 EST -> 03:00 EDT (07:00Z).
    ("America/New_York", "09:00-20:00", None, "2026-03-07 12:00", "2026-03-07 14:00"),
    ("America/New_York", "09:00-20:00", None, "2026-03-08 02:00", "2026-03-08 13:00"),
    ("America/New_York", "09:00-20:00", None, "2026-03-08 13:00", None),
    ("America/New_York", "09:00-20:00", None, "2026-03-09 00:00", "2026-03-09 13:00"),
    # An opening in the gap opens at its end, 03:00 EDT; a close in it closes there too.
    ("America/New_York", "02:30-04:00", None, "2026-03-08 05:00", "2026-03-08 07:00"),
    ("America/New_York", "02:30-04:00", None, "2026-03-08 07:00", None),
    ("America/New_York", "02:30-04:00", None, "2026-03-08 08:00", "2026-03-09 06:30"),
    ("America/New_York", "20:00-02:30", None, "2026-03-08 06:59", None),
    ("America/New_York", "20:00-02:30", None, "2026-03-08 07:00", "2026-03-09 00:00"),
    # New York 2026-11-01: 02:00 EDT -> 01:00 EST (06:00Z); 01:00-02:00 happens twice.
    ("America/New_York", "09:00-20:00", None, "2026-11-01 01:00", "2026-11-01 14:00"),
    ("America/New_York", "01:30-03:00", None, "2026-11-01 04:00", "2026-11-01 05:30"),
    ("America/New_York", "01:30-03:00", None, "2026-11-01 06:30", None),  # 01:30 EST
    ("America/New_York", "01:30-01:45", None, "2026-11-01 05:40", None),  # 01:40 EDT
    ("America/New_York", "01:30-01:45", None, "2026-11-01 06:40", "2026-11-02 06:30"),  # EST
    # London 2026-03-29: 01:00 GMT -> 02:00 BST (01:00Z).
    ("Europe/London", "08:00-20:00", None, "2026-03-28 00:00", "2026-03-28 08:00"),
    ("Europe/London", "08:00-20:00", None, "2026-03-29 00:00", "2026-03-29 07:00"),
    ("Europe/London", "01:30-03:00", None, "2026-03-29 00:30", "2026-03-29 01:00"),
    # London 2026-10-25: 02:00 BST -> 01:00 GMT (01:00Z): 01:30 first happens at 00:30Z.
    ("Europe/London", "01:30-06:00", None, "2026-10-24 23:00", "2026-10-25 00:30"),
    ("Europe/London", "08:00-20:00", None, "2026-10-25 00:00", "2026-10-25 08:00"),
    # Kolkata +05:30 and Kathmandu +05:45, no DST.
    ("Asia/Kolkata", "09:00-18:00", None, "2026-06-01 03:29", "2026-06-01 03:30"),
    ("Asia/Kolkata", "09:00-18:00", None, "2026-06-01 03:30", None),
    ("Asia/Kolkata", "09:00-18:00", None, "2026-06-01 12:30", "2026-06-02 03:30"),
    ("Asia/Kathmandu", "09:00-18:00", None, "2026-06-01 00:00", "2026-06-01 03:15"),
    ("Asia/Kathmandu", "09:00-18:00", None, "2026-06-01 12:14", None),
    ("Asia/Kathmandu", "09:00-18:00", None, "2026-06-01 12:15", "2026-06-02 03:15"),
    # St. John's -03:30 / -02:30: 2026-03-08 02:00 NST -> 03:00 NDT.
    ("America/St_Johns", "09:00-20:00", None, "2026-03-07 04:00", "2026-03-07 12:30"),
    ("America/St_Johns", "09:00-20:00", None, "2026-03-08 03:00", "2026-03-08 11:30"),
    # Adelaide +09:30 / +10:30: 2026-04-05 03:00 ACDT -> 02:00 ACST; 2026-10-04 02:00 -> 03:00.
    ("Australia/Adelaide", "09:00-17:00", None, "2026-04-03 12:00", "2026-04-03 22:30"),
    ("Australia/Adelaide", "09:00-17:00", None, "2026-04-04 12:00", "2026-04-04 23:30"),
    ("Australia/Adelaide", "02:30-05:00", None, "2026-10-03 14:00", "2026-10-03 16:30"),
    # Lord Howe +10:30 / +11, a 30-minute shift: 2026-04-05 02:00 -> 01:30; 10-04 02:00 -> 02:30.
    ("Australia/Lord_Howe", "09:00-17:00", None, "2026-04-04 13:00", "2026-04-04 22:30"),
    ("Australia/Lord_Howe", "01:45-03:00", None, "2026-04-04 13:00", "2026-04-04 14:45"),
    ("Australia/Lord_Howe", "01:45-03:00", None, "2026-04-04 15:15", None),  # second 01:45
    ("Australia/Lord_Howe", "02:15-04:00", None, "2026-10-03 13:00", "2026-10-03 15:30"),
    # Weekdays only, over a weekend (2026-05-15 is a Friday; Paris is +02:00 in May).
    ("Europe/Paris", "09:00-17:00", ["weekdays"], "2026-05-15 14:59", None),
    ("Europe/Paris", "09:00-17:00", ["weekdays"], "2026-05-15 15:00", "2026-05-18 07:00"),
    ("Europe/Paris", "09:00-17:00", ["weekdays"], "2026-05-16 10:00", "2026-05-18 07:00"),
    ("Europe/Paris", "09:00-17:00", ["weekdays"], "2026-05-17 23:00", "2026-05-18 07:00"),
    ("Europe/Paris", "09:00-17:00", ["Sat", "SUN"], "2026-05-15 10:00", "2026-05-16 07:00"),
    # Across midnight, belonging to the day it opens on.
    ("UTC", "22:00-02:00", ["weekdays"], "2026-05-15 23:00", None),  # Friday night
    ("UTC", "22:00-02:00", ["weekdays"], "2026-05-16 01:00", None),  # ... into Saturday
    ("UTC", "22:00-02:00", ["weekdays"], "2026-05-16 02:00", "2026-05-18 22:00"),
    ("UTC", "22:00-02:00", ["weekdays"], "2026-05-16 23:00", "2026-05-18 22:00"),
    ("UTC", "22:00-02:00", ["weekdays"], "2026-05-17 01:00", "2026-05-18 22:00"),
    ("UTC", "22:00-02:00", ["weekdays"], "2026-05-18 01:00", "2026-05-18 22:00"),
    # "24:00" ends the day.
    ("UTC", "18:00-24:00", None, "2026-05-15 23:59", None),
    ("UTC", "18:00-24:00", None, "2026-05-16 00:00", "2026-05-16 18:00"),
    ("UTC", "00:00-24:00", ["weekdays"], "2026-05-15 23:59", None),
    ("UTC", "00:00-24:00", ["weekdays"], "2026-05-16 00:00", "2026-05-18 00:00"),
    ("UTC", "00:00-24:00", ["weekdays"], "2026-05-18 00:00", None),
]


@pytest.mark.parametrize(("zone", "hours", "days", "now", "expected"), CASES)
def test_next_open(zone: str, hours: str, days: list[str] | None, now: str,
                   expected: str | None) -> None:
    opens = next_open(utc(now), ZoneInfo(zone), parse_window(hours, days))
    assert opens == (utc(expected) if expected else None)
    if opens is not None:
        assert opens.tzinfo is dt.UTC


def test_now_in_any_zone() -> None:
    window, zone = parse_window("09:00-20:00"), ZoneInfo("America/New_York")
    now = utc("2026-03-08 02:00")
    assert next_open(now.astimezone(ZoneInfo("Asia/Tokyo")), zone, window) == utc("2026-03-08 13:00")
    with pytest.raises(ValueError, match="aware"):
        next_open(now.replace(tzinfo=None), zone, window)


@pytest.mark.parametrize(("zone", "now", "start", "end", "hours"), [
    ("America/New_York", "2026-03-08 12:00", "2026-03-08 05:00", "2026-03-09 04:00", 23),
    ("America/New_York", "2026-11-01 12:00", "2026-11-01 04:00", "2026-11-02 05:00", 25),
    ("Europe/London", "2026-03-29 12:00", "2026-03-29 00:00", "2026-03-29 23:00", 23),
    ("Europe/London", "2026-10-25 12:00", "2026-10-24 23:00", "2026-10-26 00:00", 25),
    ("Australia/Lord_Howe", "2026-10-04 00:00", "2026-10-03 13:30", "2026-10-04 13:00", 23.5),
    ("Australia/Lord_Howe", "2026-04-05 00:00", "2026-04-04 13:00", "2026-04-05 13:30", 24.5),
    ("Asia/Kathmandu", "2026-06-01 18:14", "2026-05-31 18:15", "2026-06-01 18:15", 24),
    # Santiago changes at midnight: 2026-09-06 starts at 01:00; 2026-04-04 ends at the
    # second midnight (the clocks go from 00:00 back to 23:00).
    ("America/Santiago", "2026-09-06 12:00", "2026-09-06 04:00", "2026-09-07 03:00", 23),
    ("America/Santiago", "2026-04-05 03:30", "2026-04-04 03:00", "2026-04-05 04:00", 25),
    # St. John's fell back at 00:01 until 2011: 23:30 on 2010-11-06 happened after the
    # first midnight of the 7th, so that day ends at the second one.
    ("America/St_Johns", "2010-11-07 03:00", "2010-11-06 02:30", "2010-11-07 03:30", 25),
])
def test_local_day_bounds(zone: str, now: str, start: str, end: str, hours: float) -> None:
    bounds = local_day_bounds(utc(now), ZoneInfo(zone))
    assert bounds == (utc(start), utc(end))
    assert bounds[1] - bounds[0] == dt.timedelta(hours=hours)
    assert bounds[0] <= utc(now) < bounds[1]


# ------------------------------------------------------------------- parse_window


def test_parse_window() -> None:
    assert parse_window("09:00-20:00") == SendWindow(dt.time(9), dt.time(20), frozenset(range(1, 8)))
    assert parse_window(" 22:00 - 02:00 ", ["weekdays"]) == SendWindow(
        dt.time(22), dt.time(2), frozenset({1, 2, 3, 4, 5}))
    assert parse_window("00:00-24:00", ["Weekends"]).days == frozenset({6, 7})
    assert parse_window("00:00-24:00").length == dt.timedelta(days=1)
    assert parse_window("22:00-02:00").length == dt.timedelta(hours=4)
    assert parse_window("09:00-24:00").end == dt.time(0)
    assert parse_window("09:00-20:00", ["MON", "wed", "mon"]).days == frozenset({1, 3})
    assert parse_window("09:00-20:00", ("all",)).days == frozenset(range(1, 8))


@pytest.mark.parametrize(("hours", "days", "message"), [
    ("9:00-20:00", None, "start '9:00' is not a time HH:MM"),
    ("09:00-25:00", None, "end '25:00' is not a time HH:MM from 00:00 to 24:00"),
    ("24:00-06:00", None, "start '24:00'"),
    ("09:60-20:00", None, "start '09:60'"),
    ("09:00", None, "is not HH:MM-HH:MM"),
    ("09:00-12:00-20:00", None, "is not HH:MM-HH:MM"),
    ("", None, "is not HH:MM-HH:MM"),
    ("09:00-09:00", None, "starts and ends at the same time"),
    ("00:00-00:00", None, "starts and ends at the same time"),
    ("09:00-20:00", [], "days is empty"),
    ("09:00-20:00", ["monday"], "day 'monday' is not one of mon"),
    ("09:00-20:00", ["weekdays", "sat"], "'weekdays' must be the only item"),
    ("09:00-20:00", "weekdays", "must be a list of day names"),
    ("09:00-20:00", [1], "day 1 is not one of"),
    (900, None, "must be a string"),
])
def test_parse_window_refuses(hours: object, days: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_window(hours, days)  # type: ignore[arg-type]


def test_send_window_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="ISO weekdays"):
        SendWindow(dt.time(9), dt.time(17), frozenset())
    with pytest.raises(ValueError, match="ISO weekdays"):
        SendWindow(dt.time(9), dt.time(17), frozenset({0}))
    with pytest.raises(ValueError, match="without a zone"):
        SendWindow(dt.time(9, tzinfo=dt.UTC), dt.time(17))


# ------------------------------------------------------------------- resolve_timezone

DEFAULT = ZoneInfo("Europe/Paris")


@pytest.mark.parametrize("value", ["UTC", "Asia/Kolkata", "America/Argentina/ComodRivadavia",
                                   "Etc/GMT+5", "America/Port-au-Prince", "Australia/Lord_Howe"])
def test_valid_zones(value: str) -> None:
    assert resolve_timezone(value, DEFAULT) == (ZoneInfo(value), None)


def test_missing_zone_is_the_default_without_a_warning() -> None:
    assert resolve_timezone(None, DEFAULT) == (DEFAULT, None)


HOSTILE = [
    (5, "not a string (got int)"), (5.5, "not a string"), (True, "not a string (got bool)"),
    ([], "not a string (got list)"), ({"zone": "UTC"}, "not a string (got dict)"),
    (10**5000, "not a string"),  # str() of it would raise; it must not be printed
    ("", "empty"),
    ("x" * 10_240, f"10240 characters long (an IANA name has at most {MAX_ZONE_NAME})"),
    ("../../etc/passwd", "not shaped like an IANA name"), ("/etc/passwd", "not shaped like"),
    ("Europe/../UTC", "not shaped like"), ("UTC\x00", "not shaped like"),
    ("Europe/Paris\n", "not shaped like"), ("Europe\\Paris", "not shaped like"),
    ("Europe//Paris", "not shaped like"), ("zone.tab", "not shaped like"),
    ("Zürich", "not shaped like"), (" UTC", "not shaped like"),
    ("Mars/Base", "'Mars/Base' is not a known IANA time zone"),
    ("America", "not a known IANA time zone"),  # a folder of the database
    ("leapseconds", "not a known IANA time zone"),  # a file of it that is no zone
]


@pytest.mark.parametrize(("value", "warning"), HOSTILE,
                         ids=[f"{type(value).__name__}{i}" for i, (value, _) in enumerate(HOSTILE)])
def test_hostile_values_fall_back(value: object, warning: str) -> None:
    zone, message = resolve_timezone(value, DEFAULT)
    assert zone is DEFAULT
    assert message is not None and warning in message
    assert "\n" not in message and len(message) < 200


def test_absurd_values_are_not_looked_up() -> None:
    before = _lookup.cache_info()
    for value, _ in HOSTILE:
        if value not in ("Mars/Base", "America", "leapseconds"):
            resolve_timezone(value, DEFAULT)
    after = _lookup.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)


def test_lookups_are_cached() -> None:
    resolve_timezone("Asia/Kathmandu", DEFAULT)
    resolve_timezone("Mars/Olympus", DEFAULT)
    before = _lookup.cache_info()
    assert resolve_timezone("Asia/Kathmandu", DEFAULT)[1] is None
    assert resolve_timezone("Mars/Olympus", DEFAULT)[1] is not None
    after = _lookup.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (2, 0)


# ------------------------------------------------------------------- properties

ZONES = ["UTC", "America/New_York", "Europe/London", "Asia/Kolkata", "Asia/Kathmandu",
         "America/St_Johns", "Australia/Adelaide", "Australia/Lord_Howe", "Pacific/Chatham",
         "America/Santiago", "America/Havana", "Africa/Casablanca", "Asia/Tehran",
         "Pacific/Kiritimati", "Pacific/Pago_Pago"]
MINUTE = dt.timedelta(minutes=1)


def oracle_instant(wall: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """The first instant the clock reads `wall` or later, found by walking minute by minute.

    Offsets and transitions in ZONES are whole minutes and change by at most an hour
    at a time, so three hours before the naive reading the clock is surely behind.
    """
    offset = wall.replace(tzinfo=zone).utcoffset()
    assert offset is not None
    t = (wall - offset - dt.timedelta(hours=3)).replace(tzinfo=dt.UTC)
    assert t.astimezone(zone).replace(tzinfo=None) < wall
    while t.astimezone(zone).replace(tzinfo=None) < wall:
        t += MINUTE
    return t


def oracle_occurrences(now: dt.datetime, zone: ZoneInfo,
                       window: SendWindow) -> list[tuple[dt.datetime, dt.datetime]]:
    """The window's [open, close) intervals around `now`, computed the slow way."""
    start_minute = window.start.hour * 60 + window.start.minute
    end_minute = window.end.hour * 60 + window.end.minute
    length = dt.timedelta(minutes=(end_minute - start_minute) % 1440 or 1440)
    today = now.astimezone(zone).date()
    spans = []
    for offset in range(-2, 17):
        day = today + dt.timedelta(days=offset)
        if day.isoweekday() in window.days:
            wall = dt.datetime.combine(day, window.start)
            opens, closes = oracle_instant(wall, zone), oracle_instant(wall + length, zone)
            if opens < closes:
                spans.append((opens, closes))
    return spans


@functools.cache
def transitions(name: str) -> list[dt.datetime]:
    """When the zone's offset changed in 2000-2037, to the minute: examples are aimed there."""
    zone, found = ZoneInfo(name), []
    t, end = dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2038, 1, 1, tzinfo=dt.UTC)
    step = dt.timedelta(hours=6)
    while t < end:
        if (t + step).astimezone(zone).utcoffset() != t.astimezone(zone).utcoffset():
            low, high = 0, 360  # minutes after t: the offset is t's at low, the new one at high
            while high - low > 1:
                middle = (low + high) // 2
                same = (t + middle * MINUTE).astimezone(zone).utcoffset() == t.astimezone(zone).utcoffset()
                low, high = (middle, high) if same else (low, middle)
            found.append(t + high * MINUTE)
        t += step
    return found


any_clock = st.integers(0, 1439).map(lambda m: dt.time(m // 60, m % 60))
any_instant = st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2037, 12, 31),
                           timezones=st.just(dt.UTC))


@st.composite
def clock_near(draw: st.DrawFn, zone: ZoneInfo, transition: dt.datetime) -> dt.time:
    """A reading within 75 minutes of the one the clock reached as it changed: a start or
    end in the gap or the repeated hour, or just beside them."""
    reading = (transition - MINUTE).astimezone(zone).replace(tzinfo=None) + MINUTE
    return (reading + draw(st.integers(-75, 75)) * MINUTE).time()


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, dt.datetime, SendWindow]:
    """A zone, a moment and a window; half of them around one of the zone's clock changes."""
    name = draw(st.sampled_from(ZONES))
    zone, found = ZoneInfo(name), transitions(name)
    days = draw(st.frozensets(st.integers(1, 7), min_size=1))
    aimed = draw(st.booleans())
    if found and aimed:
        transition = draw(st.sampled_from(found))
        now = transition + draw(st.timedeltas(-dt.timedelta(days=2), dt.timedelta(days=1)))
        start = draw(clock_near(zone, transition))
        end = draw(st.one_of(clock_near(zone, transition), any_clock))
    else:
        now, start, end = draw(any_instant), draw(any_clock), draw(any_clock)
    return name, now, SendWindow(start, end, days)


@settings(max_examples=500, deadline=None)
@given(case=cases())
def test_next_open_properties(case: tuple[str, dt.datetime, SendWindow]) -> None:
    name, now, window = case
    zone = ZoneInfo(name)
    spans = oracle_occurrences(now, zone, window)

    def inside(t: dt.datetime) -> bool:
        return any(opens <= t < closes for opens, closes in spans)

    opens = next_open(now, zone, window)
    assert (opens is None) == inside(now)
    if opens is None:
        return
    assert opens > now and inside(opens)
    assert opens in [span[0] for span in spans]
    # A week and a bit; two weeks when a short window fell in a gap the clocks skipped.
    limit = dt.timedelta(days=8 if window.length > dt.timedelta(hours=1) else 15)
    assert opens - now <= limit
    step = (opens - now) / 50
    assert not any(inside(now + step * i) for i in range(50))
    assert not inside(opens - dt.timedelta(microseconds=1))


@settings(max_examples=300, deadline=None)
@given(case=cases())
def test_local_day_bounds_properties(case: tuple[str, dt.datetime, SendWindow]) -> None:
    name, now, _ = case
    zone = ZoneInfo(name)
    start, end = local_day_bounds(now, zone)
    assert start <= now < end
    assert dt.timedelta(hours=23) <= end - start <= dt.timedelta(hours=25)
    day = now.astimezone(zone).date()
    assert start == oracle_instant(dt.datetime.combine(day, dt.time()), zone)
    assert start.astimezone(zone).date() == day
