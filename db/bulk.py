"""COPY for the high-volume audit inserts: one round trip, no SQL to build per row."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
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


@contextmanager
def savepoint(session: Session, name: str = "bulk") -> Iterator[None]:
    """A savepoint around set-based writes, rolled back to if the block raises.

    Issued on the driver connection: SQLAlchemy's begin_nested() spends about 1 ms of
    CPU per use on its bookkeeping, as much as a one-event ingest's own statements.
    The session is flushed first, so no ORM change is written inside; the block must
    write through Core statements or COPY only.
    """
    session.flush()
    raw = session.connection().connection.driver_connection
    raw.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        raw.execute(f"ROLLBACK TO SAVEPOINT {name}")
        raise
    raw.execute(f"RELEASE SAVEPOINT {name}")
