"""The schema made by the migrations: the seed contract, no drift from the models,
and a clean downgrade/upgrade round trip."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect, text

from db.migrate import downgrade, schema_drift, upgrade

pytestmark = pytest.mark.servers

SEED = Path(__file__).parent / "contract" / "seed_001_schema.md"

SEED_TYPES = {
    "UUID": "uuid",
    "JSONB": "jsonb",
    "TEXT": "text",
    "BOOLEAN": "boolean",
    "DATE": "date",
    "NUMERIC": "numeric",
    "BIGSERIAL": "bigint",
    "TIMESTAMP WITH TIME ZONE": "timestamp with time zone",
}


@dataclass
class SeedTable:
    name: str
    columns: dict[str, tuple[str, bool]] = field(default_factory=dict)  # name: (type, not null)
    checks: list[str] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)


def _pg_type(seed_type: str) -> str:
    if m := re.fullmatch(r"VARCHAR\((\d+)\)(\[\])?", seed_type):
        return f"character varying({m.group(1)}){m.group(2) or ''}"
    return SEED_TYPES[seed_type]


def parse_seed() -> dict[str, SeedTable]:
    """Tables, columns (type, NOT NULL), CHECK names and index names of the seed schema (the contract)."""
    text_ = SEED.read_text()
    tables: dict[str, SeedTable] = {}
    for m in re.finditer(r"CREATE TABLE (\w+) \((.*?)\n\);", text_, re.S):
        table = tables[m.group(1)] = SeedTable(m.group(1))
        for line in m.group(2).splitlines():
            line = line.strip().rstrip(",")
            if c := re.match(r"CONSTRAINT (\w+) CHECK", line):
                table.checks.append(c.group(1))
            elif col := re.match(
                r"(\w+) (TIMESTAMP WITH TIME ZONE|VARCHAR\(\d+\)(?:\[\])?|"
                r"UUID|JSONB|TEXT|BOOLEAN|DATE|NUMERIC|BIGSERIAL)(?=[\s,]|$)(.*)", line
            ):
                name, type_, rest = col.groups()
                not_null = "NOT NULL" in rest or "PRIMARY KEY" in rest
                table.columns[name] = (_pg_type(type_), not_null)
    for m in re.finditer(r"CREATE INDEX (\w+) ON (\w+)", text_):
        tables[m.group(2)].indexes.append(m.group(1))
    return tables


SEED_TABLES = parse_seed()


def test_seed_parser_sees_the_whole_contract() -> None:
    # Guards the test itself: a parser that found nothing would pass everything.
    assert len(SEED_TABLES) == 10
    assert sum(len(t.columns) for t in SEED_TABLES.values()) == 71
    assert sum(len(t.indexes) for t in SEED_TABLES.values()) == 23


@pytest.mark.parametrize("table", sorted(SEED_TABLES))
def test_seed_table_matches_contract(engine: Engine, table: str) -> None:
    seed = SEED_TABLES[table]
    with engine.connect() as conn:
        columns = {
            row.attname: (row.type, row.attnotnull)
            for row in conn.execute(
                text(
                    "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull "
                    "FROM pg_attribute a WHERE a.attrelid = CAST(:t AS regclass) "
                    "AND a.attnum > 0 AND NOT a.attisdropped"
                ),
                {"t": table},
            )
        }
        checks = set(
            conn.execute(
                text("SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass) "
                     "AND contype = 'c'"),
                {"t": table},
            ).scalars()
        )
        indexes = set(
            conn.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = :t"),
                         {"t": table}).scalars()
        )
    for name, (type_, not_null) in seed.columns.items():
        assert name in columns, f"{table}.{name} missing"
        assert columns[name][0] == type_, f"{table}.{name}: {columns[name][0]} != {type_}"
        if not_null:
            assert columns[name][1], f"{table}.{name} must be NOT NULL"
    assert set(seed.checks) <= checks
    assert set(seed.indexes) <= indexes


def test_partitioned_tables_are_partitioned(engine: Engine) -> None:
    with engine.connect() as conn:
        kinds = dict(conn.execute(text(
            "SELECT relname, pg_get_partkeydef(oid) FROM pg_class WHERE relkind = 'p'"
        )).all())
    assert kinds == {
        "lifecycle_events": "RANGE (created_at)",
        "trigger_executions": "RANGE (executed_at)",
        "metrics_daily": "RANGE (metric_date)",
    }


def test_migrations_match_models(engine: Engine) -> None:
    with engine.connect() as conn:
        assert schema_drift(conn) == []


def test_drift_check_can_fail(fresh_database: str) -> None:
    upgrade(fresh_database)
    eng = create_engine(fresh_database)
    with eng.begin() as conn:
        conn.execute(text("ALTER TABLE users ADD COLUMN nickname text"))
        conn.execute(text("DROP INDEX idx_users_created_at"))
    with eng.connect() as conn:
        drift = schema_drift(conn)
    eng.dispose()
    kinds = {d[0] if isinstance(d, tuple) else d[0][0] for d in drift}
    assert {"remove_column", "add_index"} <= kinds


def test_downgrade_then_upgrade(fresh_database: str) -> None:
    upgrade(fresh_database)
    downgrade(fresh_database, "base")
    eng = create_engine(fresh_database)
    assert set(inspect(eng).get_table_names()) == {"alembic_version"}
    eng.dispose()
    upgrade(fresh_database)
    eng = create_engine(fresh_database)
    with eng.connect() as conn:
        assert schema_drift(conn) == []
        assert conn.execute(text("SELECT count(*) FROM pg_class WHERE relispartition")).scalar() > 3
    eng.dispose()
