"""Definitions and events through the `fleet` command, as a user drives them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.helpers import ROOT, WorkerProcess, wait_for

pytestmark = pytest.mark.servers
MINIMAL = (Path(__file__).parent / "bpmn" / "minimal.bpmn").read_text()


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli.main", *args], cwd=ROOT,
                          env=dict(os.environ, COLUMNS="250"), capture_output=True, text=True, timeout=120)


def _definitions(tmp_path: Path, tag: str, bpmn: str = MINIMAL, condition: object = None) -> Path:
    (tmp_path / "flow.bpmn").write_text(bpmn)
    doc = {
        "workflows": [{"name": f"flow-{tag}", "file": "flow.bpmn", "stages": ["Activation"]}],
        "segments": [{"name": f"pro-{tag}", "ttl": "10m",
                      "conditions": {"field": "user.attributes.plan", "op": "eq", "value": "pro"}}],
        "triggers": [{"name": f"trig-{tag}", "event_type": f"cli.e{tag}", "workflow": f"flow-{tag}",
                      "conditions": condition or {"in_segment": f"pro-{tag}"}, "cooldown": "1d"}],
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def _count(engine: Engine, sql: str, **params: object) -> int:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def test_apply_creates_updates_and_versions(engine: Engine, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    path = _definitions(tmp_path, tag)
    first = fleet("apply", str(path))
    assert first.returncode == 0, first.stderr
    assert f"created   trigger trig-{tag}" in first.stdout
    assert "unchanged" in fleet("apply", str(path)).stdout
    _definitions(tmp_path, tag, MINIMAL.replace('id="end"', 'id="finish"')
                 .replace('targetRef="end"', 'targetRef="finish"'))
    assert f"updated   workflow flow-{tag} 2.0.0" in fleet("apply", str(path)).stdout
    assert _count(engine, "SELECT count(*) FROM workflow_versions v JOIN workflows w "
                  "ON w.id = v.workflow_id WHERE w.name = :n", n=f"flow-{tag}") == 2
    assert _count(engine, "SELECT cooldown_seconds FROM triggers WHERE name = :n",
                  n=f"trig-{tag}") == 86400
    listed = fleet("trigger", "list").stdout
    assert f"trig-{tag}" in listed
    assert fleet("trigger", "disable", f"trig-{tag}").returncode == 0
    assert _count(engine, "SELECT count(*) FROM triggers WHERE name = :n AND NOT enabled",
                  n=f"trig-{tag}") == 1
    assert f"pro-{tag}" in fleet("segment", "list").stdout
    shown = fleet("segment", "show", f"pro-{tag}")
    assert shown.returncode == 0 and "(dynamic, ttl 10m, refreshed never): 0 members" in shown.stdout


@pytest.mark.parametrize(("bpmn", "condition", "message"), [
    (MINIMAL, {"field": "event.data.x", "op": "nope", "value": 1}, "/op: unknown operator"),
    (MINIMAL, {"in_segment": "no-such-segment"}, "in_segment names no segment"),
    (MINIMAL, {"any": [{"field": "event.data.x", "op": "in", "value": list(range(1000))}] * 10},
     "invalid condition at /any/9/value: the condition costs more than 10,000"),
    ("<not bpmn", None, "not well-formed XML"),
    ((Path(__file__).parent / "bpmn" / "hostile_script.bpmn").read_text(), None,
     "element compute: script refused: unknown function '__import__'"),
])
def test_apply_rejects_invalid_definitions_and_writes_nothing(
        engine: Engine, tmp_path: Path, bpmn: str, condition: object, message: str) -> None:
    tag = uuid.uuid4().hex[:8]
    result = fleet("apply", str(_definitions(tmp_path, tag, bpmn, condition)))
    assert result.returncode == 2
    assert message in result.stderr
    assert _count(engine, "SELECT count(*) FROM workflows WHERE name = :n", n=f"flow-{tag}") == 0
    assert _count(engine, "SELECT count(*) FROM user_segments WHERE name = :n", n=f"pro-{tag}") == 0


def test_emit_file_and_dlq(engine: Engine, celery_worker: WorkerProcess, tmp_path: Path) -> None:
    etype = f"cli.f{uuid.uuid4().hex[:8]}"
    good = [{"event_id": str(uuid.uuid4()), "event_type": etype, "user": f"f{i}@example.com"}
            for i in range(5)]
    lines = [json.dumps(g) for g in good] + ["{broken", json.dumps({"event_type": "BAD"})]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = fleet("emit", "--file", str(path))
    assert result.returncode == 0, result.stderr
    assert "sent 7 events (1 lines were not JSON" in result.stdout
    wait_for(lambda: _count(engine, "SELECT count(*) FROM lifecycle_events WHERE event_type = :t",
                            t=etype) == 5, message="5 events")
    wait_for(lambda: _count(engine, "SELECT count(*) FROM dead_letters WHERE "
                            "raw_payload = CAST('{broken' AS bytea) OR "
                            "payload->>'event_type' = 'BAD'") == 2, message="2 dead letters")
    assert "{broken" in fleet("dlq", "list").stdout
    single = fleet("emit", etype, "--user", "one@example.com", "--data", '{"k": 1}')
    assert single.returncode == 0 and single.stdout.startswith("sent ")
    bad = fleet("emit", "Not A Type", "--user", "one@example.com")
    assert bad.returncode == 2 and "invalid event" in bad.stderr


def test_static_segments_status_and_funnel(engine: Engine, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO user_segments (name, conditions, kind) "
                          "VALUES (:n, '{}', 'static')"), {"n": f"vip-{tag}"})
        conn.execute(text("INSERT INTO users (email, current_lifecycle_stage) "
                          "VALUES (:e, 'Revenue')"), {"e": f"{tag}@example.com"})
    added = fleet("segment", "add", f"vip-{tag}", f"{tag}@example.com", "nobody@example.com")
    assert "added 1 of 2 users (1 unknown)" in added.stdout
    assert "1 members" in fleet("segment", "show", f"vip-{tag}").stdout
    assert "removed 1 of 1" in fleet("segment", "remove", f"vip-{tag}", f"{tag}@example.com").stdout

    status = fleet("status")
    assert status.returncode == 0, status.stderr
    assert "lifecycle_events" in status.stdout and "dead letters pending" in status.stdout

    today = __import__("datetime").date.today().isoformat()
    assert fleet("metrics", "backfill", "--from", today, "--to", today).returncode == 0
    chart = tmp_path / "funnel.html"
    shown = fleet("metrics", "show", "--days", "2", "--chart", str(chart))
    assert shown.returncode == 0, shown.stderr
    page = chart.read_text()
    assert "<svg" in page and "Acquisition:" in page and "Referral:" in page


def test_workflow_and_execution_commands(celery_worker: WorkerProcess) -> None:
    from tests.workflow_helpers import BPMN, start, wait_waiting

    name = f"cli-wf-{uuid.uuid4().hex[:8]}"
    bad = fleet("workflow", "deploy", str(BPMN / "hostile_script.bpmn"), "--name", name)
    assert bad.returncode == 2 and "not deployed" in bad.stdout + bad.stderr
    deployed = fleet("workflow", "deploy", str(BPMN / "engine_timer.bpmn"), "--name", name,
                     "--stages", "Activation", "--activate")
    assert deployed.returncode == 0 and f"created   workflow {name} 1.0.0" in deployed.stdout + deployed.stderr
    execution_id = start(name, {"due": "2999-01-01T00:00:00+00:00"})
    wait_waiting(execution_id)
    shown = fleet("execution", "show", str(execution_id))
    assert shown.returncode == 0 and "wakes at  2999-01-01" in shown.stdout + shown.stderr
    assert fleet("execution", "pause", str(execution_id)).returncode == 0
    paused = fleet("execution", "show", str(execution_id))
    assert "(paused)" in paused.stdout + paused.stderr
    assert fleet("execution", "cancel", str(execution_id)).returncode == 0
    again = fleet("execution", "cancel", str(execution_id))
    assert again.returncode == 1 and "already cancelled" in again.stdout + again.stderr
    listed = fleet("workflow", "list")
    assert name in listed.stdout + listed.stderr and "cancelled 1" in listed.stdout + listed.stderr


def test_deploy_and_apply_several_files(engine: Engine, tmp_path: Path) -> None:
    """A main file and the file of the process it calls, by `workflow deploy` and `apply`."""
    from tests.workflow_helpers import BPMN

    name = f"cli-multi-{uuid.uuid4().hex[:8]}"
    main, helper = str(BPMN / "call_main.bpmn"), str(BPMN / "call_helper.bpmn")
    alone = fleet("workflow", "deploy", main, "--name", name)
    assert alone.returncode == 2 and "which is in no deployed file: deploy both files together" \
        in alone.stdout + alone.stderr
    both = fleet("workflow", "deploy", main, helper, "--name", name, "--process", "call_main")
    assert both.returncode == 0, both.stdout + both.stderr
    assert f"created   workflow {name} 1.0.0" in both.stdout + both.stderr
    assert _count(engine, "SELECT count(*) FROM workflow_versions v JOIN workflows w "
                  "ON w.id = v.workflow_id WHERE w.name = :n AND v.process_id = 'call_main' "
                  "AND v.extra_files ? 'call_helper.bpmn'", n=name) == 1
    (tmp_path / "main.bpmn").write_text((BPMN / "call_main.bpmn").read_text())
    (tmp_path / "call_helper.bpmn").write_text((BPMN / "call_helper.bpmn").read_text())
    path = tmp_path / "fleet.yaml"
    path.write_text(json.dumps({"workflows": [
        {"name": name, "file": ["main.bpmn", "call_helper.bpmn"], "process": "call_main"}]}))
    applied = fleet("apply", str(path))
    assert applied.returncode == 0 and f"updated   workflow {name}" in applied.stdout + applied.stderr, (
        applied.stdout + applied.stderr)  # same files, the status becomes active
    assert _count(engine, "SELECT count(*) FROM workflow_versions v JOIN workflows w "
                  "ON w.id = v.workflow_id WHERE w.name = :n", n=name) == 1


def test_apply_reports_every_problem_of_every_definition(tmp_path: Path) -> None:
    (tmp_path / "flow.bpmn").write_text(MINIMAL)
    (tmp_path / "bad.yaml").write_text(
        "workflows:\n  - {name: w, file: missing.bpmn}\n"
        "segments:\n  - {name: s, ttl: 3 fortnights}\n"
        "triggers:\n  - {name: t, event_type: User.Signed, colour: red}\n"
        "  - {name: u, event_type: a.b, cooldown: forever}\n")
    result = fleet("apply", str(tmp_path / "bad.yaml"))
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    for problem in ("/workflows/0/file: workflow w (", "/segments/0/ttl: segment s: expected a duration",
                    "/triggers/0/event_type: trigger t: 'User.Signed' is not an event type",
                    "/triggers/0/colour: trigger t: Extra inputs",
                    "/triggers/1/cooldown: trigger u: expected a duration"):
        assert f"bad.yaml: {problem}" in output, output
    (tmp_path / "syntax.yaml").write_text("triggers:\n  - name: x\n    event_type: [a\n")
    result = fleet("apply", str(tmp_path / "syntax.yaml"))
    assert result.returncode == 2
    assert "syntax.yaml:4:1: invalid YAML" in result.stdout + result.stderr


@pytest.mark.parametrize("data", ["[1,2]", "123", "{bad"])
def test_emit_refuses_data_that_is_not_an_object(data: str) -> None:
    result = fleet("emit", "cli.bad_data", "--user", "ada@example.com", "--data", data)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert output.count("\n") <= 2 and "invalid --data" in output, output


def test_emit_refuses_an_unknown_user_id() -> None:
    unknown = str(uuid.uuid4())
    result = fleet("emit", "cli.unknown_user", "--user", unknown)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"no user with id {unknown}" in result.stderr
