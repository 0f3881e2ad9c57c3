"""Engine and sessions: one lazily built engine per process, disposed after fork."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from db.config import database_config

_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None


def get_engine() -> Engine:
    """The process's engine, built on first use from the configuration (db/config.py)."""
    global _engine, _factory
    if _engine is None:
        config = database_config()
        options = f"-c statement_timeout={config.statement_timeout_ms} -c timezone=UTC"
        _engine = create_engine(
            config.sqlalchemy_url,
            pool_size=config.pool_size,
            max_overflow=config.max_overflow,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={"options": options, "application_name": "lifecycle-fleet"},
        )
        _factory = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def dispose_engine() -> None:
    """Forget the engine without closing the parent's sockets (call in a forked child).

    A pool must not cross fork: the child would share the parent's connections.
    `close=False` drops the inherited pool without sending a terminate message on
    sockets the parent still uses.
    """
    global _engine, _factory
    if _engine is not None:
        _engine.dispose(close=False)
    _engine = None
    _factory = None


def reset_engine() -> None:
    """Close the engine's connections (configuration changed, or the process is ending)."""
    global _engine, _factory
    if _engine is not None:
        _engine.dispose()
    _engine = None
    _factory = None


def new_session() -> Session:
    """A session on the process's engine; the caller owns commit and close."""
    get_engine()
    assert _factory is not None
    return _factory()


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
