"""The dead-letter table: what the fleet could not process, kept for replay.

A dead letter must store whatever the wire carried (docs/architecture.md, decision 11): the raw
bytes always go to a bytea column; the parsed JSON only when PostgreSQL's jsonb can
hold it (strict UTF-8, no NUL, finite numbers); every text column is made storable
first. A body larger than `MAX_RAW_BYTES` keeps its first bytes, its size and its
SHA-256, so a 50 MB junk message cannot bloat the table.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from db.models import DeadLetter

MAX_RAW_BYTES = 1024 * 1024
MAX_REASON_CHARS = 10_000


def storable_text(value: str, limit: int | None = None) -> str:
    """`value` as PostgreSQL text can hold it: no NUL, no lone surrogate, at most `limit`."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    value = value.replace("\x00", "\\x00")
    return value[:limit] if limit is not None else value


def storable_key(value: str, limit: int = 255) -> str:
    """A key column value (task id, name) that stores and stays unique: hashed if it cannot."""
    if len(value) <= limit and storable_text(value) == value:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256:{digest}"


def jsonb_safe(value: Any, depth: int = 0) -> bool:
    """True if psycopg can send `value` as jsonb and PostgreSQL accepts it unchanged."""
    if depth > 500:
        return False
    if isinstance(value, str):
        return storable_text(value) == value
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return len(str(value)) < 4000
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(jsonb_safe(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and storable_text(k) == k and jsonb_safe(v, depth + 1)
                   for k, v in value.items())
    return False


def _as_json(raw: bytes) -> Any | None:
    """The payload parsed, or None when it is not JSON PostgreSQL's jsonb can hold."""
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return parsed if jsonb_safe(parsed) else None


def record_dead_letter(
    session: Session,
    *,
    source: str,
    reason: str,
    raw: bytes | str,
    error_type: str | None = None,
    event_id: uuid.UUID | None = None,
) -> int:
    """Insert one dead letter; returns its id. Runs in the caller's transaction."""
    raw_bytes = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    size = len(raw_bytes)
    truncated = size > MAX_RAW_BYTES
    if truncated:
        reason = f"{reason} [body of {size} bytes truncated to {MAX_RAW_BYTES}]"
    return session.execute(
        insert(DeadLetter)
        .values(
            source=storable_text(source, 255),
            reason=storable_text(reason, MAX_REASON_CHARS),
            error_type=storable_text(error_type, 255) if error_type else None,
            event_id=event_id,
            raw_payload=raw_bytes[:MAX_RAW_BYTES],
            raw_size=size,
            raw_sha256=hashlib.sha256(raw_bytes).hexdigest(),
            payload=None if truncated else _as_json(raw_bytes),
        )
        .returning(DeadLetter.id)
    ).scalar_one()
