"""Partitions: writes outside existing ranges never fail, and maintenance splits them out."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import Engine, text

from db.partitions import (
    ensure_partition,
    ensure_partitions_ahead,
    existing_partitions,
    range_containing,
    ranges_ahead,
)

pytestmark = pytest.mark.servers


def test_ranges() -> None:
    assert range_containing("lifecycle_events", dt.date(2026, 12, 31)).name == "lifecycle_events_2026_12"
    assert range_containing("lifecycle_events", dt.date(2026, 12, 31)).end == dt.date(2027, 1, 1)
    assert range_containing("metrics_daily", dt.date(2026, 6, 1)).name == "metrics_daily_2026"
    months = [r.name for r in ranges_ahead("trigger_executions", dt.date(2026, 11, 22), 3)]
    assert months == [f"trigger_executions_{m}" for m in ("2026_11", "2026_12", "2027_01", "2027_02")]


def _partition_of(conn, table: str, where: str) -> str:  # type: ignore[no-untyped-def]
    return conn.execute(text(f"SELECT tableoid::regclass::text FROM {table} WHERE {where}")).scalar_one()


def test_migration_made_current_and_next_months(engine: Engine) -> None:
    today = dt.datetime.now(dt.UTC).date()
    with engine.connect() as conn:
        names = existing_partitions(conn, "lifecycle_events")
    for rng in ranges_ahead("lifecycle_events", today, 3):
        assert rng.name in names
    assert "lifecycle_events_default" in names


def test_far_past_and_future_rows_are_kept_then_split_out(engine: Engine) -> None:
    marker = str(uuid.uuid4())
    past = dt.datetime(1999, 3, 15, 12, tzinfo=dt.UTC)
    future = dt.datetime(2101, 7, 4, 23, 59, tzinfo=dt.UTC)
    with engine.begin() as conn:
        for when in (past, future):
            conn.execute(
                text("INSERT INTO lifecycle_events (event_type, event_data, created_at) "
                     "VALUES ('test.far', CAST(:d AS jsonb), :at)"),
                {"d": f'{{"marker": "{marker}"}}', "at": when},
            )
            conn.execute(
                text("INSERT INTO metrics_daily (metric_date, lifecycle_stage, metric_name, "
                     "metric_value) VALUES (:d, 'Activation', :name, 1)"),
                {"d": when.date(), "name": marker},
            )
    where = f"event_data->>'marker' = '{marker}' AND created_at = '{future.isoformat()}'"
    with engine.begin() as conn:
        assert _partition_of(conn, "lifecycle_events", where) == "lifecycle_events_default"
        created = ensure_partition(conn, range_containing("lifecycle_events", future.date()))
        assert created
        assert _partition_of(conn, "lifecycle_events", where) == "lifecycle_events_2101_07"
        assert ensure_partition(conn, range_containing("metrics_daily", past.date()))
        assert _partition_of(conn, "metrics_daily", f"metric_name = '{marker}' AND "
                             "metric_date < '2000-01-01'") == "metrics_daily_1999"
        # Idempotent: a second call creates nothing.
        assert not ensure_partition(conn, range_containing("lifecycle_events", future.date()))
        total = conn.execute(text(
            f"SELECT count(*) FROM lifecycle_events WHERE event_data->>'marker' = '{marker}'"
        )).scalar()
    assert total == 2


def test_ensure_partitions_ahead_is_idempotent(engine: Engine) -> None:
    with engine.begin() as conn:
        assert ensure_partitions_ahead(conn, dt.datetime.now(dt.UTC).date()) == []


def test_stray_rows_of_any_period_get_partitions_of_their_own(engine: Engine) -> None:
    from db.partitions import split_default

    when = dt.datetime(1987, 5, 17, 9, tzinfo=dt.UTC)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO lifecycle_events (event_type, created_at) "
                          "VALUES ('test.stray', :at)"), {"at": when})
        assert "lifecycle_events_1987_05" in split_default(conn, "lifecycle_events")
        assert split_default(conn, "lifecycle_events") == []
        assert _partition_of(conn, "lifecycle_events", "event_type = 'test.stray'") == \
            "lifecycle_events_1987_05"
        remaining = conn.execute(text("SELECT count(*) FROM lifecycle_events_default")).scalar()
    assert remaining == 0
