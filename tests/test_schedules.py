"""Scheduled audience journeys: next run times (pure), runs over real PostgreSQL, the
program's `schedules:` section and `fleet schedule`.

Runs are driven batch by batch here (`runs.run_batch`, one transaction each, as the
task does); tests/test_schedules_workers.py runs them through real workers and kills one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text

from db.session import session_scope
from tests.helpers import ROOT, WorkerProcess
from tests.workflow_helpers import deploy, new_user
from workers.definitions import DefinitionError, apply, load
from workers.schedules import runs
from workers.schedules.cron import next_interval, parse_cron

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")


def _at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=UTC)


def _runs(cron: str, zone: str, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    parsed, found, t = parse_cron(cron, zone), [], start
    while (t := parsed.next_after(t)) < end:
        found.append(t)
    return found


# --------------------------------------------------------------------------- next run times


def test_cron_runs_at_the_wall_clock_time_of_its_zone_across_a_dst_change() -> None:
    weekly = _runs("0 10 * * 1", "Europe/Berlin", _at(2026, 3, 20), _at(2026, 4, 7))
    assert weekly == [_at(2026, 3, 23, 9), _at(2026, 3, 30, 8), _at(2026, 4, 6, 8)]
    assert {t.astimezone(BERLIN).hour for t in weekly} == {10}
    assert parse_cron("0 10 * * mon", "UTC").next_after(_at(2026, 3, 23, 10)) == \
        _at(2026, 3, 30, 10)  # strictly after


def test_a_wall_time_the_clock_skips_runs_once_an_hour_later() -> None:
    daily = _runs("30 2 * * *", "Europe/Berlin", _at(2026, 3, 28), _at(2026, 3, 31))
    assert [t.astimezone(BERLIN).strftime("%d %H:%M") for t in daily] == [
        "28 02:30", "29 03:30", "30 02:30"]
    hourly = _runs("0 * * * *", "Europe/Berlin", _at(2026, 3, 28, 23) - dt.timedelta(seconds=1),
                   _at(2026, 3, 29, 22))  # local midnight to midnight: 23 hours
    assert len(hourly) == len(set(hourly)) == 23


def test_a_wall_time_that_happens_twice_runs_once_at_its_first_occurrence() -> None:
    daily = _runs("30 2 * * *", "Europe/Berlin", _at(2026, 10, 24), _at(2026, 10, 27))
    assert daily == [_at(2026, 10, 24, 0, 30), _at(2026, 10, 25, 0, 30), _at(2026, 10, 26, 1, 30)]
    hourly = _runs("0 * * * *", "Europe/Berlin", _at(2026, 10, 24, 22) - dt.timedelta(seconds=1),
                   _at(2026, 10, 25, 23))  # the 25-hour local day
    assert len(hourly) == 24 and _at(2026, 10, 25, 1) not in hourly  # 02:00 CET: not again


def test_cron_fields_follow_cron() -> None:
    # Both day fields restricted: either matches (Friday or the 13th), as in cron.
    assert _runs("0 0 13 * 5", "UTC", _at(2026, 2, 1), _at(2026, 2, 15)) == [
        _at(2026, 2, 6), _at(2026, 2, 13)]
    assert _runs("*/30 9-10 * * mon-fri", "UTC", _at(2026, 3, 6, 9), _at(2026, 3, 9, 10)) == [
        _at(2026, 3, 6, 9, 30), _at(2026, 3, 6, 10), _at(2026, 3, 6, 10, 30),
        _at(2026, 3, 9, 9), _at(2026, 3, 9, 9, 30)]
    assert parse_cron("0 0 29 2 *").next_after(_at(2097, 3, 1)) == _at(2104, 2, 29)


@pytest.mark.parametrize(("cron", "zone", "message"), [
    ("0 10 * *", "UTC", "needs 5 fields"),
    ("61 * * * *", "UTC", "61 > 59"),
    ("0 0 31 2 *", "UTC", "never runs"),
    ("0 10 * * 1", "Europe/Nowhere", "unknown time zone 'Europe/Nowhere'"),
])
def test_bad_cron_expressions_and_zones_are_refused(cron: str, zone: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cron(cron, zone)


def test_intervals_keep_their_phase_and_skip_missed_runs() -> None:
    start = _at(2026, 1, 1)
    assert next_interval(start, 3600, start) == _at(2026, 1, 1, 1)
    assert next_interval(start, 3600, _at(2026, 1, 1, 5, 30)) == _at(2026, 1, 1, 6)
    assert next_interval(start, 3600, _at(2026, 1, 1, 6)) == _at(2026, 1, 1, 7)
    # DST does not touch an interval: 24 hours apart in UTC, 23 or 25 on the wall clock.
    assert next_interval(_at(2026, 3, 28, 12), 86400, _at(2026, 3, 28, 13)) == _at(2026, 3, 29, 12)


# --------------------------------------------------------------------------- runs (PostgreSQL)

def _segment(tag: str, kind: str = "dynamic") -> uuid.UUID:
    with session_scope() as session:
        return session.execute(text(
            "INSERT INTO user_segments (name, conditions, kind) VALUES (:n, CAST(:c AS jsonb), :k) "
            "RETURNING id"), {"n": f"seg-{tag}", "k": kind, "c": json.dumps(
                {"field": "user.attributes.tag", "op": "eq", "value": tag})}).scalar_one()


def _user(tag: str | None, user_id: uuid.UUID | None = None) -> uuid.UUID:
    if user_id is None:
        return new_user({"tag": tag} if tag else {})
    with session_scope() as session:
        session.execute(text(
            "INSERT INTO users (id, email, current_lifecycle_stage, attributes) "
            "VALUES (:i, :e, 'Acquisition', CAST(:a AS jsonb))"),
            {"i": user_id, "e": f"s-{uuid.uuid4().hex[:10]}@example.com",
             "a": json.dumps({"tag": tag})})
    return user_id


def _schedule(tag: str, segment_id: uuid.UUID | None, batch_size: int = 7,
              when: runs.When | None = None,
              reentry: Literal["no_concurrent", "allow"] = "allow") -> tuple[str, uuid.UUID]:
    """A schedule of the minimal workflow; returns (name, workflow id)."""
    workflow = deploy("minimal.bpmn")
    name = f"sched-{tag}"
    with session_scope() as session:
        workflow_id = session.execute(text("SELECT id FROM workflows WHERE name = :n"),
                                      {"n": workflow}).scalar_one()
        runs.upsert(session, name, runs.ScheduleValues(
            workflow_id, when or runs.When("manual"), segment_id, batch_size,
            reentry), dt.datetime.now(UTC))
    return name, workflow_id


def _manual_run(name: str) -> runs.RunMessage:
    with session_scope() as session:
        return runs.start_manual(session, name, dt.datetime.now(UTC))


def _batch(message: runs.RunMessage, fail: bool = False) -> runs.Batch:
    """One batch in a transaction of its own; `fail`: the worker dies before the commit."""
    class Died(Exception):
        pass
    try:
        with session_scope() as session:
            batch = runs.run_batch(session, message.run_id, message.batches,
                                   dt.datetime.now(UTC))
            if fail:
                raise Died
    except Died:
        return runs.Batch("more", [], message.batches)
    return batch


def _run_to_end(message: runs.RunMessage, limit: int = 100) -> list[runs.Batch]:
    done = []
    for _ in range(limit):
        batch = _batch(message)
        done.append(batch)
        if batch.status != "more":
            return done
        message = runs.RunMessage(message.run_id, batch.batches)
    raise AssertionError("the run did not end")


def _starts(workflow_id: uuid.UUID) -> dict[uuid.UUID, int]:
    """{user: executions of the workflow}."""
    with session_scope() as session:
        return {row.user_id: row.n for row in session.execute(text(
            "SELECT user_id, count(*) AS n FROM workflow_executions WHERE workflow_id = :w "
            "GROUP BY user_id"), {"w": workflow_id})}


def _run(run_id: uuid.UUID) -> runs.RunView:
    with session_scope() as session:
        view = runs.run_view(session, run_id)
    assert view is not None
    return view


@pytest.mark.servers
def test_an_interrupted_run_resumes_and_starts_every_member_exactly_once() -> None:
    tag = uuid.uuid4().hex[:8]
    members = {_user(tag) for _ in range(30)}
    others = {_user("other") for _ in range(3)}
    name, workflow_id = _schedule(tag, _segment(tag))
    message = _manual_run(name)
    first = _batch(message)
    second = _batch(runs.RunMessage(message.run_id, first.batches))
    assert (first.status, len(first.started), second.batches) == ("more", 7, 2)
    assert _batch(runs.RunMessage(message.run_id, 2), fail=True).batches == 2  # rolled back
    assert _run(message.run_id).batches == 2
    assert _batch(message).status == "stale"  # a copy of the first message does nothing
    rest = _run_to_end(runs.RunMessage(message.run_id, 2))
    assert [b.status for b in rest] == ["more", "more", "completed"]
    starts = _starts(workflow_id)
    assert set(starts) == members and set(starts.values()) == {1}
    assert not others & set(starts)
    view = _run(message.run_id)
    assert (view.status, view.started, view.skipped, view.batches) == ("completed", 30, 0, 5)
    with session_scope() as session:
        variables = session.execute(text(
            "SELECT variables FROM workflow_executions WHERE workflow_id = :w LIMIT 1"),
            {"w": workflow_id}).scalar_one()
    assert variables["schedule"]["name"] == name
    assert variables["schedule"]["run_id"] == str(message.run_id)


@pytest.mark.servers
def test_a_rerun_of_a_run_starts_nobody_again() -> None:
    tag = uuid.uuid4().hex[:8]
    for _ in range(10):
        _user(tag)
    name, workflow_id = _schedule(tag, _segment(tag))
    message = _manual_run(name)
    _run_to_end(message)
    assert _batch(runs.RunMessage(message.run_id, 2)).status == "stale"  # completed
    # Even with its cursor wound back, the start keys let no user start twice.
    with session_scope() as session:
        session.execute(text("UPDATE workflow_schedule_runs SET status = 'running', "
                             "last_user_id = NULL, started = 0, finished_at = NULL "
                             "WHERE id = :r"), {"r": message.run_id})
    again = _run_to_end(runs.RunMessage(message.run_id, 2))
    assert sum(len(b.started) for b in again) == 0 and sum(b.skipped for b in again) == 10
    assert set(_starts(workflow_id).values()) == {1} and len(_starts(workflow_id)) == 10


@pytest.mark.servers
def test_members_are_decided_at_batch_time() -> None:
    tag = uuid.uuid4().hex[:8]
    ids = sorted(uuid.uuid4() for _ in range(14))
    # Every member's id between 4... and f...: the early and late joiners go around them.
    members = [_user(tag, uuid.UUID("4" + str(i)[1:])) for i in ids[:7]] + \
              [_user(tag, uuid.UUID("8" + str(i)[1:])) for i in ids[7:]]
    name, workflow_id = _schedule(tag, _segment(tag))
    message = _manual_run(name)
    first = _batch(message)
    assert set(_starts(workflow_id)) == set(members[:7])
    early = _user(tag, uuid.UUID("00000000" + str(uuid.uuid4())[8:]))  # behind the cursor
    late = _user(tag, uuid.UUID("ffffffff" + str(uuid.uuid4())[8:]))  # ahead of it
    with session_scope() as session:  # a member of the next batch leaves the segment
        session.execute(text("UPDATE users SET attributes = '{\"tag\": \"gone\"}' WHERE id = :u"),
                        {"u": members[10]})
    _run_to_end(runs.RunMessage(message.run_id, first.batches))
    started = set(_starts(workflow_id))
    assert late in started and early not in started and members[10] not in started
    assert started == {*members[:10], *members[11:], late}


@pytest.mark.servers
def test_a_static_segment_runs_over_its_memberships_and_no_segment_over_everyone() -> None:
    tag = uuid.uuid4().hex[:8]
    segment_id = _segment(tag, "static")
    members = [_user(None) for _ in range(9)]
    _user(tag)  # matches the condition, but a static segment's members are its rows
    with session_scope() as session:
        session.execute(text("INSERT INTO user_segment_memberships (user_id, segment_id) "
                             "SELECT unnest(CAST(:u AS uuid[])), :s"),
                        {"u": members, "s": segment_id})
    name, workflow_id = _schedule(tag, segment_id)
    _run_to_end(_manual_run(name))
    assert set(_starts(workflow_id)) == set(members)

    everyone, all_id = _schedule(tag + "-all", None, batch_size=1000)
    with session_scope() as session:
        users = session.execute(text("SELECT count(*) FROM users")).scalar_one()
    _run_to_end(_manual_run(everyone))
    assert len(_starts(all_id)) == users


@pytest.mark.servers
def test_a_paused_schedule_stops_its_run_at_the_next_batch_and_resume_goes_on() -> None:
    tag = uuid.uuid4().hex[:8]
    members = {_user(tag) for _ in range(20)}
    name, workflow_id = _schedule(tag, _segment(tag))
    message = _manual_run(name)
    first = _batch(message)
    with session_scope() as session:
        assert runs.pause(session, name, dt.datetime.now(UTC))
        assert not runs.pause(session, name, dt.datetime.now(UTC))
    paused = _batch(runs.RunMessage(message.run_id, first.batches))
    assert paused.status == "paused" and len(_starts(workflow_id)) == 7
    with pytest.raises(runs.ScheduleError, match="paused"):
        _manual_run(name)
    with session_scope() as session:  # the sweep leaves a paused schedule's run alone
        assert message.run_id not in {m.run_id for m in runs.resume_stale(
            session, dt.datetime.now(UTC) + dt.timedelta(hours=1))}
    with session_scope() as session:
        resumed = runs.resume(session, name, dt.datetime.now(UTC))
        assert runs.resume(session, name, dt.datetime.now(UTC)) is None
    assert resumed == [runs.RunMessage(message.run_id, 1)]
    _run_to_end(resumed[0])
    assert set(_starts(workflow_id)) == members


@pytest.mark.servers
def test_no_concurrent_skips_members_still_in_the_workflow() -> None:
    tag = uuid.uuid4().hex[:8]
    for _ in range(5):
        _user(tag)
    name, workflow_id = _schedule(tag, _segment(tag), reentry="no_concurrent")
    _run_to_end(_manual_run(name))
    second = _manual_run(name)  # the first run's executions are still pending (no worker)
    _run_to_end(second)
    view = _run(second.run_id)
    assert (view.started, view.skipped) == (0, 5)
    assert set(_starts(workflow_id).values()) == {1}


@pytest.mark.servers
def test_the_sweep_starts_each_due_time_once_and_resends_runs_whose_worker_died() -> None:
    tag = uuid.uuid4().hex[:8]
    _user(tag)
    when = runs.When("interval", interval_seconds=3600)
    name, _ = _schedule(tag, _segment(tag), when=when)
    now = dt.datetime.now(UTC)
    due = now - dt.timedelta(hours=2, minutes=30)
    with session_scope() as session:
        session.execute(text("UPDATE workflow_schedules SET next_run_at = :t WHERE name = :n"),
                        {"t": due, "n": name})
    with session_scope() as session:
        started = runs.start_due(session, now)
    with session_scope() as session:
        assert not [m for m in runs.start_due(session, now) if m in started]
        row = session.execute(text("SELECT next_run_at, last_run_at FROM workflow_schedules "
                                   "WHERE name = :n"), {"n": name}).one()
    mine = [m for m in started if _run(m.run_id).schedule == name]
    assert len(mine) == 1 and mine[0].batches == 0
    assert (row.last_run_at, row.next_run_at) == (due, due + dt.timedelta(hours=3))
    later = now + runs.STALE_AFTER + dt.timedelta(seconds=1)
    with session_scope() as session:
        assert mine[0] in runs.resume_stale(session, later)
    with session_scope() as session:  # stamped: not again within STALE_AFTER
        assert mine[0] not in runs.resume_stale(session, later)


@pytest.mark.servers
def test_a_run_of_a_workflow_that_is_not_active_fails() -> None:
    tag = uuid.uuid4().hex[:8]
    _user(tag)
    name, workflow_id = _schedule(tag, _segment(tag))
    with session_scope() as session:
        session.execute(text("UPDATE workflows SET status = 'inactive' WHERE id = :w"),
                        {"w": workflow_id})
    message = _manual_run(name)
    assert _batch(message).status == "failed"
    view = _run(message.run_id)
    assert view.status == "failed" and "inactive" in (view.error or "")
    assert not _starts(workflow_id)


# --------------------------------------------------------------------------- the program


def _program(tmp_path: Path, schedules: list[dict[str, Any]], tag: str) -> Path:
    (tmp_path / "flow.bpmn").write_text((ROOT / "tests" / "bpmn" / "minimal.bpmn").read_text())
    path = tmp_path / "fleet.yaml"
    path.write_text(json.dumps({
        "workflows": [{"name": f"flow-{tag}", "file": "flow.bpmn"}],
        "segments": [{"name": f"seg-{tag}",
                      "conditions": {"field": "user.attributes.tag", "op": "eq", "value": tag}}],
        "schedules": schedules}))
    return path


@pytest.mark.parametrize(("schedule", "problem"), [
    ({"cron": "0 10 * *"}, "/schedules/0/cron: schedule s: cron '0 10 * *' needs 5 fields"),
    ({"cron": "0 25 * * *"}, "/schedules/0/cron: schedule s: cron '0 25 * * *': "),
    ({"cron": "0 10 * * 1", "timezone": "Mars/Olympus"},
     "/schedules/0/timezone: schedule s: unknown time zone 'Mars/Olympus'"),
    ({"cron": "0 10 * * 1", "every": "7d"},
     "/schedules/0: schedule s: give exactly one of cron, every or manual: true (got cron, every)"),
    ({}, "/schedules/0: schedule s: give exactly one of cron, every or manual: true (got none)"),
    ({"every": "10s"}, "/schedules/0/every: schedule s: must be at least 60s"),
    ({"every": "soon"}, "/schedules/0/every: schedule s: "),
    ({"manual": True, "batch_size": 0}, "/schedules/0/batch_size: schedule s: "),
])
def test_invalid_schedules_are_refused_with_their_path(
        tmp_path: Path, schedule: dict[str, Any], problem: str) -> None:
    path = _program(tmp_path, [{"name": "s", "workflow": "w", **schedule}], "x")
    with pytest.raises(DefinitionError) as caught:
        load(path)
    assert f"{path}: {problem}" in str(caught.value), str(caught.value)


@pytest.mark.servers
def test_apply_creates_and_updates_schedules_and_refuses_unknown_names(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    weekly = {"name": f"weekly-{tag}", "workflow": f"flow-{tag}", "segment": f"seg-{tag}",
              "cron": "0 10 * * 1", "timezone": "Europe/Berlin"}

    def apply_file(schedules: list[dict[str, Any]]) -> Any:
        doc, sources = load(_program(tmp_path, schedules, tag))
        with session_scope() as session:
            return apply(session, doc, sources)

    assert f"schedule weekly-{tag}" in apply_file([weekly]).created
    assert f"schedule weekly-{tag}" in apply_file([weekly]).unchanged
    with session_scope() as session:
        row = session.execute(text("SELECT * FROM workflow_schedules WHERE name = :n"),
                              {"n": weekly["name"]}).one()
    assert (row.trigger_type, row.cron_expression, row.timezone) == (
        "cron", "0 10 * * 1", "Europe/Berlin")
    assert row.next_run_at.astimezone(BERLIN).strftime("%a %H:%M") == "Mon 10:00"
    assert f"schedule weekly-{tag}" in apply_file([{**weekly, "cron": None,
                                                    "every": "7d"}]).updated
    with session_scope() as session:
        row = session.execute(text("SELECT * FROM workflow_schedules WHERE name = :n"),
                              {"n": weekly["name"]}).one()
    assert (row.trigger_type, row.cron_expression, row.interval_seconds) == (
        "interval", None, 7 * 86400)
    with pytest.raises(DefinitionError) as caught:
        apply_file([{**weekly, "name": f"bad-{tag}", "workflow": "nope", "segment": "none"}])
    assert "/schedules/0/workflow: schedule bad-" in str(caught.value)
    assert "/schedules/0/segment: schedule bad-" in str(caught.value)


# --------------------------------------------------------------------------- fleet schedule


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli.main", *args], cwd=ROOT,
                          env=dict(os.environ, COLUMNS="250"), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.servers
def test_the_schedule_commands(tmp_path: Path, celery_worker: WorkerProcess) -> None:
    tag = uuid.uuid4().hex[:8]
    members = {_user(tag) for _ in range(12)}
    name = f"cli-{tag}"
    path = _program(tmp_path, [{"name": name, "workflow": f"flow-{tag}", "segment": f"seg-{tag}",
                                "cron": "0 10 * * 1", "timezone": "Europe/Berlin",
                                "batch_size": 5}], tag)
    assert fleet("apply", str(path)).returncode == 0
    listed = fleet("schedule", "list").stdout
    assert name in listed and "cron 0 10 * * 1 Europe/Berlin" in listed and "active" in listed

    assert fleet("schedule", "pause", name).stdout.strip() == f"schedule {name} paused"
    refused = fleet("schedule", "run", name)
    assert refused.returncode == 1 and "paused: resume it first" in refused.stderr
    assert fleet("schedule", "resume", name).stdout.strip() == f"schedule {name} resumed"

    done = fleet("schedule", "run", name, "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    run_id = uuid.UUID(done.stdout.strip())
    assert "completed: 12 started, 0 skipped, 3 batches" in done.stderr
    assert _run(run_id).status == "completed"
    (data,) = [s for s in json.loads(fleet("schedule", "list", "--json").stdout)
               if s["name"] == name]
    assert data["last_run"]["id"] == str(run_id) and data["last_run"]["started"] == 12
    assert data["when"]["trigger_type"] == "cron" and data["segment"] == f"seg-{tag}"
    with session_scope() as session:
        users = set(session.execute(text(
            "SELECT e.user_id FROM workflow_executions e JOIN workflows w ON w.id = e.workflow_id "
            "WHERE w.name = :w"), {"w": f"flow-{tag}"}).scalars())
    assert users == members

    missing = fleet("schedule", "pause", "no-such-schedule")
    assert missing.returncode == 1 and "no schedule named 'no-such-schedule'" in missing.stderr
