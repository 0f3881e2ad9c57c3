"""The database layer's own configuration: where PostgreSQL is and how to pool connections.

`db` depends on nothing above it. By default it reads DATABASE_URL and the
FLEET_DB_* pool settings from the environment; a process that resolves them
another way (the fleet's settings, which fall back to the embedded server) hands
`configure` a source, read each time an engine is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DatabaseConfig:
    url: str | None  # postgresql://…; None: no database configured
    pool_size: int = 5
    max_overflow: int = 5
    statement_timeout_ms: int = 60_000  # 0 disables it

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> DatabaseConfig:
        def number(name: str, default: int) -> int:
            return int(environ.get(name) or default)

        return cls(url=environ.get("DATABASE_URL") or None,
                   pool_size=number("FLEET_DB_POOL_SIZE", cls.pool_size),
                   max_overflow=number("FLEET_DB_MAX_OVERFLOW", cls.max_overflow),
                   statement_timeout_ms=number("FLEET_DB_STATEMENT_TIMEOUT_MS",
                                               cls.statement_timeout_ms))

    @property
    def sqlalchemy_url(self) -> str:
        if self.url is None:
            raise RuntimeError("DATABASE_URL is not set and no embedded server was started")
        return to_sqlalchemy_url(self.url)


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
