"""The dead-letter table: what the fleet could not process, kept whole for replay."""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from db.models import DeadLetter


def _as_json(raw: bytes) -> Any | None:
    """The payload parsed, or None when it is not JSON PostgreSQL's jsonb can hold."""
    try:
        text = raw.decode("utf-8")
        # jsonb refuses the NUL character; the raw bytes still keep it.
        if "\\u0000" in text or "\x00" in text:
            return None
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


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
    raw_bytes = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    return session.execute(
        insert(DeadLetter)
        .values(
            source=source[:255],
            reason=reason,
            error_type=error_type[:255] if error_type else None,
            event_id=event_id,
            raw_payload=raw_bytes,
            payload=_as_json(raw_bytes),
        )
        .returning(DeadLetter.id)
    ).scalar_one()

