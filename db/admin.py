"""Create and drop whole databases (test sessions, benchmark runs)."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from db.config import to_sqlalchemy_url


def _run(admin_url: str, sql: str) -> None:
    engine = create_engine(to_sqlalchemy_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def create_database(admin_url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of `admin_url`; returns its URL."""
    _run(admin_url, f'CREATE DATABASE "{name}"')
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    """DROP DATABASE `name`, closing whatever connections it still has."""
    _run(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
