"""The event envelope: what a producer sends and what ingest accepts.

    {"event_id": UUID (optional; the idempotency key, derived from the message when absent),
     "event_type": "user.signed_up"     (1-100 chars, lowercase dotted words),
     "user": UUID or email              (an unknown email creates the user),
     "occurred_at": ISO 8601            (optional; default now; naive = UTC),
     "data": {...}                      (a JSON object, at most 32 KiB, depth 16)}

Every value accepted here is one PostgreSQL stores and gives back unchanged, so one
event cannot make the database refuse its batch (tests/test_envelope_db.py checks
that against a real server): UTC offsets below 16 h (timestamptz's limit), instants
from 1970 to 9998 (a year of margin below Python's year 9999, so every client reads
them back in any time zone), emails of at most 255 characters once normalised, no NUL
or lone surrogate anywhere, and no number jsonb would give back as a different one.

Special event types:
- `user.identify`: `data` is merged into `users.attributes` (top-level keys; a key
  set to null is removed).
- `user.unsubscribed` / `user.subscribed`: the user's consent for `data.channel`
  (one of CHANNELS, or "all"; absent means "all"), recorded in `user_consents`
  (workers/events/consent.py). Any other channel value is refused here, so a consent
  that cannot be applied becomes a dead letter rather than an audit row that did nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import unicodedata
import uuid
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from workers.event_types import EVENT_TYPE_PATTERN

EMAIL_PATTERN = re.compile(r"[^@\s\x00-\x1f]{1,64}@[^@\s\x00-\x1f]{1,190}\.[^@\s\x00-\x1f]{1,63}")
MAX_EMAIL_LENGTH = 255  # users.email is varchar(255)
MAX_DATA_BYTES = 32 * 1024
MAX_DATA_DEPTH = 16
# jsonb keeps a number as the decimal JSON wrote; Python writes floats from 1e16 up in
# exponent form (1e+23), which jsonb gives back as an integer (10**23 != 1e23).
MAX_FLOAT = 1e16
MAX_UTC_OFFSET = dt.timedelta(hours=16)  # exclusive: timestamptz refuses +16:00
OCCURRED_FROM = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
OCCURRED_UNTIL = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)  # exclusive
IDENTIFY = "user.identify"
UNSUBSCRIBED = "user.unsubscribed"
SUBSCRIBED = "user.subscribed"
CONSENT_TYPES = frozenset({UNSUBSCRIBED, SUBSCRIBED})
# The send channels (CapDef.channel in workers/sends/config.py is the same Literal; the
# tests check they agree). Here: the envelope is loaded by producers, which need no send policy.
CHANNELS = ("email", "sms", "push", "webhook")
ALL_CHANNELS = "all"  # a consent event's channel for every channel, and its default
HASH_BYTES = 32  # Event.content_hash: SHA-256
# Encoders built once: json.dumps with any non-default option builds one per call (5x slower).
_TO_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
_CANONICAL_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode
# NUL as the encoder writes it: \u0000 after an even number of backslashes (a backslash
# of the text is written doubled, so the text backslash-u0000 is not a NUL).
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
               list: "an array", dict: "an object"}
# Ids of envelopes that carry none: uuid5(this, "<broker message id>:<index in the message>").
# workers.workspaces' rule, spelled here so that producers validate without the database.
WORKSPACE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
WORKSPACE_NAME_RULE = ("1-63 characters: lowercase letters, digits, '-' and '_', starting "
                       "with a letter or digit")
MESSAGE_NAMESPACE = uuid.UUID("6f1d3b0e-2c4a-4e8b-9d71-5a0c8e3f2b94")


class InvalidEvent(ValueError):
    """The envelope is not acceptable; the message says which field and why."""


def normalise_email(value: str) -> str:
    """The one form of an email address that users are created and looked up by.

    NFKC, not NFC, so compatibility variants (fullwidth 'ａ', ligatures) are one user
    with the plain letters; then case folding, not lower(), because it is Unicode's
    caseless match ('ß' = 'ss', final 'ς' = 'σ'); then NFKC again, because folding can
    leave a string unnormalised ('İ' folds to 'i' + U+0307). The result is a fixed
    point: normalising it again changes nothing.
    """
    if value.isascii():  # the usual case, and the same answer: NFKC leaves ASCII alone
        return value.lower().strip()
    folded = unicodedata.normalize("NFKC", value).casefold()
    return unicodedata.normalize("NFKC", folded).strip()


def _storable_text(value: str) -> None:
    """PostgreSQL text cannot hold NUL, and UTF-8 cannot encode a lone surrogate."""
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains invalid Unicode (lone surrogates)") from None


def _check_values(container: dict[Any, Any] | list[Any] | tuple[Any, ...], limit: int,
                  level: int = 1) -> None:
    """Depth, keys and numbers of `data`: what jsonb would refuse or give back changed.

    `level` is the depth of the container's items; only containers recurse, so a flat
    object costs one call.
    """
    if level > limit:
        raise ValueError(f"nested deeper than {limit} levels")
    if isinstance(container, dict):
        for key in container:
            if not isinstance(key, str):
                raise ValueError(f"key {key!r} is not a string")
        items: Any = container.values()
    else:
        items = container
    for item in items:
        if isinstance(item, (dict, list, tuple)):
            _check_values(item, limit, level + 1)
        elif isinstance(item, float) and abs(item) >= MAX_FLOAT:
            raise ValueError(f"the float {item!r} would be stored as a different number "
                             f"(floats must be below {MAX_FLOAT:g} in magnitude; send an "
                             "integer or a string)")


class Event(BaseModel):
    """A validated event. `user_id` or `email` is set, from `user`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    event_type: str
    user: str
    occurred_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    data: dict[str, Any] = Field(default_factory=dict)
    workspace: str | None = None  # a workspace's name; absent: the default workspace

    @field_validator("workspace")
    @classmethod
    def _workspace(cls, value: str | None) -> str | None:
        if value is not None and not WORKSPACE_NAME.fullmatch(value):
            raise ValueError(f"must be a workspace name: {WORKSPACE_NAME_RULE}")
        return value

    @field_validator("event_type")
    @classmethod
    def _event_type(cls, value: str) -> str:
        if not 1 <= len(value) <= 100 or not EVENT_TYPE_PATTERN.fullmatch(value):
            raise ValueError("must be 1-100 chars of lowercase dotted words, e.g. 'user.signed_up'")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        _storable_text(value)
        try:
            return str(uuid.UUID(value.strip()))
        except ValueError:
            pass
        email = normalise_email(value)
        if len(email) > MAX_EMAIL_LENGTH:
            raise ValueError(f"the email is longer than {MAX_EMAIL_LENGTH} characters once "
                             "normalised (NFKC, case-folded)")
        if not EMAIL_PATTERN.fullmatch(email):
            raise ValueError("must be a user UUID or an email address")
        return email

    @field_validator("occurred_at")
    @classmethod
    def _in_range(cls, value: dt.datetime) -> dt.datetime:
        value = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        offset = value.utcoffset() or dt.timedelta(0)
        if abs(offset) >= MAX_UTC_OFFSET:
            raise ValueError("the UTC offset must be within ±15:59 (PostgreSQL's limit)")
        if not OCCURRED_FROM <= value < OCCURRED_UNTIL:
            raise ValueError("must be from 1970-01-01 to 9998-12-31 (UTC)")
        return value

    @field_validator("data")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:  # first: the C encoder bounds the cost of a huge or deeply nested value
            encoded = _TO_JSON(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        try:  # a lone surrogate in any key or string stays one in `encoded`
            size = len(encoded.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("contains invalid Unicode (lone surrogates)") from None
        if size > MAX_DATA_BYTES:
            raise ValueError(f"larger than {MAX_DATA_BYTES} bytes")
        if "\\u0000" in encoded and _ESCAPED_NUL.search(encoded):
            raise ValueError("contains a NUL character")
        _check_values(value, MAX_DATA_DEPTH)
        return value

    @field_validator("data")
    @classmethod
    def _consent_channel(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if info.data.get("event_type") not in CONSENT_TYPES or "channel" not in value:
            return value
        channel = value["channel"]
        if isinstance(channel, str) and (channel in CHANNELS or channel == ALL_CHANNELS):
            return value
        if isinstance(channel, str):  # the value itself only when short: it goes in the reason
            shown = repr(channel) if len(channel) <= 40 else f"a string of {len(channel)} characters"
        else:
            shown = _JSON_TYPES.get(type(channel), type(channel).__name__)
        raise ValueError(f"channel of a {info.data['event_type']} event must be one of "
                         f"{', '.join(CHANNELS)} or {ALL_CHANNELS} (absent: {ALL_CHANNELS}), "
                         f"not {shown}")

    @property
    def user_id(self) -> uuid.UUID | None:
        return None if "@" in self.user else uuid.UUID(self.user)  # validated: one or the other

    @property
    def email(self) -> str | None:
        return self.user if "@" in self.user else None

    @cached_property
    def content_hash(self) -> bytes:
        """What a duplicate event_id must repeat: type, user and data (SHA-256).

        Not occurred_at: a producer retrying with the same event_id but a fresh
        default timestamp is sending the same event again.
        """
        content = _CANONICAL_JSON([self.event_type, self.user, self.data])
        return hashlib.sha256(content.encode("utf-8")).digest()

    def to_message(self) -> dict[str, Any]:
        """The JSON-ready form that travels in a task message."""
        return {
            "event_id": str(self.event_id),
            "event_type": self.event_type,
            "user": self.user,
            "occurred_at": self.occurred_at.isoformat(),
            "data": self.data,
            **({"workspace": self.workspace} if self.workspace is not None else {}),
        }


def with_field(raw: Any, name: str, value: str) -> Any:
    """`raw` with field `name` set if it is a JSON object without one; anything else unchanged.

    A JSON string is decoded for that (and stays a string if it is not an object),
    so a malformed envelope keeps its exact bytes for the dead letter.
    """
    envelope = raw
    if isinstance(raw, (str, bytes)):
        try:
            envelope = json.loads(raw)
        except (ValueError, RecursionError):
            return raw
    if isinstance(envelope, dict) and name not in envelope:
        return {**envelope, name: value}
    return raw


def with_event_id(raw: Any, event_id: uuid.UUID) -> Any:
    """`raw` with `event_id` set if it is a JSON object without one (`with_field`)."""
    return with_field(raw, "event_id", str(event_id))


def with_message_ids(raws: Sequence[Any], message_id: str | None) -> list[Any]:
    """The envelopes of one broker message, those without an event_id given a derived one.

    The id is uuid5 of the message id and the envelope's index in the message: a
    redelivered message has the same id, so its events are deduplicated instead of
    ingested twice.
    """
    if not message_id:
        return list(raws)
    return [with_event_id(raw, uuid.uuid5(MESSAGE_NAMESPACE, f"{message_id}:{index}"))
            for index, raw in enumerate(raws)]


def build_event(event_type: str, *, user: str | uuid.UUID, data: Any = None,
                event_id: uuid.UUID | str | None = None,
                occurred_at: dt.datetime | str | None = None,
                workspace: str | None = None) -> Event:
    """Validate an event given as arguments (producers, the outbox); raises InvalidEvent."""
    raw: dict[str, Any] = {"event_type": event_type, "user": str(user), "data": dict(data or {})}
    if workspace is not None:
        raw["workspace"] = workspace
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
