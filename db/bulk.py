"""COPY for the high-volume audit inserts: one round trip, no SQL to build per row."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy.orm import Session


def copy_rows(session: Session, table: str, columns: Sequence[str],
              rows: Iterable[Sequence[Any]]) -> None:
    """COPY rows into `table` inside the session's transaction (dicts become jsonb)."""
    raw = session.connection().connection.driver_connection
    with raw.cursor() as cursor, cursor.copy(
            f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([Jsonb(v) if isinstance(v, (dict, list)) else v for v in row])
