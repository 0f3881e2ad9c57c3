"""The event envelope: what a producer sends and what ingest accepts.

    {"event_id": UUID (optional; the idempotency key, generated when absent),
     "event_type": "user.signed_up"     (1-100 chars, lowercase dotted words),
     "user": UUID or email              (an unknown email creates the user),
     "occurred_at": ISO 8601            (optional; default now; naive = UTC),
     "data": {...}                      (a JSON object, at most 32 KiB, depth 16)}

Special event types:
- `user.identify`: `data` is merged into `users.attributes` (top-level keys; a key
  set to null is removed).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

EVENT_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
EMAIL_PATTERN = re.compile(r"^[^@\s\x00-\x1f]{1,64}@[^@\s\x00-\x1f]{1,190}\.[^@\s\x00-\x1f]{1,63}$")
MAX_DATA_BYTES = 32 * 1024
MAX_DATA_DEPTH = 16
IDENTIFY = "user.identify"


class InvalidEvent(ValueError):
    """The envelope is not acceptable; the message says which field and why."""


def _depth(value: Any, limit: int, level: int = 0) -> int:
    if level > limit:
        return level
    if isinstance(value, dict):
        return max([_depth(v, limit, level + 1) for v in value.values()] or [level + 1])
    if isinstance(value, list):
        return max([_depth(v, limit, level + 1) for v in value] or [level + 1])
    return level


class Event(BaseModel):
    """A validated event. `user_id` or `email` is set, from `user`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    event_type: str
    user: str
    occurred_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("event_type")
    @classmethod
    def _event_type(cls, value: str) -> str:
        if not 1 <= len(value) <= 100 or not EVENT_TYPE_PATTERN.match(value):
            raise ValueError("must be 1-100 chars of lowercase dotted words, e.g. 'user.signed_up'")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        value = value.strip()
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
        if len(value) > 255 or not EMAIL_PATTERN.match(value):
            raise ValueError("must be a user UUID or an email address")
        return value.lower()

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: dt.datetime) -> dt.datetime:
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)

    @field_validator("data")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _depth(value, MAX_DATA_DEPTH) > MAX_DATA_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DATA_DEPTH} levels")
        try:
            encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if len(encoded.encode("utf-8", "surrogatepass")) > MAX_DATA_BYTES:
            raise ValueError(f"larger than {MAX_DATA_BYTES} bytes")
        if "\\u0000" in encoded or "\x00" in encoded:
            raise ValueError("contains a NUL character")
        try:
            encoded.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains invalid Unicode (lone surrogates)") from None
        return value

    @property
    def user_id(self) -> uuid.UUID | None:
        try:
            return uuid.UUID(self.user)
        except ValueError:
            return None

    @property
    def email(self) -> str | None:
        return None if self.user_id else self.user

    def to_message(self) -> dict[str, Any]:
        """The JSON-ready form that travels in a task message."""
        return {
            "event_id": str(self.event_id),
            "event_type": self.event_type,
            "user": self.user,
            "occurred_at": self.occurred_at.isoformat(),
            "data": self.data,
        }


def build_event(event_type: str, *, user: str | uuid.UUID, data: Any = None,
                event_id: uuid.UUID | str | None = None,
                occurred_at: dt.datetime | str | None = None) -> Event:
    """Validate an event given as arguments (producers, the outbox); raises InvalidEvent."""
    raw: dict[str, Any] = {"event_type": event_type, "user": str(user), "data": dict(data or {})}
    if event_id is not None:
        raw["event_id"] = str(event_id)
    if occurred_at is not None:
        raw["occurred_at"] = (occurred_at.isoformat() if isinstance(occurred_at, dt.datetime)
                              else occurred_at)
    return parse_event(raw)


def parse_event(raw: Any) -> Event:
    """Validate one raw envelope (a dict, or a JSON string of one); raises InvalidEvent."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise InvalidEvent(f"malformed JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidEvent(f"an event must be a JSON object, got {type(raw).__name__}")
    try:
        return Event.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise InvalidEvent(problems) from None
    except RecursionError:
        raise InvalidEvent("nested too deeply") from None

