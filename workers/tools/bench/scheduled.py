"""`fleet bench segments` and `fleet bench metrics`: the beat's set-based jobs at scale.

segments: a dynamic segment refreshed over 1,000,000 generated users, against the
bare `INSERT … SELECT` of the same predicate into an unlogged copy of the table,
both in the same session and database. metrics: the nightly aggregation of one
day holding 5,000,000 generated audit events.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from typing import Any

from sqlalchemy import MetaData, insert, literal, select, text

from db.admin import create_database, drop_database
from db.config import to_sqlalchemy_url
from db.migrate import upgrade
from db.models import User, UserSegmentMembership
from db.session import reset_engine
from workers.rules.conditions import parse
from workers.rules.sql_backend import compile_sql
from workers.settings import Settings, get_settings

SEGMENT = {"all": [{"field": "user.attributes.plan", "op": "eq", "value": "pro"},
                   {"field": "user.attributes.score", "op": "gte", "value": 50}]}


class ScratchDatabase:
    """A migrated database of its own on the configured server, dropped afterwards."""

    def __init__(self) -> None:
        base = Settings()
        if base.database_url is None:
            raise RuntimeError("no database: run through `fleet bench`")
        self.admin_url = base.database_url
        self.name = f"fleet_bench_{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> str:
        self.saved = os.environ.get("DATABASE_URL")  # _session_for points it at the scratch one
        url = create_database(self.admin_url, self.name)
        upgrade(to_sqlalchemy_url(url))
        return url

    def __exit__(self, *exc: Any) -> None:
        reset_engine()
        drop_database(self.admin_url, self.name)
        if self.saved is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = self.saved
        get_settings.cache_clear()


def _session_for(url: str) -> Any:
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    reset_engine()
    from db.session import new_session, without_statement_timeout

    return without_statement_timeout(new_session())  # generating millions of rows


def bench_segments(users: int = 1_000_000) -> dict[str, Any]:
    from workers.rules.segments import refresh_segment

    with ScratchDatabase() as url:
        session = _session_for(url)
        session.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage, attributes) "
            "SELECT 'u' || i || '@example.com', 'Activation', jsonb_build_object("
            "'plan', CASE WHEN i % 4 = 0 THEN 'pro' ELSE 'free' END, 'score', i % 100) "
            "FROM generate_series(1, :n) AS i"), {"n": users})
        segment_id = session.execute(text(
            "INSERT INTO user_segments (name, conditions) VALUES ('bench', CAST(:c AS jsonb)) "
            "RETURNING id"), {"c": json.dumps(SEGMENT)}).scalar_one()
        session.execute(text("CREATE UNLOGGED TABLE bare AS SELECT * FROM "
                             "user_segment_memberships WITH NO DATA"))
        session.commit()
        session.execute(text("ANALYZE"))
        now = dt.datetime.now(dt.UTC)
        condition = compile_sql(parse(SEGMENT, allow_event=False), now=now)
        bare_select = select(User.id, literal(segment_id), literal(now)).where(condition)
        memberships = UserSegmentMembership.metadata.tables[UserSegmentMembership.__tablename__]
        bare = memberships.to_metadata(MetaData(), name="bare")
        started = time.perf_counter()
        session.execute(insert(bare).from_select(["user_id", "segment_id", "evaluated_at"],
                                                 bare_select))
        session.commit()
        bare_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result = refresh_segment(session, segment_id, now)
        session.commit()
        first_seconds = time.perf_counter() - started
        started = time.perf_counter()
        refresh_segment(session, segment_id, dt.datetime.now(dt.UTC))
        session.commit()
        second_seconds = time.perf_counter() - started
        session.close()
    assert result is not None
    return {"users": users, "members": result.members,
            "refresh_first_s": round(first_seconds, 2),
            "refresh_again_s": round(second_seconds, 2),
            "bare_insert_select_s": round(bare_seconds, 2),
            "ratio_first_to_bare": round(first_seconds / bare_seconds, 2),
            "ratio_again_to_bare": round(second_seconds / bare_seconds, 2)}


def bench_metrics(events: int = 5_000_000) -> dict[str, Any]:
    from workers.reports.metrics import aggregate_day

    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    with ScratchDatabase() as url:
        session = _session_for(url)
        session.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage, created_at) "
            "SELECT 'u' || i || '@example.com', (ARRAY['Acquisition','Activation','Retention',"
            "'Revenue','Referral'])[1 + i % 5], :s - interval '30 days' "
            "FROM generate_series(1, 100000) AS i"), {"s": start})
        session.execute(text(
            "INSERT INTO user_lifecycle_history (user_id, from_stage, to_stage, transitioned_at) "
            "SELECT id, 'Acquisition', 'Activation', :s + (random() * interval '1 day') "
            "FROM users WHERE current_lifecycle_stage = 'Activation'"), {"s": start})
        loaded = time.perf_counter()
        session.execute(text(
            "INSERT INTO lifecycle_events (event_type, user_id, lifecycle_stage, event_data, "
            "created_at) SELECT 'bench.e' || (i % 20), NULL, "
            "(ARRAY['Acquisition','Activation','Retention','Revenue','Referral'])[1 + i % 5], "
            "'{}'::jsonb, :s + (i % 86400) * interval '1 second' "
            "FROM generate_series(1, :n) AS i"), {"s": start, "n": events})
        session.commit()
        load_seconds = time.perf_counter() - loaded
        session.execute(text("ANALYZE"))
        started = time.perf_counter()
        first = aggregate_day(session, day)
        session.commit()
        first_seconds = time.perf_counter() - started
        started = time.perf_counter()
        again = aggregate_day(session, day)
        session.commit()
        again_seconds = time.perf_counter() - started
        session.close()
    return {"events": events, "users": 100_000, "figures": first.rows,
            "aggregate_s": round(first_seconds, 2), "rerun_s": round(again_seconds, 2),
            "rerun_rows_written": again.written, "load_s": round(load_seconds, 2)}
