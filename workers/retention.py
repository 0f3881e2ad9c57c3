"""Retention, by the seed's policy: old data leaves by partition, or in bounded batches.

| data | kept | how it leaves |
|---|---|---|
| lifecycle_events | 2 years | monthly partition archived (CSV.gz + manifest, row count checked), then dropped |
| trigger_executions | 90 days | monthly partition dropped |
| metrics_daily | 3 years | yearly partition dropped |
| workflow_executions | 1 year (terminal ones) | deleted in batches of 1,000 with their steps |
| user_lifecycle_history | forever | - |
| event_outbox | PUBLISHED 7 days, FAILED 30 days | deleted |
| event_inbox (dedupe ledger) | 30 days | deleted: redeliveries come within hours |
| dead_letters | replayed/discarded 30 days, pending 90 days | deleted |

A partition leaves only when its whole range is past the cutoff. It is detached
first with a short lock_timeout, so a busy fleet makes the job retry tomorrow
rather than queue behind it (DETACH … CONCURRENTLY is refused by PostgreSQL when
the table has a DEFAULT partition, which ours must have). Rows for a detached
range that still arrive land in the DEFAULT partition: nothing is refused. A run
that dies between DETACH and DROP leaves a plain table behind; the next run finds
it by name and finishes the job (`fleet chaos retention` injects that race).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, text

from db.bulk import driver_connection
from db.models import PARTITIONED_TABLES
from db.partitions import PartitionRange, default_partition_name, existing_partitions
from workers.engine import executions
from workers.log import get_logger
from workers.privacy.archives import archive_scrubber

log = get_logger(__name__)

LIFECYCLE_EVENTS_DAYS = 730
TRIGGER_EXECUTIONS_DAYS = 90
METRICS_DAYS = 3 * 365
EXECUTIONS_DAYS = 365
BATCH = 1000
LOCK_TIMEOUT = "5s"

ROW_DELETES: dict[str, str] = {
    "event_outbox": "(status = 'PUBLISHED' AND published_at < now() - interval '7 days') OR "
                    "(status = 'FAILED' AND created_at < now() - interval '30 days')",
    "event_inbox": "received_at < now() - interval '30 days'",
    "dead_letters": "(status IN ('replayed', 'discarded') AND received_at < now() - interval "
                    "'30 days') OR (status = 'pending' AND received_at < now() - interval '90 days')",
}


@dataclass(frozen=True)
class RetentionReport:
    """What a run dropped, archived and deleted (with `dry_run`: what it would)."""

    dry_run: bool
    dropped: tuple[str, ...]  # partitions
    archived: tuple[str, ...]  # partitions, before they were dropped
    deleted: Mapping[str, int]  # rows by table


def _range_of(table: str, name: str) -> PartitionRange | None:
    """The range a partition named by db/partitions.py covers (None for the default)."""
    suffix = name.removeprefix(table + "_")
    try:
        if len(suffix) == 4:
            year = int(suffix)
            return PartitionRange(table, dt.date(year, 1, 1), dt.date(year + 1, 1, 1))
        year, month = (int(p) for p in suffix.split("_"))
    except ValueError:
        return None
    start = dt.date(year, month, 1)
    return PartitionRange(table, start, dt.date(year + (month == 12), month % 12 + 1, 1))


def expired_partitions(engine: Engine, table: str, cutoff: dt.date) -> list[PartitionRange]:
    """Expired partitions of `table`, attached or already detached by an interrupted run."""
    with engine.connect() as conn:
        names = existing_partitions(conn, table) + detached_partitions(conn, table)
    ranges = [_range_of(table, n) for n in names if n != default_partition_name(table)]
    return [r for r in ranges if r is not None and r.end <= cutoff]


def detached_partitions(conn: Connection, table: str) -> list[str]:
    """Plain tables named like `table`'s partitions: detached by a run that died before DROP."""
    pattern = f"{table}_" + ("[0-9]{4}" if PARTITIONED_TABLES[table][1] == "year"
                             else "[0-9]{4}_[0-9]{2}")
    return list(conn.execute(text(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind = 'r' AND NOT c.relispartition "
        "AND c.relname ~ :pattern"), {"pattern": f"^{pattern}$"}).scalars())


def _detach(engine: Engine, rng: PartitionRange) -> None:
    """Detach unless a previous run did; a short lock_timeout, so a busy fleet is not held up.

    DETACH locks the partitioned table and then, for its foreign keys, the referenced
    tables (`users`). Writers lock in the other order (a user row, then the audit
    insert), which deadlocked; so the referenced tables are locked first, as writers do.
    """
    with engine.begin() as conn:
        if rng.name not in existing_partitions(conn, rng.table):
            return
        conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        for referenced in conn.execute(text(
                "SELECT DISTINCT confrelid::regclass::text AS t FROM pg_constraint "
                "WHERE conrelid = CAST(:t AS regclass) AND contype = 'f' ORDER BY t"),
                {"t": rng.table}).scalars():
            conn.execute(text(f"LOCK TABLE {referenced} IN SHARE ROW EXCLUSIVE MODE"))
        conn.execute(text(f"ALTER TABLE {rng.table} DETACH PARTITION {rng.name}"))


def _drop(engine: Engine, rng: PartitionRange) -> None:
    """Drop a detached partition: its foreign keys one at a time, then the table.

    Dropping a foreign key locks both tables ACCESS EXCLUSIVE. A DROP TABLE drops them
    all in one transaction: holding `workflow_executions` and waiting for `users`, it
    deadlocked with an ingest holding `users` and waiting for `workflow_executions`.
    One key a transaction waits for one busy table only, while holding nothing anyone
    else uses (the detached partition), so it can wait but never deadlock.
    """
    with engine.connect() as conn:
        keys = conn.execute(text(
            "SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass) "
            "AND contype = 'f' ORDER BY conname"), {"t": rng.name}).scalars().all()
    for key in keys:
        with engine.begin() as conn:
            conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            conn.execute(text(f'ALTER TABLE {rng.name} DROP CONSTRAINT "{key}"'))
    with engine.begin() as conn:
        conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        conn.execute(text(f"DROP TABLE {rng.name}"))


def archive_partition(engine: Engine, rng: PartitionRange, archive_dir: Path) -> Path:
    """Write a detached partition to CSV.gz with a manifest; checks the row count."""
    archive_dir.mkdir(parents=True, exist_ok=True)
    data_path = archive_dir / f"{rng.name}.csv.gz"
    digest = hashlib.sha256()
    with engine.connect() as conn:
        # A month of audit rows takes a while; LOCAL: a pooled server connection keeps nothing.
        conn.execute(text("SET LOCAL statement_timeout = 0"))
        expected = conn.execute(text(f"SELECT count(*) FROM {rng.name}")).scalar_one()
        columns = [c for c in conn.execute(text(
            "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"), {"t": rng.name}).scalars()]
        scrubber = archive_scrubber(conn, rng.table)  # erased users' rows, scrubbed as written
        with gzip.open(data_path, "wb") as out, driver_connection(conn).cursor() as cur, cur.copy(
                f"COPY {rng.name} TO STDOUT (FORMAT csv, HEADER true)") as copy:
            for chunk in scrubber.filter(copy) if scrubber else copy:
                digest.update(chunk)
                out.write(chunk)
    with gzip.open(data_path, "rt", newline="") as check:
        rows = sum(1 for _ in csv.reader(check)) - 1  # header
    if rows != expected:
        raise RuntimeError(f"archive of {rng.name} has {rows} rows, the partition {expected}")
    manifest = {
        "table": rng.table, "partition": rng.name, "from": rng.start.isoformat(),
        "to": rng.end.isoformat(), "rows": rows, "columns": columns, "format": "csv+gzip",
        "sha256_of_csv": digest.hexdigest(), "archived_at": dt.datetime.now(dt.UTC).isoformat(),
        "scrubbed_rows": scrubber.scrubbed if scrubber else 0,
    }
    (archive_dir / f"{rng.name}.manifest.json").write_text(json.dumps(manifest, indent=2))
    return data_path


def run_retention(engine: Engine, archive_dir: Path, today: dt.date | None = None,
                  dry_run: bool = False) -> RetentionReport:
    """Apply every policy above; with `dry_run`, only report what would go."""
    today = today or dt.datetime.now(dt.UTC).date()
    dropped: list[str] = []
    archived: list[str] = []
    plans = (("lifecycle_events", LIFECYCLE_EVENTS_DAYS, True),
             ("trigger_executions", TRIGGER_EXECUTIONS_DAYS, False),
             ("metrics_daily", METRICS_DAYS, False))
    for table, days, archive in plans:
        for rng in expired_partitions(engine, table, today - dt.timedelta(days=days)):
            if dry_run:
                (archived if archive else dropped).append(rng.name)
                continue
            _detach(engine, rng)
            if archive:
                archive_partition(engine, rng, archive_dir)
                archived.append(rng.name)
            _drop(engine, rng)
            dropped.append(rng.name)
            log.info("retention.partition_dropped", partition=rng.name, archived=archive)
    deleted = {"workflow_executions": _delete_old_executions(engine, today, dry_run)}
    for table, where in ROW_DELETES.items():
        with engine.begin() as conn:
            sql = f"SELECT count(*) FROM {table} WHERE {where}" if dry_run else \
                f"WITH gone AS (DELETE FROM {table} WHERE {where} RETURNING 1) SELECT count(*) FROM gone"
            deleted[table] = conn.execute(text(sql)).scalar_one()
    log.info("retention.done", dry_run=dry_run, dropped=dropped, archived=archived,
             deleted=deleted)
    return RetentionReport(dry_run, tuple(dropped), tuple(archived), deleted)


def _delete_old_executions(engine: Engine, today: dt.date, dry_run: bool) -> int:
    """Terminal executions older than a year, 1,000 per transaction."""
    cutoff = dt.datetime.combine(today - dt.timedelta(days=EXECUTIONS_DAYS), dt.time(), dt.UTC)
    if dry_run:
        with engine.connect() as conn:
            return executions.count_ended_before(conn, cutoff)
    total = 0
    while True:
        with engine.begin() as conn:
            gone = executions.delete_ended_before(conn, cutoff, BATCH)
        total += gone
        if gone < BATCH:
            return total

