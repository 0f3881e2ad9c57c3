"""Alembic environment: migrates the URL given by the caller, else the configured one."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from db.config import database_config, to_sqlalchemy_url
from db.migrate import skip_partitions
from db.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    # Not through a transaction pooler: DATABASE_DIRECT_URL when set (db/config.py).
    given = config.get_main_option("sqlalchemy.url")
    return to_sqlalchemy_url(given) if given else database_config().direct_sqlalchemy_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        include_name = skip_partitions(connection)
        connection.commit()  # end the autobegun read, so Alembic's own transaction commits
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            include_name=include_name,
            compare_type=True,
            compare_server_default=True,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
