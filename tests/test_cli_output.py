"""The `fleet` command's output as scripts read it, from a real process: data on stdout,
diagnostics on stderr, `--json`, whole and prefix ids, exit codes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.helpers import ROOT
from tests.workflow_helpers import deploy, new_user
from workers.engine import control

pytestmark = pytest.mark.servers


def fleet(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    """`fleet ARGS` as a script runs it: output piped, a narrow terminal width."""
    return subprocess.run([sys.executable, "-m", "workers.cli.main", *args], cwd=ROOT,
                          env=dict(os.environ, COLUMNS=str(columns)), capture_output=True,
                          text=True, timeout=120)


def as_json(*args: str) -> Any:
    result = fleet(*args, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _email(engine: Engine, user: uuid.UUID) -> str:
    with engine.connect() as conn:
        return conn.execute(text("SELECT email FROM users WHERE id = :u"), {"u": user}).scalar_one()


@pytest.fixture
def executions(engine: Engine) -> tuple[str, list[uuid.UUID], uuid.UUID]:
    """A workflow that waits for a message and three executions (unstepped; one that is
    resumed waits, so it can still be cancelled): two of one user whose ids share their
    first 8 hex characters, one of another user."""
    from db.session import session_scope

    workflow, first, second = deploy("wait_for_message.bpmn"), new_user(), new_user()
    tag = uuid.uuid4().hex[:8]
    with session_scope() as session:
        started = [control.start(session, workflow, first), control.start(session, workflow, first),
                   control.start(session, workflow, second)]
    ids = [uuid.UUID(f"{tag}-{n * 4}aaa-4000-8000-{uuid.uuid4().hex[:12]}") for n in (1, 2)] \
        + [started[2]]
    with engine.begin() as conn:  # ids chosen so that the tag is an ambiguous prefix
        for old, new in zip(started[:2], ids[:2], strict=True):
            conn.execute(text("UPDATE workflow_executions SET id = :new WHERE id = :old"),
                         {"new": new, "old": old})
    return workflow, ids, second


def test_version_is_the_installed_one() -> None:
    result = fleet("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"fleet {importlib.metadata.version('lifecycle-fleet')}"


def test_execution_tables_go_to_stdout_with_whole_ids_and_users(
        engine: Engine, executions: tuple[str, list[uuid.UUID], uuid.UUID]) -> None:
    workflow, ids, second = executions
    listed = fleet("execution", "list", "--workflow", workflow)
    assert listed.returncode == 0, listed.stderr
    for execution_id in ids:  # whole, at 80 columns
        assert str(execution_id) in listed.stdout
        assert str(execution_id) not in listed.stderr
    assert "workflow" not in listed.stderr  # nothing of the table on stderr
    wide = fleet("execution", "list", "--workflow", workflow, columns=250)
    assert _email(engine, second) in wide.stdout

    rows = as_json("execution", "list", "--workflow", workflow)
    assert {row["id"] for row in rows} == {str(i) for i in ids}
    row = next(r for r in rows if r["id"] == str(ids[2]))
    assert row["user_id"] == str(second) and row["user_email"] == _email(engine, second)
    assert row["workflow"] == workflow and row["status"] == "pending"
    assert row["started_at"].endswith("+00:00") and row["paused"] is False

    only = as_json("execution", "list", "--workflow", workflow, "--user", _email(engine, second))
    assert [r["id"] for r in only] == [str(ids[2])]
    by_id = as_json("execution", "list", "--workflow", workflow, "--user", str(second))
    assert [r["id"] for r in by_id] == [str(ids[2])]
    assert fleet("execution", "list", "--user", "nobody-at-all@example.com").returncode == 1


def test_prefix_ids_are_accepted_when_unique_and_refused_otherwise(
        executions: tuple[str, list[uuid.UUID], uuid.UUID]) -> None:
    workflow, ids, _ = executions
    tag = str(ids[0])[:8]
    unique = str(ids[0])[:13]
    shown = as_json("execution", "show", unique)
    assert shown["id"] == str(ids[0]) and shown["workflow"] == workflow
    assert shown["steps"] == [] and shown["variables"] == {}
    assert shown["id"] == as_json("execution", "show", unique.replace("-", ""))["id"]
    human = fleet("execution", "show", str(ids[0]))
    assert human.returncode == 0 and f"execution {ids[0]}" in human.stdout, human.stderr

    ambiguous = fleet("execution", "show", tag)
    assert ambiguous.returncode == 2 and ambiguous.stdout == ""
    assert "ambiguous" in ambiguous.stderr
    assert str(ids[0]) in ambiguous.stderr and str(ids[1]) in ambiguous.stderr
    for refused, message in ((f"{tag}-ffff", "no workflow execution id starts with"),
                             ("ab", "at least 4"), ("not-an-id", "at least 4")):
        result = fleet("execution", "show", refused)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    for command in ("pause", "resume", "cancel"):
        ok = fleet("execution", command, str(ids[1])[:13])
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.startswith(f"{ids[1]}: ")
    assert fleet("execution", "retry", tag).returncode == 2
    assert fleet("execution", "complete", tag, "node").returncode == 2


def test_definitions_list_in_human_units_and_json(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    (tmp_path / "flow.bpmn").write_text((Path(__file__).parent / "bpmn" / "minimal.bpmn").read_text())
    condition = {"field": "user.attributes.plan", "op": "eq", "value": "pro"}
    (tmp_path / "fleet.yaml").write_text(json.dumps({
        "workflows": [{"name": f"out-{tag}", "file": "flow.bpmn", "stages": ["Activation"]}],
        "segments": [{"name": f"seg-{tag}", "ttl": "2h", "conditions": condition}],
        "triggers": [{"name": f"trig-{tag}", "event_type": f"out.e{tag}", "workflow": f"out-{tag}",
                      "conditions": {"in_segment": f"seg-{tag}"}, "cooldown": "30d"}],
    }))
    applied = fleet("apply", str(tmp_path / "fleet.yaml"))
    assert applied.returncode == 0 and f"created   trigger trig-{tag}" in applied.stdout, applied.stderr

    triggers = fleet("trigger", "list", columns=250)
    line = next(ln for ln in triggers.stdout.splitlines() if f"trig-{tag}" in ln)
    assert "30d" in line and f"{{in_segment: seg-{tag}}}" in line and "2592000" not in line
    trigger = next(t for t in as_json("trigger", "list") if t["name"] == f"trig-{tag}")
    assert trigger == {"name": f"trig-{tag}", "event_type": f"out.e{tag}", "segment": None,
                       "workflow": f"out-{tag}",
                       "enabled": True, "reentry": trigger["reentry"], "max_runs_per_user": None,
                       "cooldown_seconds": 2592000, "cooldown": "30d",
                       "conditions": {"in_segment": f"seg-{tag}"}}

    segments = fleet("segment", "list", columns=250)
    line = next(ln for ln in segments.stdout.splitlines() if f"seg-{tag}" in ln)
    # YAML flow style (PostgreSQL's jsonb keeps the keys in an order of its own)
    assert "field: user.attributes.plan" in line and "op: eq" in line and "'field'" not in line
    assert " 2h " in line
    segment = next(s for s in as_json("segment", "list") if s["name"] == f"seg-{tag}")
    assert (segment["ttl_seconds"], segment["ttl"], segment["conditions"]) == (7200, "2h", condition)
    shown = as_json("segment", "show", f"seg-{tag}")
    assert shown["members"] == 0 and shown["sample"] == [] and shown["refreshed_at"] is None
    missing = fleet("segment", "show", f"none-{tag}")
    assert missing.returncode == 1 and missing.stdout == "" and "no segment" in missing.stderr

    workflow = next(w for w in as_json("workflow", "list") if w["name"] == f"out-{tag}")
    assert workflow["version"] == "1.0.0" and workflow["stages"] == ["Activation"]
    assert workflow["executions"] == {} and uuid.UUID(workflow["id"])


def test_status_metrics_and_health_as_json() -> None:
    status = as_json("status")
    assert {q["queue"] for q in status["queues"]} >= {"events", "workflows"}
    assert status["partitions_missing"] == [] and isinstance(status["dead_letters_pending"], int)
    assert {"executions", "stalled_executions", "timer_lag_seconds", "outbox_backlog",
            "oldest_due_timer", "workers_answering", "partitions"} <= status.keys()
    assert isinstance(as_json("metrics", "show", "--days", "2")["days"], list)
    checks = {c["name"]: c for c in as_json("health")}
    assert checks["database"]["ok"] is True and checks["database"]["status"] == "ok"
    assert {"broker", "partitions", "timer lag", "dead letters", "stalled"} <= checks.keys()


def test_dlq_show_gives_the_whole_reason_and_the_raw_payload(engine: Engine) -> None:
    reason = "bad input: " + "x" * 150 + " END"
    payload = {"event_type": "Not.Valid", "user": "a@example.com"}
    with engine.begin() as conn:
        text_id = conn.execute(text(
            "INSERT INTO dead_letters (source, reason, error_type, raw_payload, raw_size, payload) "
            "VALUES ('events.ingest_batch', :r, 'InvalidEvent', :raw, :size, CAST(:p AS jsonb)) "
            "RETURNING id"), {"r": reason, "raw": json.dumps(payload).encode(),
                              "size": len(json.dumps(payload)), "p": json.dumps(payload)}
        ).scalar_one()
        binary_id = conn.execute(text(
            "INSERT INTO dead_letters (source, reason, raw_payload) "
            "VALUES ('broker', 'not UTF-8', '\\xff00fe'::bytea) RETURNING id")).scalar_one()

    shown = fleet("dlq", "show", str(text_id))
    assert shown.returncode == 0, shown.stderr
    for part in (reason, "events.ingest_batch", "InvalidEvent", '"event_type": "Not.Valid"',
                 f"{len(json.dumps(payload))} bytes", json.dumps(payload)):
        assert part in shown.stdout, part
    data = as_json("dlq", "show", str(text_id))
    assert data["reason"] == reason and data["payload"] == payload
    assert data["raw_payload_text"] == json.dumps(payload) and data["raw_payload_hex"] is None
    binary = as_json("dlq", "show", str(binary_id))
    assert binary["raw_payload_text"] is None and binary["raw_payload_hex"] == "ff00fe"
    assert binary["raw_size"] == 3 and binary["payload"] is None
    assert "ff00fe" in fleet("dlq", "show", str(binary_id)).stdout

    listed = {row["id"]: row for row in as_json("dlq", "list")}
    assert listed[text_id]["reason"] == reason
    assert listed[text_id]["raw_payload_text"] == json.dumps(payload)
    table = fleet("dlq", "list")
    assert str(text_id) in table.stdout and "pending:" in table.stderr
    for refused in ("abc", "999999999999"):
        result = fleet("dlq", "show", refused)
        assert result.returncode == 2 and result.stdout == "", result.stderr
    assert fleet("dlq", "replay", str(text_id), "--payload", "{nope").returncode == 2


def test_a_huge_condition_is_shown_cut_in_tables_and_whole_in_json(engine: Engine) -> None:
    """A segment with in-lists of 200,000 values: laying all of it out as YAML in a table
    took minutes; the table shows the start, --json the whole."""
    name = f"huge-{uuid.uuid4().hex[:8]}"
    conditions = {"field": "user.attributes.plan", "op": "in",
                  "value": [f"plan-{i}" for i in range(200_000)]}
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO user_segments (name, conditions, kind) "
                          "VALUES (:n, CAST(:c AS jsonb), 'dynamic')"),
                     {"n": name, "c": json.dumps(conditions)})
    listed = fleet("segment", "list")
    assert listed.returncode == 0, listed.stderr
    table = " ".join(listed.stdout.split())  # cells wrap at 80 columns
    assert name in table and "plan-0" in table and "plan-199999" not in table
    assert "characters;" in table
    shown = [s for s in as_json("segment", "list") if s["name"] == name]
    assert shown[0]["conditions"]["value"][-1] == "plan-199999"
    assert "characters; --json shows all" in fleet("segment", "show", name).stdout


def test_execution_show_lists_the_send_gateways_decisions() -> None:
    from db.session import session_scope
    from tests.workflow_helpers import execution
    from workers.engine import stepper
    from workers.operators.deliveries import run_action

    with session_scope() as session:
        execution_id = control.start(session, deploy("one_send.bpmn"), new_user(), {})
    version: int | None = 0
    while version is not None:  # stepped here, the operator call run here: no worker needed
        with session_scope() as session:
            result = stepper.step(session, execution_id, version)
        if result.action_key is not None:
            with session_scope() as session:
                run_action(session, result.action_key)
            version = execution(execution_id).state_version
        else:
            version = result.next_version
    shown = fleet("execution", "show", str(execution_id), "--json")
    assert shown.returncode == 0, shown.stderr
    [send] = json.loads(shown.stdout)["sends"]
    assert (send["node_id"], send["channel"], send["outcome"], send["deferrals"]) == (
        "send", "email", "sent", 0)
    assert send["sent_at"] is not None
    text_form = fleet("execution", "show", str(execution_id), columns=200)
    assert "sends (the send gateway" in text_form.stdout and " sent " in text_form.stdout
