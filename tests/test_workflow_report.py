"""`fleet workflow report`: per-node counts of real executions, checked two ways, and the picture.

Executions run through the engine in process (`control.start`, `stepper.step`, one
transaction per step, on a fixed step clock) down each branch of one workflow: two
end at once, one fails at a node, two wait on a timer (one is woken an hour later),
one waits for a message, one is never stepped. Every figure of the report is
checked against numbers worked out by hand and against direct `execution_steps`
queries; the SVG is parsed as XML, with BPMNDI coordinates and without.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from db.session import session_scope
from tests.helpers import ROOT
from tests.workflow_helpers import deploy_xml, execution, new_user, store_messaging
from workers.engine import control, stepper
from workers.events.ingest import ingest
from workers.reports.diagram import layout, workflow_section_html, workflow_svg
from workers.reports.nodes import ReportError, WorkflowReport, parse_graph, workflow_report
from workers.rules.triggers import TriggerCache
from workers.sends.config import GoalDef, WorkflowSettings
from workers.sends.policy import load

pytestmark = pytest.mark.servers

T0 = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)  # the steps' clock
HOUR = dt.timedelta(hours=1)
SVG_NS = "{http://www.w3.org/2000/svg}"

PROCESS = """
  <bpmn:message id="done" name="report.test_done"/>
  <bpmn:process id="report_flow" isExecutable="true">
    <bpmn:startEvent id="start" name="Signed up"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="score"/>
    <bpmn:scriptTask id="score" name="Score the user">
      <bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
      <bpmn:script>route = kind</bpmn:script></bpmn:scriptTask>
    <bpmn:sequenceFlow id="f2" sourceRef="score" targetRef="gw"/>
    <bpmn:exclusiveGateway id="gw" name="Which way?" default="to_fast">
      <bpmn:incoming>f2</bpmn:incoming><bpmn:outgoing>to_boom</bpmn:outgoing>
      <bpmn:outgoing>to_timer</bpmn:outgoing><bpmn:outgoing>to_msg</bpmn:outgoing>
      <bpmn:outgoing>to_fast</bpmn:outgoing></bpmn:exclusiveGateway>
    <bpmn:sequenceFlow id="to_boom" sourceRef="gw" targetRef="boom">
      <bpmn:conditionExpression>kind == "fail"</bpmn:conditionExpression></bpmn:sequenceFlow>
    <bpmn:sequenceFlow id="to_timer" sourceRef="gw" targetRef="wait_timer">
      <bpmn:conditionExpression>kind == "timer"</bpmn:conditionExpression></bpmn:sequenceFlow>
    <bpmn:sequenceFlow id="to_msg" sourceRef="gw" targetRef="wait_msg">
      <bpmn:conditionExpression>kind == "message"</bpmn:conditionExpression></bpmn:sequenceFlow>
    <bpmn:sequenceFlow id="to_fast" sourceRef="gw" targetRef="end_fast"/>
    <bpmn:scriptTask id="boom" name="Breaks">
      <bpmn:incoming>to_boom</bpmn:incoming><bpmn:outgoing>f3</bpmn:outgoing>
      <bpmn:script>broken = [][1]</bpmn:script></bpmn:scriptTask>
    <bpmn:sequenceFlow id="f3" sourceRef="boom" targetRef="end_boom"/>
    <bpmn:endEvent id="end_boom"><bpmn:incoming>f3</bpmn:incoming></bpmn:endEvent>
    <bpmn:intermediateCatchEvent id="wait_timer" name="Wait a while">
      <bpmn:incoming>to_timer</bpmn:incoming><bpmn:outgoing>f4</bpmn:outgoing>
      <bpmn:timerEventDefinition><bpmn:timeDate>wake_time</bpmn:timeDate></bpmn:timerEventDefinition>
    </bpmn:intermediateCatchEvent>
    <bpmn:sequenceFlow id="f4" sourceRef="wait_timer" targetRef="after_timer"/>
    <bpmn:scriptTask id="after_timer" name="Nudge">
      <bpmn:incoming>f4</bpmn:incoming><bpmn:outgoing>f5</bpmn:outgoing>
      <bpmn:script>nudged = True</bpmn:script></bpmn:scriptTask>
    <bpmn:sequenceFlow id="f5" sourceRef="after_timer" targetRef="end_timer"/>
    <bpmn:endEvent id="end_timer" name="Nudged"><bpmn:incoming>f5</bpmn:incoming></bpmn:endEvent>
    <bpmn:intermediateCatchEvent id="wait_msg" name="Wait for done">
      <bpmn:incoming>to_msg</bpmn:incoming><bpmn:outgoing>f6</bpmn:outgoing>
      <bpmn:messageEventDefinition messageRef="done"/></bpmn:intermediateCatchEvent>
    <bpmn:sequenceFlow id="f6" sourceRef="wait_msg" targetRef="end_msg"/>
    <bpmn:endEvent id="end_msg"><bpmn:incoming>f6</bpmn:incoming></bpmn:endEvent>
    <bpmn:endEvent id="end_fast" name="Done at once"><bpmn:incoming>to_fast</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>"""

SHAPES = {"start": (100, 200, 36, 36), "score": (180, 178, 100, 80), "gw": (330, 193, 50, 50),
          "boom": (450, 40, 100, 80), "end_boom": (610, 62, 36, 36),
          "wait_timer": (482, 160, 36, 36), "after_timer": (570, 138, 100, 80),
          "end_timer": (720, 160, 36, 36), "wait_msg": (482, 280, 36, 36),
          "end_msg": (610, 280, 36, 36), "end_fast": (482, 380, 36, 36)}
EDGES = {"f1": [(136, 218), (180, 218)], "f2": [(280, 218), (330, 218)],
         "to_boom": [(355, 193), (355, 80), (450, 80)], "to_timer": [(380, 218), (482, 178)],
         "to_msg": [(355, 243), (355, 298), (482, 298)], "to_fast": [(355, 243), (355, 398),
                                                                     (482, 398)],
         "f3": [(550, 80), (610, 80)], "f4": [(518, 178), (570, 178)],
         "f5": [(670, 178), (720, 178)], "f6": [(518, 298), (610, 298)]}
NODE_IDS = list(SHAPES)
NAMES = ["Signed up", "Score the user", "Which way?", "Breaks", "Wait a while", "Nudge",
         "Nudged", "Wait for done", "Done at once"]


def _bpmn(with_di: bool) -> str:
    di = ""
    if with_di:
        shapes = "".join(
            f'<bpmndi:BPMNShape id="{k}_di" bpmnElement="{k}"><dc:Bounds x="{x}" y="{y}" '
            f'width="{w}" height="{h}"/></bpmndi:BPMNShape>' for k, (x, y, w, h) in SHAPES.items())
        edges = "".join(
            f'<bpmndi:BPMNEdge id="{k}_di" bpmnElement="{k}">'
            + "".join(f'<di:waypoint x="{x}" y="{y}"/>' for x, y in points)
            + "</bpmndi:BPMNEdge>" for k, points in EDGES.items())
        di = (f'<bpmndi:BPMNDiagram id="d"><bpmndi:BPMNPlane id="p" bpmnElement="report_flow">'
              f"{shapes}{edges}</bpmndi:BPMNPlane></bpmndi:BPMNDiagram>")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<bpmn:definitions '
            'xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL" '
            'xmlns:bpmndi="http://www.omg.org/spec/BPMN/20100524/DI" '
            'xmlns:dc="http://www.omg.org/spec/DD/20100524/DC" '
            'xmlns:di="http://www.omg.org/spec/DD/20100524/DI" '
            f'id="report-defs" targetNamespace="http://lifecycle-fleet/test">{PROCESS}{di}'
            "</bpmn:definitions>")


def _start(workflow: str, variables: dict[str, Any]) -> uuid.UUID:
    with session_scope() as session:
        return control.start(session, workflow, new_user(), variables, now=T0)


def _run(execution_id: uuid.UUID, now: dt.datetime) -> None:
    """Step as the task chain would, until no next step is asked for at once."""
    version: int | None = execution(execution_id).state_version
    while version is not None:
        with session_scope() as session:
            result = stepper.step(session, execution_id, version, now=now)
        version = result.next_version if result.send_at is None else None


@pytest.fixture(scope="module")
def ran() -> dict[str, Any]:
    """The workflow, deployed with DI and a goal (50% holdout), and its executions."""
    store_messaging(None)
    name = deploy_xml(_bpmn(with_di=True), f"report-{uuid.uuid4().hex[:8]}")
    goal_type = f"report.goal_{uuid.uuid4().hex[:8]}"
    settings = WorkflowSettings(goal=GoalDef(event_type=goal_type, within="30d"), holdout=50)
    with session_scope() as session:
        session.execute(text("UPDATE workflows SET settings = CAST(:s AS jsonb), "
                             "updated_at = now() WHERE name = :n"),
                        {"s": json.dumps(settings.model_dump(mode="json")), "n": name})
    far = "2100-01-01T00:00:00+00:00"
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    ids = {"fast1": _start(name, {"kind": "fast"}), "fast2": _start(name, {"kind": "fast"}),
           "fail": _start(name, {"kind": "fail"}),
           "timer_woken": _start(name, {"kind": "timer", "wake_time": soon.isoformat()}),
           "timer_waiting": _start(name, {"kind": "timer", "wake_time": far}),
           "message": _start(name, {"kind": "message"}),
           "pending": _start(name, {"kind": "fast"})}
    for key, execution_id in ids.items():
        if key != "pending":
            _run(execution_id, T0)
    time.sleep(max(0.0, (soon - dt.datetime.now(dt.UTC)).total_seconds()) + 0.2)
    _run(ids["timer_woken"], T0 + HOUR)  # the timer is due: it fires an hour after T0
    # Goals reached, recorded by ingest as in production: by fast1 and the woken one.
    with session_scope() as session:
        emails = {row.id: row.email for row in session.execute(text(
            "SELECT x.id, u.email FROM workflow_executions x JOIN users u ON u.id = x.user_id "
            "WHERE x.id = ANY(CAST(:ids AS uuid[]))"), {"ids": list(ids.values())})}
        ingest(session, [{"event_id": str(uuid.uuid4()), "event_type": goal_type,
                          "user": emails[ids[k]]} for k in ("fast1", "timer_woken")],
               source="test", triggers=TriggerCache(refresh_seconds=0),
               now=dt.datetime.now(dt.UTC))
    return {"name": name, "ids": ids, "goal": goal_type}


def _report(name: str, **kwargs: Any) -> WorkflowReport:
    with session_scope() as session:
        return workflow_report(session, name, **kwargs)


def test_the_executions_ran_as_the_test_means(ran: dict[str, Any]) -> None:
    """The premise: each execution is where the hand-worked numbers say."""
    ran_ids = ran["ids"]
    statuses = {k: execution(v).status for k, v in ran_ids.items()}
    assert statuses == {"fast1": "completed", "fast2": "completed", "fail": "failed",
                        "timer_woken": "completed", "timer_waiting": "running",
                        "message": "running", "pending": "pending"}
    assert execution(ran_ids["timer_waiting"]).wake_at is not None
    assert execution(ran_ids["message"]).awaiting_events == ["report.test_done"]
    assert "boom" in (execution(ran_ids["fail"]).error_message or "")


EXPECTED = {  # node: (reached, completed, failed, waiting), worked out by hand
    "start": (6, 6, 0, 0), "score": (6, 6, 0, 0), "gw": (6, 6, 0, 0),
    "boom": (1, 0, 1, 0), "end_boom": (0, 0, 0, 0),
    "wait_timer": (2, 1, 0, 1), "after_timer": (1, 1, 0, 0), "end_timer": (1, 1, 0, 0),
    "wait_msg": (1, 0, 0, 1), "end_msg": (0, 0, 0, 0), "end_fast": (2, 2, 0, 0)}
EXPECTED_EDGES = {("start", "score"): 6, ("score", "gw"): 6, ("gw", "boom"): 1,
                  ("gw", "wait_timer"): 2, ("wait_timer", "after_timer"): 1,
                  ("after_timer", "end_timer"): 1, ("gw", "wait_msg"): 1, ("gw", "end_fast"): 2}


def test_node_counts_match_hand_worked_numbers(ran: dict[str, Any]) -> None:
    report = _report(ran["name"])
    assert report.version == "1.0.0" and report.executions == 7
    got = {n.node_id: (n.reached, n.completed, n.failed, n.waiting) for n in report.nodes}
    assert got == EXPECTED
    assert all(n.stalled == 0 for n in report.nodes)
    assert [n.node_id for n in report.nodes] == NODE_IDS  # document order, every drawn node
    # Steps ran on the fixed clock: the woken timer waited exactly an hour; the rest ran at once.
    assert report.node("wait_timer").median_seconds == 3600.0
    assert report.node("score").median_seconds == 0.0
    assert report.node("wait_msg").median_seconds is None  # nothing left it yet
    assert report.node("boom").median_seconds == 0.0  # a failure ends a visit too


def test_edges_and_drop_off(ran: dict[str, Any]) -> None:
    report = _report(ran["name"])
    assert {(e.source, e.target): e.executions for e in report.edges} == EXPECTED_EDGES
    assert all(e.drawn for e in report.edges)
    to_timer = report.edge("gw", "wait_timer")
    assert to_timer is not None and to_timer.share == pytest.approx(2 / 6)
    assert to_timer.drop_off == pytest.approx(4 / 6)
    assert report.edge("wait_msg", "end_msg") is None  # no one went on from the message wait


def test_counts_agree_with_execution_steps(ran: dict[str, Any]) -> None:
    """The same figures from the history rows directly (and the executions' waits)."""
    name = ran["name"]
    with session_scope() as session:
        steps = session.execute(text(
            "SELECT s.execution_id, s.seq, s.node_id, s.outcome FROM execution_steps s "
            "JOIN workflow_executions x ON x.id = s.execution_id JOIN workflows w "
            "ON w.id = x.workflow_id WHERE w.name = :n ORDER BY s.execution_id, s.seq"),
            {"n": name}).all()
        executions = {r.id: r for r in session.execute(text(
            "SELECT x.id, x.status, x.wake_at, x.awaiting_events FROM workflow_executions x "
            "JOIN workflows w ON w.id = x.workflow_id WHERE w.name = :n"), {"n": name})}
    by_execution: dict[uuid.UUID, list[Any]] = defaultdict(list)
    for row in steps:
        by_execution[row.execution_id].append(row)
    reached: dict[str, set[uuid.UUID]] = defaultdict(set)
    completed: dict[str, set[uuid.UUID]] = defaultdict(set)
    failed: dict[str, int] = defaultdict(int)
    edges: dict[tuple[str, str], set[uuid.UUID]] = defaultdict(set)
    for execution_id, rows in by_execution.items():
        for before, after in zip(rows, rows[1:], strict=False):
            edges[(before.node_id, after.node_id)].add(execution_id)
        for row in rows:
            reached[row.node_id].add(execution_id)
            if row.outcome == "completed":
                completed[row.node_id].add(execution_id)
        if executions[execution_id].status == "failed" and rows[-1].outcome == "failed":
            failed[rows[-1].node_id] += 1
    # A timer or message wait has no row until it fires: the execution says it waits.
    waiting = {"wait_timer": {i for i, x in executions.items()
                              if x.status == "running" and x.wake_at is not None},
               "wait_msg": {i for i, x in executions.items()
                            if x.status == "running" and x.awaiting_events}}
    for node, ids in waiting.items():
        for execution_id in ids:
            reached[node].add(execution_id)
            edges[(by_execution[execution_id][-1].node_id, node)].add(execution_id)
    report = _report(name)
    for n in report.nodes:
        assert n.reached == len(reached[n.node_id]), n
        assert n.completed == len(completed[n.node_id]), n
        assert n.failed == failed[n.node_id], n
        assert n.waiting == len(waiting.get(n.node_id, ())), n
    assert {(e.source, e.target): e.executions for e in report.edges} == {
        k: len(v) for k, v in edges.items()}


def test_outcomes_and_goal_conversion_treated_vs_held_out(ran: dict[str, Any]) -> None:
    report = _report(ran["name"])
    assert dict(report.outcomes) == {"pending": 1, "running": 2, "completed": 3, "failed": 1,
                                     "cancelled": 0, "paused": 0, "stalled": 0,
                                     "goal_exits": 0, "condition_exits": 0}
    assert report.goal == ran["goal"]
    # The holdout rule's Python twin (the send gateway's) splits the same users.
    with session_scope() as session:
        policy = load(session)
        users = {row.id: row.user_id for row in session.execute(text(
            "SELECT id, user_id FROM workflow_executions WHERE id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": list(ran["ids"].values())})}
    workflow = policy.workflow(report.workflow_id)
    held = {k for k, v in ran["ids"].items() if policy.held_out(workflow, users[v])}
    converted = {"fast1", "timer_woken"}
    c = report.conversion
    assert c is not None
    assert (c.treated, c.treated_converted) == (7 - len(held), len(converted - held))
    assert (c.held_out, c.held_out_converted) == (len(held), len(converted & held))
    assert c.treated + c.held_out == 7 and c.treated_converted + c.held_out_converted == 2



# --------------------------------------------------------------------------- the picture


def _svg_nodes(svg: str) -> dict[str, ET.Element]:
    root = ET.fromstring(svg)  # parses as XML
    assert root.tag == f"{SVG_NS}svg"
    assert not list(root.iter(f"{SVG_NS}script"))
    return {g.get("data-node-id", ""): g for g in root.iter(f"{SVG_NS}g")
            if g.get("class") == "node"}


def _texts(element: ET.Element) -> str:
    return " ".join("".join(t.itertext()) for t in element.iter(f"{SVG_NS}text"))


def test_svg_draws_every_node_with_its_counts_at_the_di_coordinates(ran: dict[str, Any]) -> None:
    report = _report(ran["name"], version="1.0.0")
    assert report.graph.has_di
    svg = workflow_svg(report)
    nodes = _svg_nodes(svg)
    assert sorted(nodes) == sorted(NODE_IDS)
    for name in NAMES:
        assert name in svg
    for node_id, (reached, completed, failed, waiting) in EXPECTED.items():
        shown = _texts(nodes[node_id])
        assert f"{reached} reached · {completed} done" in shown, (node_id, shown)
        assert (f"{waiting} waiting" in shown) == bool(waiting), (node_id, shown)
        assert (f"{failed} failed" in shown) == bool(failed), (node_id, shown)
    assert "median 1h" in _texts(nodes["wait_timer"])
    edges = {g.get("data-flow-id"): _texts(g) for g in ET.fromstring(svg).iter(f"{SVG_NS}g")
             if g.get("class") == "edge"}
    assert edges["to_timer"] == "2 (33.3%)" and edges["f1"] == "6 (100.0%)"
    assert edges["f6"] == "0"
    # Shapes sit where the modeler drew them (all moved by one translation).
    placed = layout(report.graph)
    assert placed.from_di
    for node_id, (x, y, w, h) in SHAPES.items():
        b = placed.bounds[node_id]
        assert (b.x, b.y, b.width, b.height) == (x, y, w, h)
    assert [tuple(p) for p in placed.paths["to_boom"]] == EDGES["to_boom"]
    rect = nodes["score"].find(f"{SVG_NS}rect")
    circle = nodes["start"].find(f"{SVG_NS}circle")
    assert rect is not None and circle is not None
    # score's left edge is 80 to the right of start's, as in the DI (180 - 100)
    assert float(rect.get("x", 0)) - (float(circle.get("cx", 0)) - 18) == pytest.approx(80)


def test_without_di_the_nodes_are_laid_out_in_layers() -> None:
    graph = parse_graph(_bpmn(with_di=False), process_id="report_flow")
    assert not graph.has_di
    placed = layout(graph)
    assert not placed.from_di and sorted(placed.bounds) == sorted(NODE_IDS)

    def column(node_id: str) -> float:
        b = placed.bounds[node_id]
        return b.x + b.width / 2

    # start | score | gw | boom, wait_timer, wait_msg, end_fast | end_boom, after_timer, end_msg | end_timer
    layers = [["start"], ["score"], ["gw"], ["boom", "wait_timer", "wait_msg", "end_fast"],
              ["end_boom", "after_timer", "end_msg"], ["end_timer"]]
    for left, right in zip(layers, layers[1:], strict=False):
        assert max(column(n) for n in left) < min(column(n) for n in right)
    for layer in layers:
        assert len({column(n) for n in layer}) == 1
        ys = [placed.bounds[n].y + placed.bounds[n].height / 2 for n in layer]
        assert len(set(ys)) == len(ys)  # no two nodes on top of each other
    assert set(placed.paths) == set(EDGES)  # every flow is drawn
    # The no-DI version's report draws too, every node and count present.
    deployed = deploy_xml(_bpmn(with_di=False))
    svg = workflow_svg(_report(deployed))
    assert sorted(_svg_nodes(svg)) == sorted(NODE_IDS)
    assert svg.count("0 reached · 0 done") == len(NODE_IDS)


def test_a_loop_is_cut_for_the_layout() -> None:
    xml = ('<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL" id="d">'
           '<bpmn:process id="p" isExecutable="true"><bpmn:startEvent id="s"/>'
           '<bpmn:task id="a"/><bpmn:exclusiveGateway id="g"/><bpmn:endEvent id="e"/>'
           '<bpmn:sequenceFlow id="1" sourceRef="s" targetRef="a"/>'
           '<bpmn:sequenceFlow id="2" sourceRef="a" targetRef="g"/>'
           '<bpmn:sequenceFlow id="3" sourceRef="g" targetRef="a"/>'
           '<bpmn:sequenceFlow id="4" sourceRef="g" targetRef="e"/></bpmn:process>'
           "</bpmn:definitions>")
    placed = layout(parse_graph(xml, process_id="p"))
    xs = [placed.bounds[n].x + placed.bounds[n].width / 2 for n in ("s", "a", "g", "e")]
    assert xs == sorted(xs) and len(set(xs)) == 4
    assert len(placed.paths["3"]) == 3  # the flow back is drawn below, not through the nodes


def test_the_html_section_is_a_ready_fragment(ran: dict[str, Any]) -> None:
    with session_scope() as session:
        fragment = workflow_section_html(session, ran["name"], 30)
    assert fragment.startswith("<section") and fragment.endswith("</section>")
    assert "<svg" in fragment and "<script" not in fragment
    assert "executions at each node" in fragment
    assert re.search(r"Goal <code>report\.goal_\w+</code>: treated \d", fragment)
    assert "7 executions" in fragment


# --------------------------------------------------------------------------- the command


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli.main", *args], cwd=ROOT,
                          env=dict(os.environ, COLUMNS="250"), capture_output=True, text=True,
                          timeout=120)


def test_the_command_prints_json_tables_and_writes_the_svg(ran: dict[str, Any], tmp_path: Path) -> None:
    name = ran["name"]
    svg = tmp_path / "flow.svg"
    done = _fleet("workflow", "report", name, "--version", "1.0.0", "--json", "--svg", str(svg))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["version"] == "1.0.0" and doc["executions"] == 7 and doc["days"] == 30
    assert {n["node_id"]: (n["reached"], n["completed"], n["failed"], n["waiting"])
            for n in doc["nodes"]} == EXPECTED
    assert {(e["source"], e["target"]): e["executions"] for e in doc["edges"]} == EXPECTED_EDGES
    assert doc["conversion"]["treated"]["executions"] + \
        doc["conversion"]["held_out"]["executions"] == 7
    assert sorted(_svg_nodes(svg.read_text())) == sorted(NODE_IDS)
    assert f"diagram written to {svg}" in done.stderr

    table = _fleet("workflow", "report", name, "--version", "1.0.0", "--days", "0")
    assert table.returncode == 0, table.stderr
    assert "7 executions (all)" in table.stdout
    row = next(line for line in table.stdout.splitlines() if " wait_timer " in line)
    assert re.search(r"intermediateCatchEvent\s*│\s*2\s*│\s*1\s*│\s*1\s*│\s*0\s*│\s*0\s*│"
                     r"\s*0\s*│\s*3600\.0s", row), row  # ... failed, stalled, exited, median
    assert "goal conversion" in table.stdout

    missing = _fleet("workflow", "report", f"missing-{uuid.uuid4().hex[:6]}")
    assert missing.returncode == 1 and "no workflow named" in missing.stderr

def test_days_and_versions(ran: dict[str, Any]) -> None:
    name = ran["name"]
    with session_scope() as session:  # one fast execution started 40 days ago
        session.execute(text("UPDATE workflow_executions SET started_at = now() - "
                             "interval '40 days' WHERE id = :i"), {"i": ran["ids"]["fast2"]})
    try:
        recent = _report(name, days=30)
        assert recent.executions == 6 and recent.node("end_fast").reached == 1
        assert recent.node("start").reached == 5
        assert _report(name, days=None).executions == 7
    finally:
        with session_scope() as session:
            session.execute(text("UPDATE workflow_executions SET started_at = now() "
                                 "WHERE id = :i"), {"i": ran["ids"]["fast2"]})
    # A new version is the default, with no executions yet; the old one is still reported.
    deploy_xml(_bpmn(with_di=False).replace('name="Nudge"', 'name="Nudge v2"'), name)
    current = _report(name)
    assert (current.version, current.executions) == ("2.0.0", 0)
    assert all(n.reached == 0 for n in current.nodes)
    assert _report(name, version="1.0.0").executions == 7
    with pytest.raises(ReportError, match="no version '9.9.9'"):
        _report(name, version="9.9.9")
    with pytest.raises(ReportError, match="no workflow named"):
        _report(f"missing-{uuid.uuid4().hex[:6]}")


def test_a_human_task_waits_where_awaiting_tasks_says() -> None:
    """A user task has no row until someone completes it: `awaiting_tasks` places the wait."""
    from tests.workflow_helpers import deploy

    name = deploy("user_task.bpmn")
    waiting, done = _start(name, {}), _start(name, {})
    for execution_id in (waiting, done):
        _run(execution_id, T0)
    assert execution(waiting).awaiting_tasks == ["approve"]
    with session_scope() as session:
        control.complete(session, done, "approve", {"approved": False}, now=T0 + 2 * HOUR)
    _run(done, T0 + 2 * HOUR)
    report = _report(name)
    approve = report.node("approve")
    assert (approve.reached, approve.completed, approve.waiting) == (2, 1, 1)
    assert approve.median_seconds == 7200.0  # from the step before it to the completion
    assert report.edge("start", "approve") is not None
    assert report.edge("start", "approve").executions == 2  # type: ignore[union-attr]
