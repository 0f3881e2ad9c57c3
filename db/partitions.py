"""Range partitions of the audit and metrics tables: naming, bounds, creation.

Each partitioned table has a DEFAULT partition, so a row whose timestamp has no
partition yet is never refused. Creating a partition moves the rows that landed
in the default for its range into it, in the same transaction, so maintenance can
"split" the default at any time.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from sqlalchemy import Connection, text

from db import tenancy
from db.models import PARTITIONED_TABLES


@dataclass(frozen=True)
class PartitionRange:
    table: str
    start: dt.date
    end: dt.date

    @property
    def name(self) -> str:
        if self.interval == "year":
            return f"{self.table}_{self.start:%Y}"
        return f"{self.table}_{self.start:%Y_%m}"

    @property
    def interval(self) -> str:
        return PARTITIONED_TABLES[self.table][1]

    @property
    def column(self) -> str:
        return PARTITIONED_TABLES[self.table][0]

    def bound(self, day: dt.date) -> str:
        """A partition bound literal; timestamptz bounds are pinned to UTC."""
        if self.column == "metric_date":
            return f"'{day.isoformat()}'"
        return f"'{day.isoformat()} 00:00:00+00'"


def default_partition_name(table: str) -> str:
    return f"{table}_default"


def range_containing(table: str, day: dt.date) -> PartitionRange:
    """The partition range (month or year, by table) that contains `day`."""
    interval = PARTITIONED_TABLES[table][1]
    if interval == "year":
        start = dt.date(day.year, 1, 1)
        return PartitionRange(table, start, dt.date(day.year + 1, 1, 1))
    start = dt.date(day.year, day.month, 1)
    end = dt.date(day.year + (day.month == 12), day.month % 12 + 1, 1)
    return PartitionRange(table, start, end)


def ranges_ahead(table: str, today: dt.date, count: int) -> list[PartitionRange]:
    """The range containing `today` and the `count` ranges after it."""
    ranges = [range_containing(table, today)]
    for _ in range(count):
        ranges.append(range_containing(table, ranges[-1].end))
    return ranges


def create_default_partition(conn: Connection, table: str) -> None:
    conn.execute(
        text(
            f"CREATE TABLE IF NOT EXISTS {default_partition_name(table)} "
            f"PARTITION OF {table} DEFAULT"
        )
    )
    _secure(conn, table, default_partition_name(table))


def _secure(conn: Connection, parent: str, partition: str) -> None:
    """Give a new partition its parent's workspace policy (when the parent has one, i.e.
    after migration 0021): a query naming the partition itself is bound as well."""
    secured = conn.execute(text("SELECT relrowsecurity FROM pg_class WHERE oid = "
                                "CAST(:t AS regclass)"), {"t": parent}).scalar()
    if secured:
        for statement in tenancy.policy_sql(partition):
            conn.execute(text(statement))


def existing_partitions(conn: Connection, table: str) -> list[str]:
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE p.relname = :table ORDER BY c.relname"
        ),
        {"table": table},
    )
    return [r[0] for r in rows]


def ensure_partition(conn: Connection, rng: PartitionRange) -> bool:
    """Create `rng`'s partition if missing, moving its rows out of the default.

    Returns True when a partition was created. Run inside a transaction: the
    move and the attach commit together or not at all.
    """
    if rng.name in existing_partitions(conn, rng.table):
        return False
    default = default_partition_name(rng.table)
    lo, hi = rng.bound(rng.start), rng.bound(rng.end)
    where = f"{rng.column} >= {lo} AND {rng.column} < {hi}"
    stray = conn.execute(text(f"SELECT EXISTS (SELECT 1 FROM {default} WHERE {where})")).scalar()
    if not stray:
        conn.execute(
            text(f"CREATE TABLE {rng.name} PARTITION OF {rng.table} FOR VALUES FROM ({lo}) TO ({hi})")
        )
        _secure(conn, rng.table, rng.name)
        return True
    # Rows for this range sit in the default partition: PostgreSQL refuses to
    # create the partition over them, so build it beside, move them, attach.
    conn.execute(
        text(f"CREATE TABLE {rng.name} (LIKE {rng.table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    )
    conn.execute(
        text(
            f"WITH moved AS (DELETE FROM {default} WHERE {where} RETURNING *) "
            f"INSERT INTO {rng.name} SELECT * FROM moved"
        )
    )
    conn.execute(
        text(f"ALTER TABLE {rng.table} ATTACH PARTITION {rng.name} FOR VALUES FROM ({lo}) TO ({hi})")
    )
    _secure(conn, rng.table, rng.name)
    return True


def split_default(conn: Connection, table: str) -> list[str]:
    """Give every range that has rows in the DEFAULT partition a partition of its own."""
    column, interval = PARTITIONED_TABLES[table]
    unit = "year" if interval == "year" else "month"
    starts = conn.execute(text(
        f"SELECT DISTINCT date_trunc('{unit}', {column} AT TIME ZONE 'UTC')::date "
        f"FROM {default_partition_name(table)}"
    )).scalars()
    created = []
    for start in sorted(starts):
        rng = range_containing(table, start)
        if ensure_partition(conn, rng):
            created.append(rng.name)
    return created


MONTHS_AHEAD = 3
YEARS_AHEAD = 1


def ensure_partitions_ahead(conn: Connection, today: dt.date,
                            split_stray_rows: bool = False) -> list[str]:
    """Default partitions plus this period's and the next ones, for every partitioned table.

    With `split_stray_rows`, rows that landed in a DEFAULT partition (far past or
    future timestamps) are moved into partitions of their own as well.
    """
    created: list[str] = []
    for table, (_, interval) in PARTITIONED_TABLES.items():
        create_default_partition(conn, table)
        ahead = YEARS_AHEAD if interval == "year" else MONTHS_AHEAD
        for rng in ranges_ahead(table, today, ahead):
            if ensure_partition(conn, rng):
                created.append(rng.name)
        if split_stray_rows:
            created += split_default(conn, table)
    return created


@dataclass(frozen=True)
class Coverage:
    table: str
    missing: list[str]  # expected ranges (now and ahead) without a partition
    unexpected: list[str]  # partitions whose name is not one this module makes
    default_rows: int  # rows waiting in the DEFAULT partition for a partition of their own


def coverage(conn: Connection, today: dt.date) -> list[Coverage]:
    """What maintenance should have made and has not, per partitioned table."""
    report = []
    for table, (_, interval) in PARTITIONED_TABLES.items():
        names = set(existing_partitions(conn, table))
        ahead = YEARS_AHEAD if interval == "year" else MONTHS_AHEAD
        missing = [r.name for r in ranges_ahead(table, today, ahead) if r.name not in names]
        pattern = re.escape(table) + r"_(\d{4}|\d{4}_\d{2}|default)$"
        unexpected = sorted(n for n in names if not re.match(pattern, n))
        default_rows = 0
        if default_partition_name(table) in names:
            default_rows = conn.execute(
                text(f"SELECT count(*) FROM {default_partition_name(table)}")).scalar_one()
        else:
            missing.append(default_partition_name(table))
        report.append(Coverage(table, missing, unexpected, default_rows))
    return report
