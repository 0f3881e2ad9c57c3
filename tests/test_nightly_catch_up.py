"""A beat that was down overnight: each missed nightly metrics day runs once, none twice."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import Engine, text

from tasks.maintenance import metrics_daily
from tests.helpers import WorkerProcess, wait_for

pytestmark = pytest.mark.servers


def _done(engine: Engine) -> dict[dt.date, dt.datetime]:
    with engine.connect() as conn:
        return dict(conn.execute(text(
            "SELECT day, finished_at FROM maintenance_runs WHERE job = 'metrics_daily'")).all())


def test_missed_days_run_once_each_after_the_beat_was_down(
        engine: Engine, celery_worker: WorkerProcess) -> None:
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    last_done = yesterday - dt.timedelta(days=4)  # the beat has been down since then
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM maintenance_runs WHERE job = 'metrics_daily'"))
        conn.execute(text("INSERT INTO maintenance_runs (job, day) VALUES ('metrics_daily', :d)"),
                     {"d": last_done})
    metrics_daily.delay()  # what the beat sends when it is back
    missed = [last_done + dt.timedelta(days=i) for i in range(1, 5)]
    done = wait_for(lambda: (d := _done(engine)) and all(day in d for day in missed) and d,
                    message="every missed day to be aggregated")
    assert sorted(done) == [last_done, *missed]

    metrics_daily.delay()  # the next tick, or a second beat's: nothing left to do
    metrics_daily.delay(str(yesterday))  # an explicit rerun of a day is an idempotent upsert
    wait_for(lambda: _done(engine)[yesterday] > done[yesterday], message="the explicit rerun")
    again = _done(engine)
    assert sorted(again) == sorted(done)
    assert all(again[d] == done[d] for d in done if d != yesterday)
