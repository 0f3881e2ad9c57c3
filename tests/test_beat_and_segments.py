"""Exactly one beat acts; segment refresh is set-based and keeps the cache truthful."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from db.session import session_scope
from tests.helpers import ROOT, WorkerProcess, wait_for, worker_env
from workers.rules.segments import refresh_segment, segments_due

pytestmark = pytest.mark.servers
SENDING = "Sending due task relay-outbox"


def _beat(tmp_path: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat", "--loglevel", "INFO",
         "--schedule", str(tmp_path / f"{name}-schedule")],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=worker_env(), cwd=ROOT)  # noqa: SIM115
    return proc, log


def test_two_beats_never_both_send(tmp_path: Path) -> None:
    first, first_log = _beat(tmp_path, "beat-a")
    second, second_log = _beat(tmp_path, "beat-b")
    try:
        wait_for(lambda: SENDING in first_log.read_text() + second_log.read_text(), timeout=30,
                 message="a beat to send")
        time.sleep(6)  # three more relay periods
        sends = {p: log.read_text().count(SENDING) for p, log in ((first, first_log),
                                                                 (second, second_log))}
        leader = max(sends, key=sends.get)  # type: ignore[arg-type]
        follower = first if leader is second else second
        assert sends[follower] == 0 and sends[leader] >= 3, sends
        follower_log = first_log if follower is first else second_log
        assert "beat.standby" in follower_log.read_text()

        leader.send_signal(signal.SIGKILL)  # the leader dies without a goodbye
        leader.wait()
        wait_for(lambda: follower_log.read_text().count(SENDING) >= 2, timeout=30,
                 message="the standby beat to take over")
        assert "beat.lock_acquired" in follower_log.read_text()
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def _segment(engine: Engine, conditions: dict[str, object], kind: str = "dynamic") -> uuid.UUID:
    with engine.begin() as conn:
        return conn.execute(text(
            "INSERT INTO user_segments (name, conditions, kind, ttl_seconds) "
            "VALUES (:n, CAST(:c AS jsonb), :k, 120) RETURNING id"
        ), {"n": f"seg-{uuid.uuid4().hex[:8]}", "c": json.dumps(conditions), "k": kind}).scalar_one()


def _members(engine: Engine, segment_id: uuid.UUID) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT u.email FROM user_segment_memberships m JOIN users u ON u.id = m.user_id "
            "WHERE m.segment_id = :s"), {"s": segment_id}).scalars())


def test_refresh_adds_members_and_removes_leavers(engine: Engine) -> None:
    tag = uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage, attributes) "
            "SELECT 'r' || i || '-' || :t || '@example.com', 'Activation', "
            "jsonb_build_object('tag', :t, 'score', i) FROM generate_series(1, 50) i"), {"t": tag})
    segment = _segment(engine, {"all": [{"field": "user.attributes.tag", "op": "eq", "value": tag},
                                        {"field": "user.attributes.score", "op": "gt", "value": 40}]})
    with session_scope() as session:
        assert segment in segments_due(session, dt.datetime.now(dt.UTC), dt.timedelta(minutes=1))
        result = refresh_segment(session, segment)
    assert result is not None and result.members == 10 and result.removed == 0
    assert _members(engine, segment) == {f"r{i}-{tag}@example.com" for i in range(41, 51)}
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET attributes = attributes || '{\"score\": 0}' "
                          "WHERE email = :e"), {"e": f"r50-{tag}@example.com"})
    with session_scope() as session:
        again = refresh_segment(session, segment)
        assert segment not in segments_due(session, dt.datetime.now(dt.UTC),
                                           dt.timedelta(minutes=1))
    assert again is not None and again.members == 9 and again.removed == 1
    assert f"r50-{tag}@example.com" not in _members(engine, segment)


def test_static_segments_are_never_recomputed(engine: Engine) -> None:
    segment = _segment(engine, {}, kind="static")
    with session_scope() as session:
        assert refresh_segment(session, segment) is None
        assert segment not in segments_due(session, dt.datetime.now(dt.UTC),
                                           dt.timedelta(minutes=1))


def test_refresh_task_runs_on_the_worker(engine: Engine, celery_worker: WorkerProcess) -> None:
    from tasks.segments import refresh

    segment = _segment(engine, {"field": "user.email", "op": "starts_with", "value": "r1-"})
    refresh.delay(str(segment))

    def refreshed() -> bool:
        with engine.connect() as conn:
            return conn.execute(text("SELECT refreshed_at IS NOT NULL FROM user_segments "
                                     "WHERE id = :s"), {"s": segment}).scalar_one()

    wait_for(refreshed, message="the segment to be refreshed")
    assert all(email.startswith("r1-") for email in _members(engine, segment))
    assert os.environ["DATABASE_URL"]  # the worker used the session database
