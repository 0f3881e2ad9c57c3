"""Engines and sessions: lazily built engines per process, disposed after fork.

Two engines at most: the primary's (`get_engine`, every write) and the replica's
(`read_engine`, reports and status figures, only when DATABASE_READ_URL is set; else it
is the primary's). Every session runs with the statement timeout and in UTC. Directly
connected, the server sets both at connect (the `options` startup parameter, free per
transaction). Behind a transaction pooler (`FLEET_DB_POOLER`) a server connection
serves other clients between our transactions, so nothing may live in the session:
PgBouncer refuses the `options` parameter, and a prepared statement would be missing
on the next server connection. There psycopg prepares nothing and each transaction sets
both for itself at its start (`set_config(..., true)`, the same as SET LOCAL).

Every transaction also begins by setting its workspace, the tenant row-level security
keys on (db/tenancy.py), in the same statement.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from db import tenancy
from db.config import database_config, to_sqlalchemy_url

APPLICATION_NAME = "lifecycle-fleet"

_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None
_read_engine: Engine | None = None
_read_factory: sessionmaker[Session] | None = None


def build_engine(url: str, *, pooler: str | None, statement_timeout_ms: int,
                 application_name: str = APPLICATION_NAME, connect_timeout: int | None = None,
                 pool_size: int = 5, max_overflow: int = 5) -> Engine:
    """An engine whose transactions run in UTC under the statement timeout, connected
    directly (`pooler` None) or through a transaction pooler."""
    connect_args: dict[str, Any] = {"application_name": application_name}
    if connect_timeout is not None:
        connect_args["connect_timeout"] = connect_timeout
    if pooler is None:
        connect_args["options"] = f"-c statement_timeout={statement_timeout_ms} -c timezone=UTC"
    else:
        connect_args["prepare_threshold"] = None  # psycopg: never prepare a statement
    engine = create_engine(to_sqlalchemy_url(url), pool_size=pool_size,
                           max_overflow=max_overflow, pool_pre_ping=True, pool_recycle=1800,
                           connect_args=connect_args)
    pooled = (f"set_config('statement_timeout', '{int(statement_timeout_ms)}', true), "
              "set_config('TimeZone', 'UTC', true)") if pooler is not None else None

    @event.listens_for(engine, "begin")
    def _transaction_settings(conn: Connection) -> None:
        # The workspace (db/tenancy.py; raises NoWorkspace when none is set) and, behind
        # a pooler, the session settings: one statement, local to the transaction, so
        # nothing reaches the next client of a pooled server connection.
        tenant = tenancy.tenant_setting()
        settings = ", ".join(part for part in (pooled, tenant) if part)
        if settings:
            conn.exec_driver_sql(f"SELECT {settings}")

    return engine


def get_engine() -> Engine:
    """The process's engine on the primary, built on first use from the configuration
    (db/config.py)."""
    global _engine, _factory
    if _engine is None:
        config = database_config()
        _engine = build_engine(config.sqlalchemy_url, pooler=config.pooler,
                               statement_timeout_ms=config.statement_timeout_ms,
                               pool_size=config.pool_size, max_overflow=config.max_overflow)
        _factory = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def read_engine() -> Engine:
    """The engine reports read with: the replica's (DATABASE_READ_URL), else the primary's."""
    global _read_engine, _read_factory
    if _read_engine is None:
        config = database_config()
        if config.read_url is None:
            _read_engine = get_engine()
        else:
            _read_engine = build_engine(config.read_sqlalchemy_url, pooler=config.pooler,
                                        statement_timeout_ms=config.statement_timeout_ms,
                                        pool_size=config.pool_size,
                                        max_overflow=config.max_overflow)
        # READ ONLY, on the primary too: a report that wrote would work there and fail on
        # a replica, so it fails everywhere.
        _read_factory = sessionmaker(_read_engine.execution_options(postgresql_readonly=True),
                                     expire_on_commit=False)
    return _read_engine


def _forget(close: bool) -> None:
    global _engine, _factory, _read_engine, _read_factory
    for engine in {id(e): e for e in (_engine, _read_engine) if e is not None}.values():
        engine.dispose(close=close)
    _engine = _factory = _read_engine = _read_factory = None


def dispose_engine() -> None:
    """Forget the engines without closing the parent's sockets (call in a forked child).

    A pool must not cross fork: the child would share the parent's connections.
    `close=False` drops the inherited pool without sending a terminate message on
    sockets the parent still uses.
    """
    _forget(close=False)


def reset_engine() -> None:
    """Close the engines' connections (configuration changed, or the process is ending)."""
    _forget(close=True)


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


@contextmanager
def read_session() -> Iterator[Session]:
    """One read-only transaction on the replica when DATABASE_READ_URL is set, else on the
    primary: for reports and status figures, which may trail the primary by the replica's
    replay lag. Nothing is committed."""
    read_engine()
    assert _read_factory is not None
    with _read_factory() as session:
        yield session


def without_statement_timeout(session: Session) -> Session:
    """Run every transaction of `session` without the statement timeout (bulk loads,
    benchmarks): SET LOCAL at each begin, so a pooled server connection never keeps it."""

    @event.listens_for(session, "after_begin")
    def _no_timeout(_session: Session, _transaction: SessionTransaction,
                    connection: Connection) -> None:
        connection.exec_driver_sql("SET LOCAL statement_timeout = 0")

    return session
