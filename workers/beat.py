"""A beat scheduler that acts only while it holds a PostgreSQL advisory lock.

Exactly one beat may send periodic tasks (docs/architecture.md, decision 10). Each beat process
tries `pg_try_advisory_lock` on a connection of its own and keeps that connection
open while it leads; the others stand by and retry every few seconds. If the
leader dies, its connection closes, PostgreSQL releases the lock and a standby
takes over. Nightly jobs are idempotent, so a takeover never does harm.

The lock belongs to a server session, so its connection must reach PostgreSQL itself
(DATABASE_DIRECT_URL, else DATABASE_URL): behind a transaction pooler the session that
took it would serve other clients, and a second beat landing on it would take it again
(advisory locks are re-entrant within a session). With FLEET_DB_POOLER set and no direct
URL the beat refuses to start.
"""

from __future__ import annotations

from typing import Any

import psycopg
from celery.beat import PersistentScheduler

from workers.log import get_logger
from workers.settings import get_settings

log = get_logger(__name__)
LOCK_KEY = 0x6C69666563796365  # "lifecyce": one lock per fleet database
STANDBY_SECONDS = 5.0


class LockedScheduler(PersistentScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = get_settings()
        if settings.db_pooler and not settings.database_direct_url:
            raise RuntimeError("FLEET_DB_POOLER is set: the beat's leader lock needs "
                               "DATABASE_DIRECT_URL, a connection straight to PostgreSQL")
        self._lock_conn: psycopg.Connection[Any] | None = None
        self._standing_by = False
        super().__init__(*args, **kwargs)

    def _leading(self) -> bool:
        if self._lock_conn is not None:
            try:
                self._lock_conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                log.error("beat.lock_lost")
                self._release()
        try:
            conn = psycopg.connect(str(get_settings().direct_database_url), autocommit=True,
                                   connect_timeout=5, application_name="lifecycle-fleet-beat")
        except psycopg.Error as exc:
            log.warning("beat.lock_unreachable", error=str(exc))
            return False
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        if got and got[0]:
            self._lock_conn = conn
            self._standing_by = False
            log.info("beat.lock_acquired")
            return True
        conn.close()
        if not self._standing_by:
            log.info("beat.standby", reason="another beat holds the lock")
            self._standing_by = True
        return False

    def _release(self) -> None:
        if self._lock_conn is not None:
            try:
                self._lock_conn.close()
            finally:
                self._lock_conn = None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self._leading():
            return STANDBY_SECONDS
        return float(super().tick(*args, **kwargs))

    def close(self) -> None:
        super().close()
        self._release()
