"""The send policy as `fleet apply` reads it and as workers load it back: one model for both.

    messaging:                          # program-wide (table program_settings, name 'messaging')
      timezone: Europe/Paris            # for users whose `timezone` attribute is missing/invalid
      send_window: {hours: "09:00-20:00", days: [weekdays]}   # in the user's time zone
      caps:                             # every non-transactional send of every workflow
        - {max: 3, per: 24h}            # rolling window
        - {max: 1, per: day, channel: email}   # calendar day in the user's time zone
      holdout: {percent: 5, salt: "2026-h2"}   # global control group
      consent_attribute: unsubscribed   # user attribute listing the channels opted out of
    workflows:
      - name: onboarding
        goal: {event_type: project.created, conditions: {}, within: 14d}
        exit_on_goal: true              # the goal ends a running execution where it is
        exit_when: {not: {in_segment: trial}}   # so does this condition on the user
        holdout: 10                     # percent, on top of the program's
        caps: [{max: 2, per: 7d}]       # this workflow's sends only

The YAML is validated by these models and stored as their JSON (`model_dump`); a
worker validates the stored JSON with the same models, so both agree on meaning.
"""

from __future__ import annotations

import datetime as dt
from functools import cached_property
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.durations import parse_lookback
from workers.event_types import EVENT_TYPE_RULE, is_event_type
from workers.rules.conditions import MAX_COST, ConditionError, parse, parse_duration
from workers.sends.windows import SendWindow, parse_window, resolve_timezone

MAX_CAP_WINDOW = dt.timedelta(days=90)  # caps look back at most this far (sends are kept longer)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _duration(value: str | int) -> dt.timedelta:
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be a positive number of seconds")
        return dt.timedelta(seconds=value)
    try:
        return parse_duration(value)
    except ConditionError as exc:
        raise ValueError(exc.message) from None


class CapDef(_Strict):
    """At most `max` sends `per` window: a duration (rolling) or `day` (the user's calendar day)."""

    max: int = Field(ge=0)
    per: str | int
    channel: Literal["email", "sms", "push", "webhook"] | None = None

    @field_validator("per")
    @classmethod
    def _window(cls, value: str | int) -> str | int:
        if value != "day" and not dt.timedelta(0) < _duration(value) <= MAX_CAP_WINDOW:
            raise ValueError(f"must be 'day' or a duration up to {MAX_CAP_WINDOW.days}d")
        return value

    @property
    def rolling(self) -> dt.timedelta | None:
        """The rolling window; None for a calendar day."""
        return None if self.per == "day" else _duration(self.per)

    def describe(self) -> str:
        scope = f" on {self.channel}" if self.channel else ""
        return f"{self.max} per {self.per}{scope}"


class SendWindowDef(_Strict):
    hours: str
    days: list[str] | None = None

    @model_validator(mode="after")
    def _parses(self) -> SendWindowDef:
        parse_window(self.hours, self.days)
        return self

    @cached_property
    def window(self) -> SendWindow:
        return parse_window(self.hours, self.days)


class HoldoutDef(_Strict):
    percent: float = Field(ge=0, le=100)
    salt: str = Field(default="holdout", min_length=1, max_length=200)

    @field_validator("salt")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("must be printable text (it is hashed in SQL too)")
        return value


class MessagingDef(_Strict):
    timezone: str = "UTC"
    send_window: SendWindowDef | None = None
    caps: list[CapDef] = []
    holdout: HoldoutDef | None = None
    consent_attribute: str = Field(default="unsubscribed", min_length=1, max_length=100)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        _, warning = resolve_timezone(value, ZoneInfo("UTC"))
        if warning:
            raise ValueError(warning)
        return value

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class GoalDef(_Strict):
    """What conversion means for a workflow: this event, within `within` of the start."""

    event_type: str
    conditions: dict[str, Any] = {}
    within: str | int = "30d"

    @field_validator("event_type")
    @classmethod
    def _is_event_type(cls, value: str) -> str:
        if not is_event_type(value):
            raise ValueError(f"{value!r} is not an event type ({EVENT_TYPE_RULE})")
        return value

    @field_validator("conditions")
    @classmethod
    def _condition(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            parse(value, max_cost=MAX_COST)
        except ConditionError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("within")
    @classmethod
    def _window(cls, value: str | int) -> str | int:
        _duration(value)
        return value

    @property
    def window(self) -> dt.timedelta:
        return _duration(self.within)


class WorkflowSettings(_Strict):
    """A workflow's own goal, holdout (percent, on top of the program's) and caps."""

    goal: GoalDef | None = None
    holdout: float = Field(default=0, ge=0, le=100)
    caps: list[CapDef] = []
    # How far back the workflow's message waits look in the audit log when they begin
    # (a catch event's own `lookback` property wins): none by default.
    lookback: str | None = None
    # Leave the workflow as soon as the goal is reached (workers/events/exits.py).
    exit_on_goal: bool = False
    # Leave it when this condition holds for the user (no event in scope; in_segment
    # allowed), checked on each step and when an identify changes the user.
    exit_when: dict[str, Any] | None = None

    @field_validator("lookback")
    @classmethod
    def _lookback(cls, value: str | None) -> str | None:
        if value is not None:
            parse_lookback(value)
        return value

    @field_validator("exit_when")
    @classmethod
    def _exit_condition(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                parse(value, allow_event=False, max_cost=MAX_COST)
            except ConditionError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _exit_needs_goal(self) -> WorkflowSettings:
        if self.exit_on_goal and self.goal is None:
            raise ValueError("exit_on_goal needs a goal: the goal is what ends the execution")
        return self

    @property
    def lookback_window(self) -> dt.timedelta | None:
        return parse_lookback(self.lookback) if self.lookback is not None else None
