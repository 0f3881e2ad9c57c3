"""The database layer's own configuration: where PostgreSQL is and how to pool connections.

`db` depends on nothing above it. By default it reads DATABASE_URL (with the optional
DATABASE_DIRECT_URL and DATABASE_READ_URL) and the FLEET_DB_* settings from the
environment; a process that resolves them another way (the fleet's settings, which fall
back to the embedded server) hands `configure` a source, read each time an engine is built.

Three URLs, because a transaction pooler (PgBouncer in transaction mode) keeps no session
state between transactions: `url` serves every transaction of the fleet and may go
through the pooler (`pooler` says so); `direct_url` reaches PostgreSQL itself, for what
holds session state (the beat's leader lock, migrations); `read_url` is a replica for
reports and status figures. Unset, the last two are `url`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Transaction poolers the engine knows how to work behind (db/session.py): no prepared
# statements, no startup `options`, the session settings set per transaction instead.
POOLERS = ("pgbouncer",)


@dataclass(frozen=True)
class DatabaseConfig:
    url: str | None  # postgresql://…; None: no database configured
    pool_size: int = 5
    max_overflow: int = 5
    statement_timeout_ms: int = 60_000  # 0 disables it
    pooler: str | None = None  # "pgbouncer": url and read_url go through a transaction pooler
    direct_url: str | None = None  # PostgreSQL itself, for session state; None: url
    read_url: str | None = None  # a replica for reports and status; None: url

    def __post_init__(self) -> None:
        if self.pooler not in (None, *POOLERS):
            raise ValueError(f"FLEET_DB_POOLER must be unset or one of {', '.join(POOLERS)}, "
                             f"not {self.pooler!r}")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> DatabaseConfig:
        def number(name: str, default: int) -> int:
            return int(environ.get(name) or default)

        return cls(url=environ.get("DATABASE_URL") or None,
                   pool_size=number("FLEET_DB_POOL_SIZE", cls.pool_size),
                   max_overflow=number("FLEET_DB_MAX_OVERFLOW", cls.max_overflow),
                   statement_timeout_ms=number("FLEET_DB_STATEMENT_TIMEOUT_MS",
                                               cls.statement_timeout_ms),
                   pooler=environ.get("FLEET_DB_POOLER") or None,
                   direct_url=environ.get("DATABASE_DIRECT_URL") or None,
                   read_url=environ.get("DATABASE_READ_URL") or None)

    @property
    def sqlalchemy_url(self) -> str:
        if self.url is None:
            raise RuntimeError("DATABASE_URL is not set and no embedded server was started")
        return to_sqlalchemy_url(self.url)

    @property
    def direct_sqlalchemy_url(self) -> str:
        """PostgreSQL without a pooler in between: DATABASE_DIRECT_URL, else DATABASE_URL."""
        return to_sqlalchemy_url(self.direct_url) if self.direct_url else self.sqlalchemy_url

    @property
    def read_sqlalchemy_url(self) -> str:
        """Where reports read: DATABASE_READ_URL, else DATABASE_URL."""
        return to_sqlalchemy_url(self.read_url) if self.read_url else self.sqlalchemy_url


def to_sqlalchemy_url(url: str) -> str:
    """postgresql://… or postgres://… → postgresql+psycopg://…; other drivers pass through."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


ConfigSource = Callable[[], DatabaseConfig]
_source: ConfigSource = DatabaseConfig.from_environment


def configure(source: ConfigSource) -> None:
    """Take the configuration from `source` from now on (read whenever an engine is built)."""
    global _source
    _source = source


def database_config() -> DatabaseConfig:
    """The configuration as the process's source gives it now."""
    return _source()
