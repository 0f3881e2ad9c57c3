"""Run Alembic migrations from code (CLI, tests, dev): the only way the schema is made.

Give them a URL that reaches PostgreSQL itself (DATABASE_DIRECT_URL), not a transaction
pooler: a migration may run long and hold locks, and psycopg would prepare its repeated
statements on a server connection the pooler hands to others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text

from db.models import Base

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a '%' in a password must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def skip_partitions(connection: Connection) -> Callable[[str | None, str, Any], bool]:
    """An Alembic `include_name` hook that ignores partitions.

    Partitions are made by db/partitions.py at run time, not described by models;
    the partitioned parents are compared like any table.
    """
    partitions = set(
        connection.execute(text("SELECT relname FROM pg_class WHERE relispartition")).scalars()
    )

    def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        return not (type_ == "table" and name in partitions)

    return include_name


def schema_drift(connection: Connection) -> list[Any]:
    """Differences between the migrated database and the models; [] when they agree."""
    context = MigrationContext.configure(
        connection,
        opts={
            "include_name": skip_partitions(connection),
            "compare_type": True,
            "compare_server_default": True,
        },
    )
    return list(compare_metadata(context, Base.metadata))
