"""`fleet demo`: the synthetic stream, the sample program, and a small run end to end."""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
import threading
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from db.models import LIFECYCLE_STAGES
from db.session import session_scope
from tests.helpers import ROOT, WorkerProcess
from tests.workflow_helpers import store_messaging
from workers.definitions import load
from workers.events.envelope import InvalidEvent, parse_event
from workers.reports.diagram import workflow_section_html
from workers.tools.demo import run
from workers.tools.demo.generator import DemoStream, generate
from workers.tools.demo.report import write_report
from workers.tools.demo.summary import summarize

END = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)
# Event types only the producer sends (workflows also record identify and stage events).
PRODUCER_ONLY = ("user.signed_up", "session.started", "project.created", "feature.used",
                 "subscription.upgraded", "referral.sent")


# --------------------------------------------------------------------------- the generator


def test_the_same_seed_gives_the_same_stream() -> None:
    first = generate(400, 20, seed=3, end=END, tag="t1")
    assert generate(400, 20, seed=3, end=END, tag="t1") == first
    other_seed = generate(400, 20, seed=4, end=END, tag="t1")
    assert other_seed.counts() != first.counts()
    # Another run tag: other users and event ids, the same behaviour.
    other_run = generate(400, 20, seed=3, end=END, tag="t2")
    assert other_run.counts() == first.counts() and other_run.personas == first.personas
    assert not {e["event_id"] for e in other_run.events()} & {e["event_id"] for e in first.events()}


def test_events_are_valid_envelopes_except_the_deliberate_bad_ones() -> None:
    stream = generate(500, 30, seed=11, end=END, tag="valid")
    users: set[str] = set()
    ids: set[str] = set()
    last_seen: dict[str, dt.datetime] = {}
    for phase in stream.phases:
        for raw in phase.events:
            event = parse_event(raw)
            assert event.email and event.email.endswith("@" + stream.domain)
            users.add(event.email)
            ids.add(str(event.event_id))
            if phase.name.startswith("day "):
                assert stream.start <= event.occurred_at < stream.end
                assert event.occurred_at >= last_seen.get(phase.name, stream.start)  # sorted
                last_seen[phase.name] = event.occurred_at
    assert len(ids) == stream.good  # every event has an id of its own
    assert len(users) == stream.users
    counts = stream.counts()
    assert counts["user.signed_up"] == stream.users
    assert any(p.schedule == "weekly-win-back" and not p.events for p in stream.phases)
    assert stream.users == 500 + stream.referred
    assert 0 < counts["subscription.upgraded"] < counts["project.created"] < counts["session.started"]
    assert counts["referral.sent"] > 0 and stream.phases[-1].events  # referrals, win-back replies
    assert set(stream.personas) == {"bouncer", "explorer", "casual", "fader", "power"}

    assert stream.bad >= 6
    for raw in stream.bad_inputs():
        try:
            event = parse_event(raw)
        except InvalidEvent:
            continue
        # A well-formed envelope naming a user id nobody has: ingest rejects it.
        assert event.user_id is not None and event.email is None
    # The bad inputs travel among the good ones of their phase.
    phase = next(p for p in stream.phases if p.bad)
    sent = phase.to_send()
    assert len(sent) == len(phase.events) + len(phase.bad)
    assert sent[0] is phase.events[0] and sent[-1] is phase.events[-1]


def test_a_user_s_events_keep_their_order() -> None:
    stream = generate(200, 15, seed=5, end=END, tag="order")
    firsts: dict[str, str] = {}
    for event in stream.events():
        firsts.setdefault(event["user"], event["event_type"])
    # Every user is introduced (identify traits) before anything else happens to them.
    assert set(firsts.values()) == {"user.identify"}


# --------------------------------------------------------------------------- the program


def test_the_sample_program_validates_and_moves_users_through_every_stage() -> None:
    doc, xml = load(run.PROGRAM)
    workflows = {w.name for w in doc.workflows}
    assert len(workflows) >= 7
    assert {t.workflow for t in doc.triggers} <= workflows
    assert {t.starts_on for t in doc.triggers} >= {
        ("user.signed_up", None), ("project.created", None), ("subscription.upgraded", None),
        ("referral.sent", None), ("lifecycle.stage_changed", None),
        ("segment.entered", "power-users")}
    assert {s.name for s in doc.segments} == {"churn-risk", "upsell-open", "power-users"}
    assert [(s.name, s.workflow, s.segment) for s in doc.schedules] == [
        ("weekly-win-back", "win-back", "churn-risk")]
    assert {w.name for w in doc.workflows if w.exit_on_goal} == {"activation-nudge"}
    bpmn = "".join(source.xml for source in xml.values())
    targets = set(re.findall(r'id="stage" type="str" value="&quot;(\w+)&quot;"', bpmn))
    assert targets == set(LIFECYCLE_STAGES) - {"Acquisition"}  # ingest puts new users there
    for operator in ("send_message", "emit_event", "set_lifecycle_stage", "add_to_segment",
                     "remove_from_segment", "update_user_attributes"):
        assert f'serviceTaskOperator id="{operator}"' in bpmn
    assert "<bpmn:receiveTask" in bpmn and "<bpmn:boundaryEvent" in bpmn
    # Demo timers are seconds, each with the production value beside it.
    for name, source in xml.items():
        durations = re.findall(r'<bpmn:timeDuration>"(\w+)"</bpmn:timeDuration>', source.xml)
        assert all(re.fullmatch(r"PT\d+S", d) for d in durations), name
        assert source.xml.count("production:") >= len(durations), name


def test_the_sample_program_is_package_data() -> None:
    """An installed `fleet demo` finds it: every file of program/ goes into the wheel."""
    folder = run.PROGRAM.parent
    assert folder == ROOT / "workers" / "tools" / "demo" / "program"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["workers.tools.demo"]
    files = [p.relative_to(folder.parent).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for path in files:
        assert any(fnmatch.fnmatch(path, pattern) for pattern in patterns), f"{path} not packaged"


def test_demo_is_a_fleet_command() -> None:
    from workers.cli.main import app

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0
    for option in ("--users", "--days", "--seed", "--keep-running"):
        assert option in result.output


# --------------------------------------------------------------------------- end to end


@contextmanager
def playing_the_beat(interval: float = 0.5) -> Iterator[None]:
    """No beat runs in the tests: send the timer sweep and the outbox relay as the beat would."""
    from workers.celery_app import app
    from workers.queues import TaskNames

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            app.send_task(TaskNames.WAKE_DUE_TIMERS)
            app.send_task(TaskNames.RELAY_OUTBOX)

    thread = threading.Thread(target=loop, name="test-beat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _scalar(sql: str, domain: str) -> int:
    with session_scope() as session:
        return int(session.execute(text(sql), {"pattern": f"%@{domain}"}).scalar_one())


RUN_USERS = "SELECT id FROM users WHERE email LIKE :pattern"


def _assert_the_holdout_is_the_hash(domain: str) -> None:
    """Every send of a user in the program's control group is held out (or suppressed,
    consent coming first), and a held-out send is one of a control group's user."""
    from workers.sends.holdout import in_holdout
    from workers.sends.policy import load as load_policy

    with session_scope() as session:
        policy = load_policy(session)
        rows = session.execute(text(
            f"SELECT s.user_id, s.workflow_id, s.outcome FROM sends s "
            f"WHERE s.user_id IN ({RUN_USERS})"), {"pattern": f"%@{domain}"}).all()
    program = policy.messaging.holdout
    assert program is not None and rows
    for row in rows:
        workflow = policy.workflow(row.workflow_id)
        held = policy.held_out(workflow, row.user_id)
        if in_holdout(program.salt, row.user_id, program.percent):
            assert held and row.outcome in ("held_out", "suppressed"), row
        assert (row.outcome == "held_out") == (held and row.outcome != "suppressed"), row


def _quick_program(folder: Path) -> Path:
    """The sample program with every timer cut to at most 3 s, so a run drains quickly."""
    program = folder / "program.yaml"
    program.write_text(run.PROGRAM.read_text())
    (folder / "bpmn").mkdir()
    for source in (run.PROGRAM.parent / "bpmn").glob("*.bpmn"):
        (folder / "bpmn" / source.name).write_text(re.sub(
            r'"PT(\d+)S"', lambda m: f'"PT{min(3, int(m.group(1)))}S"', source.read_text()))
    return program


@pytest.fixture()
def demo_policy() -> Iterator[None]:
    """The sample program's send policy is the session's for one test only."""
    yield
    store_messaging(None)


@pytest.mark.servers
def test_a_small_demo_runs_end_to_end(celery_worker: WorkerProcess, tmp_path: Path,
                                      demo_policy: None) -> None:
    run.apply_program(_quick_program(tmp_path), window_opens_in=20)
    run.wait_for_trigger_caches()
    tag = f"t{uuid.uuid4().hex[:8]}"
    # 24 days: this seed has an activated user quiet for two weeks (the win-back's
    # audience), users who sign up and create a project at once, and power users.
    stream: DemoStream = generate(50, 24, seed=5, tag=tag)
    with playing_the_beat():
        result = run.send(stream, day_seconds=0, settle_timeout=60, drain_timeout=150)
    assert result.drained and not result.unsettled
    assert result.sent == stream.good + stream.bad

    with session_scope() as session:
        summary = summarize(session, stream.domain)
    d = stream.domain
    # Users and stages.
    assert summary.users == stream.users == _scalar(
        "SELECT count(*) FROM users WHERE email LIKE :pattern", d)
    assert sum(summary.stages.values()) == summary.users
    reached = list(summary.reached.values())
    assert reached[0] == summary.users and reached == sorted(reached, reverse=True)
    assert summary.stages["Activation"] + reached[2] > 0  # someone created a project
    assert summary.stage_moves == _scalar(
        f"SELECT count(*) FROM user_lifecycle_history WHERE user_id IN ({RUN_USERS})", d) \
        == summary.events_by_type.get("lifecycle.stage_changed", 0)
    # Events: every good event recorded once; workflows add their own.
    assert summary.events == _scalar(
        f"SELECT count(*) FROM lifecycle_events WHERE user_id IN ({RUN_USERS})", d)
    counts = stream.counts()
    for event_type in PRODUCER_ONLY:
        assert summary.events_by_type.get(event_type, 0) == counts[event_type], event_type
    assert summary.events_by_type["user.identify"] >= counts["user.identify"]
    # Triggers and executions: every start is an execution; every execution has ended.
    assert summary.evaluated == _scalar(
        f"SELECT count(*) FROM trigger_executions WHERE user_id IN ({RUN_USERS})", d)
    executions = summary.executions
    started = sum(t.started for t in summary.triggers) + sum(summary.scheduled.values())
    assert sum(executions.values()) == started == _scalar(
        f"SELECT count(*) FROM workflow_executions WHERE user_id IN ({RUN_USERS})", d)
    assert summary.matched >= sum(t.started for t in summary.triggers) > 0
    assert executions["completed"] == started, [w.failures for w in summary.workflows]
    by_trigger = {t.name: t for t in summary.triggers}
    assert by_trigger["welcome-on-signup"].started == stream.users
    assert {w.name for w in summary.workflows} >= {"welcome-drip", "activation-nudge",
                                                   "first-project"}
    drip = next(w for w in summary.workflows if w.name == "welcome-drip")
    assert drip.outcomes == {"drip_finished": stream.users}
    # Sends: one gateway decision per send_message call that ran (or whose deferred send a
    # goal exit dropped), one message_log row per 'sent'.
    outcomes = summary.sends.by_outcome
    assert sum(outcomes.values()) == _scalar(
        "SELECT count(*) FROM action_deliveries a JOIN workflow_executions e "
        f"ON e.id = a.execution_id WHERE a.operator = 'send_message' "
        f"AND (a.status = 'succeeded' OR a.send_outcome = 'dropped') "
        f"AND e.user_id IN ({RUN_USERS})", d)
    # Only the nudge exits on its goal: each dropped send is one of its exits'.
    assert outcomes["dropped"] <= summary.early_exits.get(("activation-nudge", "goal"), 0)
    assert summary.messages == outcomes["sent"] == _scalar(
        f"SELECT count(*) FROM message_log WHERE user_id IN ({RUN_USERS})", d)
    assert outcomes["deferred"] == 0  # the window opened: every deferred send was decided again
    assert summary.sends.deferred > 0  # the first days' sends waited for the window ...
    assert summary.sends.deferred_sent == summary.sends.deferred_sent_in_window  # ... inside it
    _assert_the_holdout_is_the_hash(d)
    assert {c.workflow for c in summary.conversions} >= {"welcome-drip", "activation-nudge"}
    nudge = next(c for c in summary.conversions if c.workflow == "activation-nudge")
    assert nudge.treated + nudge.held_out == next(
        w.total for w in summary.workflows if w.name == "activation-nudge")
    # The look-back wait: users whose first project came with their signup are not nudged.
    eager = {e["user"] for phase in stream.phases for e in phase.events if isinstance(e, dict)
             and e.get("event_type") == "project.created"
             and (e.get("data") or {}).get("name") == "My first project"}
    assert len(eager) == 2  # this seed's
    assert summary.needless_nudges == 0
    assert summary.late_nudges == 0  # the nudge exits on its goal: a deferred nudge is dropped
    # The weekly win-back ran once, after the last day: one win-back per member it found.
    assert set(result.schedule_runs) == {"weekly-win-back"}
    win_backs = _scalar(
        "SELECT count(*) FROM workflow_executions e JOIN workflows w ON w.id = e.workflow_id "
        f"WHERE w.name = 'win-back' AND e.user_id IN ({RUN_USERS})", d)
    assert win_backs > 0 and summary.scheduled == {("weekly-win-back", "win-back"): win_backs}
    assert _scalar(
        "SELECT count(DISTINCT e.user_id) FROM workflow_executions e JOIN workflows w "
        f"ON w.id = e.workflow_id WHERE w.name = 'win-back' AND e.user_id IN ({RUN_USERS})",
        d) == win_backs
    # The segment-entry journey: one power-tips execution per entry into power-users.
    entries = summary.segment_moves.get(("power-users", "entered"), 0)
    assert entries > 0 and by_trigger["tips-for-power-users"].started == entries == _scalar(
        "SELECT count(*) FROM workflow_executions e JOIN workflows w ON w.id = e.workflow_id "
        f"WHERE w.name = 'power-tips' AND e.user_id IN ({RUN_USERS})", d)
    # Dead letters: exactly the deliberate bad inputs.
    assert summary.dead_letters == stream.bad == len(summary.dead_letter_reasons)
    assert any("no user with id" in r for r in summary.dead_letter_reasons)
    assert summary.in_flight == summary.waiting_timers == summary.waiting_messages == 0

    with session_scope() as session:
        pictures = [workflow_section_html(session, w.name, days=1) for w in summary.workflows]
    path = write_report(tmp_path / "report" / "demo-report.html", summary, {"seed": 5, "run": tag},
                        pictures)
    page = path.read_text()
    assert "activation-nudge" in page
    assert page.count("<svg") >= 5 + len(summary.workflows)
    assert page.startswith("<!doctype html>") and "AARRR funnel" in page
    assert page.count("<svg") > 5 and "welcome-drip" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
