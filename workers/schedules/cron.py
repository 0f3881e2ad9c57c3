"""When a schedule runs next: a cron expression read in a time zone, or a fixed interval.

The five fields are parsed by Celery's own `crontab` (already a dependency: the beat
uses it), names like `mon-fri` and `jan` included, Sunday is 0; the next time is
searched here, over the zone's local days, because Celery's `remaining_delta` is
tied to the app's clock and ANDs day-of-month with day-of-week. As in cron, when
both day fields are restricted a day matching either one runs.

Daylight saving time (zoneinfo, PEP 495), so no run is skipped or doubled unseen:
- a wall time the clock skips in spring (02:30 in Europe/Berlin) runs once, at the
  instant it would have been without the change: 03:30 local, an hour late; where
  that is also another slot's instant (02:00 and 03:00) the two are one run;
- a wall time that happens twice in autumn runs once, at its first occurrence. An
  hourly schedule therefore has 23 runs on the spring day and 24 on the 25-hour one.
Intervals are absolute seconds (UTC): DST does not touch them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery.schedules import crontab

SEARCH_DAYS = 366 * 9  # `0 0 29 2 *` may wait 8 years (2096 → 2104)


def zone(name: str) -> ZoneInfo:
    """The IANA time zone; ValueError names the unknown one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Berlin)"
                         ) from None


@dataclass(frozen=True)
class Cron:
    expression: str
    zone: ZoneInfo
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]  # of the month
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day of month is `*`
    any_weekday: bool  # day of week is `*`

    def _day_matches(self, day: dt.date) -> bool:
        in_month, on_weekday = day.day in self.days, day.isoweekday() % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and on_weekday
        return in_month or on_weekday  # both restricted: either one (cron's rule)

    def _instants(self, day: dt.date) -> list[dt.datetime]:
        """The day's run times as UTC instants (fold 0: see the module docstring)."""
        if day.month not in self.months or not self._day_matches(day):
            return []
        return sorted({dt.datetime.combine(day, dt.time(h, m), tzinfo=self.zone)
                       .astimezone(dt.UTC) for h in self.hours for m in self.minutes})

    def next_after(self, after: dt.datetime) -> dt.datetime:
        """The first run time strictly after `after` (aware), in UTC; ValueError if none."""
        day = after.astimezone(self.zone).date() - dt.timedelta(days=1)  # a gap may shift back
        for _ in range(SEARCH_DAYS):
            later = [t for t in self._instants(day) if t > after]
            if later:
                # A skipped wall time lands up to the jump later: the next day's first
                # slot cannot be earlier than that unless the change is at midnight.
                following = [t for t in self._instants(day + dt.timedelta(days=1)) if t > after]
                return min(later + following)
            day += dt.timedelta(days=1)
        raise ValueError(f"cron {self.expression!r} never runs")


def parse_cron(expression: str, timezone: str = "UTC") -> Cron:
    """A five-field cron expression in an IANA zone; ValueError says what is wrong."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"cron {expression!r} needs 5 fields (minute hour day-of-month month "
                         f"day-of-week), got {len(fields)}")
    try:
        spec = crontab.from_string(expression)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"cron {expression!r}: {exc}") from None
    cron = Cron(expression=" ".join(fields), zone=zone(timezone),
                minutes=tuple(sorted(spec.minute)), hours=tuple(sorted(spec.hour)),
                days=frozenset(spec.day_of_month), months=frozenset(spec.month_of_year),
                weekdays=frozenset(spec.day_of_week), any_day=fields[2] == "*",
                any_weekday=fields[4] == "*")
    cron.next_after(dt.datetime.now(dt.UTC))  # `0 0 31 2 *` is refused here
    return cron


def next_interval(previous: dt.datetime, seconds: int, now: dt.datetime) -> dt.datetime:
    """The first `previous + k * seconds` (k ≥ 1) after `now`: missed runs are not made up."""
    step = dt.timedelta(seconds=seconds)
    behind = max(0, int((now - previous) / step))
    following = previous + step * max(1, behind)
    return following if following > now else following + step
