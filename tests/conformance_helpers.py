"""The conformance suite's two drivers: plain SpiffWorkflow in-process, and the real fleet.

Each scenario is `tests/bpmn/conformance/NAME.bpmn` with `NAME.yaml` beside it:

    covers: what the file exercises
    files: [other.bpmn]            # deployed with it (multi-file)
    requires: [human, multi_file, correlation]
    start: {variable: value}       # "$NOW+0.5" is replaced by now + 0.5 s (ISO 8601, UTC)
    drive:                         # in order; each waits until it applies
      - {message: order.completed, payload: {...}, after_node: NODE}
      - {complete: NODE, data: {...}}
    expect: {state: completed|failed|cancelled, nodes: {node: count}, data: {...},
             failed_node: NODE}
    spiff_differs: why plain SpiffWorkflow does not give `expect` (a known difference)

Both drivers return an Outcome (end state, multiset of completed nodes, final data),
compared with each other and with `expect`.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from SpiffWorkflow.bpmn.script_engine import PythonScriptEngine
from SpiffWorkflow.bpmn.specs.event_definitions.message import MessageEventDefinition
from SpiffWorkflow.bpmn.specs.mixins.manual_task import ManualTask
from SpiffWorkflow.bpmn.specs.mixins.none_task import NoneTask
from SpiffWorkflow.bpmn.specs.mixins.user_task import UserTask
from SpiffWorkflow.bpmn.util.event import BpmnEvent
from SpiffWorkflow.bpmn.workflow import BpmnWorkflow
from SpiffWorkflow.exceptions import WorkflowException
from SpiffWorkflow.spiff.parser.process import SpiffBpmnParser
from SpiffWorkflow.util.task import TaskState

CONFORMANCE = Path(__file__).parent / "bpmn" / "conformance"
# The fleet's own variables (trigger event, user) and the envelope's per-delivery fields.
IGNORED_KEYS = frozenset({"event", "user", "event_id", "occurred_at"})
NOW = "$NOW"
TIMEOUT = 20.0


@dataclass(frozen=True)
class Scenario:
    name: str
    covers: str
    files: tuple[Path, ...]  # the scenario's own file first
    requires: frozenset[str]
    start: dict[str, Any]
    drive: tuple[dict[str, Any], ...]
    expect: dict[str, Any]
    spiff_differs: str | None  # where plain SpiffWorkflow is known to differ from the file


@dataclass
class Outcome:
    state: str
    nodes: Counter[str] = field(default_factory=Counter)
    data: dict[str, Any] | None = None
    failed_node: str | None = None
    note: str = ""


def load_scenarios() -> list[Scenario]:
    scenarios = []
    for spec_path in sorted(CONFORMANCE.glob("*.yaml")):
        spec = yaml.safe_load(spec_path.read_text())
        files = (spec_path.with_suffix(".bpmn"), *(CONFORMANCE / f for f in spec.get("files", [])))
        scenarios.append(Scenario(spec_path.stem, spec["covers"], files,
                                  frozenset(spec.get("requires", [])), spec.get("start") or {},
                                  tuple(spec.get("drive") or ()), spec["expect"],
                                  spec.get("spiff_differs")))
    return scenarios


def start_variables(scenario: Scenario) -> dict[str, Any]:
    """Start variables with `$NOW+S` replaced by an ISO 8601 time S seconds from now."""
    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(NOW):
            offset = float(value[len(NOW):] or 0)
            return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)).isoformat()
        return value
    return {k: resolve(v) for k, v in scenario.start.items()}


def envelope(name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A message as the fleet hands it to SpiffWorkflow: the event's envelope fields."""
    return {"event_id": str(uuid.uuid4()), "event_type": name, "data": payload,
            "occurred_at": dt.datetime.now(dt.UTC).isoformat()}


# --------------------------------------------------------------------------- comparison


def _without_envelope_ids(value: Any) -> Any:
    """A message variable without the delivery's event_id and occurred_at."""
    if isinstance(value, dict) and "event_type" in value:
        return {k: v for k, v in value.items() if k not in ("event_id", "occurred_at")}
    return value


def _masked(scenario: Scenario, data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    data = json.loads(json.dumps(data, default=str))
    out = {k: _without_envelope_ids(v) for k, v in data.items() if k not in IGNORED_KEYS
           and not (k == "data_objects" and not v)}
    for key, value in scenario.start.items():  # times resolved at start differ per run
        if isinstance(value, str) and value.startswith(NOW) and key in out:
            out[key] = value
    return out


def differences(scenario: Scenario, left_name: str, left: Outcome, right_name: str,
                right: Outcome) -> list[str]:
    """Readable differences between two outcomes (data only for completed runs)."""
    diffs = []
    if left.state != right.state:
        diffs.append(f"end state: {left_name} {left.state!r}, {right_name} {right.state!r}")
    if left.nodes != right.nodes:
        for node in sorted(set(left.nodes) | set(right.nodes)):
            if left.nodes[node] != right.nodes[node]:
                diffs.append(f"node {node}: completed {left.nodes[node]}x in {left_name}, "
                             f"{right.nodes[node]}x in {right_name}")
    if left.state == right.state == "failed":
        if left.failed_node and right.failed_node and left.failed_node != right.failed_node:
            diffs.append(f"failed node: {left_name} {left.failed_node}, "
                         f"{right_name} {right.failed_node}")
    elif left.state == right.state:
        ldata, rdata = _masked(scenario, left.data), _masked(scenario, right.data)
        if ldata != rdata:
            ldata, rdata = ldata or {}, rdata or {}
            for key in sorted(set(ldata) | set(rdata)):
                if ldata.get(key, "<absent>") != rdata.get(key, "<absent>"):
                    diffs.append(f"data {key!r}: {left_name} {ldata.get(key, '<absent>')!r}, "
                                 f"{right_name} {rdata.get(key, '<absent>')!r}")
    notes = [f"{n}: {o.note}" for n, o in ((left_name, left), (right_name, right)) if o.note]
    return diffs + (notes if diffs else [])


def expected(scenario: Scenario) -> Outcome:
    e = scenario.expect
    return Outcome(e["state"], Counter(e.get("nodes") or {}), e.get("data"), e.get("failed_node"))


# --------------------------------------------------------------------------- plain SpiffWorkflow


class _ScriptEngine(PythonScriptEngine):
    """SpiffWorkflow's own engine; service tasks return what the fleet's operator returns."""

    def call_service(self, task: Any, operation_name: str, operation_params: dict[str, Any]) -> str:
        if operation_name == "update_user_attributes":
            return json.dumps({"updated": sorted(operation_params["attributes"]["value"])})
        raise NotImplementedError(f"operator {operation_name} has no in-process stand-in")


def _spiff_workflow(scenario: Scenario) -> BpmnWorkflow:
    parser = SpiffBpmnParser()
    for path in scenario.files:
        parser.add_bpmn_file(str(path))
    spec = parser.get_spec(scenario.name)
    workflow = BpmnWorkflow(spec, parser.get_subprocess_specs(scenario.name),
                            script_engine=_ScriptEngine())
    workflow.get_next_task(spec_name="Start").set_data(**start_variables(scenario))
    return workflow


def _all_tasks(workflow: BpmnWorkflow) -> list[Any]:
    tasks = {t.id: t for t in workflow.get_tasks()}
    for sub in workflow.subprocesses.values():
        tasks.update({t.id: t for t in sub.get_tasks()})
    return list(tasks.values())


def _spiff_nodes(workflow: BpmnWorkflow) -> Counter[str]:
    return Counter(t.task_spec.bpmn_id for t in _all_tasks(workflow)
                   if t.state == TaskState.COMPLETED
                   and getattr(t.task_spec, "bpmn_id", None) is not None)


def _waiting_message(workflow: BpmnWorkflow, name: str) -> MessageEventDefinition | None:
    for task in _all_tasks(workflow):
        if not task.has_state(TaskState.WAITING):
            continue
        definition = getattr(task.task_spec, "event_definition", None)
        for item in getattr(definition, "event_definitions", None) or [definition]:
            if isinstance(item, MessageEventDefinition) and item.name == name:
                return item
    return None


def _spiff_act(workflow: BpmnWorkflow, action: dict[str, Any]) -> bool:
    """Perform the action if it applies now; False to wait."""
    after = action.get("after_node")
    if after and not _spiff_nodes(workflow)[after]:
        return False
    if "complete" in action:
        for task in _all_tasks(workflow):
            if task.state == TaskState.READY and task.task_spec.bpmn_id == action["complete"]:
                task.set_data(**(action.get("data") or {}))
                task.run()
                return True
        return False
    definition = _waiting_message(workflow, action["message"])
    if definition is None:
        return False
    payload = envelope(action["message"], action.get("payload") or {})
    correlations = definition.calculate_correlations(
        workflow.script_engine, definition.correlation_properties, payload)
    workflow.catch(BpmnEvent(definition, payload, correlations))
    return True


def run_spiff(scenario: Scenario) -> Outcome:
    """Drive the scenario as SpiffWorkflow's own tests do, with real (short) timers."""
    workflow = _spiff_workflow(scenario)
    actions = list(scenario.drive)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            workflow.do_engine_steps()
        except WorkflowException as exc:
            task = getattr(exc, "task", None)
            return Outcome("failed", _spiff_nodes(workflow), None,
                           getattr(getattr(task, "task_spec", None), "bpmn_id", None), str(exc))
        # A plain bpmn:task is abstract: it passes through (SpiffWorkflow marks it manual).
        plain = [t for t in workflow.get_tasks(state=TaskState.READY, manual=True)
                 if isinstance(t.task_spec, NoneTask) and not _is_human(t.task_spec)]
        if plain:
            plain[0].run()
            continue
        if workflow.is_completed():
            return Outcome("completed", _spiff_nodes(workflow), dict(workflow.data))
        if actions and _spiff_act(workflow, actions[0]):
            actions.pop(0)
            continue
        if time.monotonic() > deadline:
            return Outcome("running", _spiff_nodes(workflow), None,
                           note=f"not finished after {TIMEOUT}s; actions left: {actions}")
        time.sleep(0.02)
        workflow.refresh_waiting_tasks()


def _is_human(spec: Any) -> bool:
    return isinstance(spec, (UserTask, ManualTask))


# --------------------------------------------------------------------------- the fleet


def fleet_skip_reason(scenario: Scenario) -> str | None:
    """Why the fleet half cannot run this scenario yet (a feature not there), or None."""
    # Lazy: the SpiffWorkflow half runs without loading the fleet.
    from workers.definitions import deploy_workflow
    from workers.engine import control

    if "human" in scenario.requires and not hasattr(control, "complete"):
        return "human tasks need workers.engine.control.complete, which does not exist yet"
    if len(scenario.files) > 1 and "others" not in inspect.signature(deploy_workflow).parameters:
        return "multi-file deploy is not there yet (deploy_workflow takes no `others` files)"
    return None


@dataclass
class _Run:
    scenario: Scenario
    execution_id: uuid.UUID | None = None
    user_id: uuid.UUID | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)
    outcome: Outcome | None = None


def _deploy(scenario: Scenario) -> str:
    from db.session import session_scope  # lazy, as in fleet_skip_reason
    from workers.definitions import deploy_workflow

    name = f"conf-{scenario.name.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    main, *others = scenario.files
    with session_scope() as session:
        if others:  # the main file and the files of the processes it calls, deployed together
            deploy_workflow(session, name, main.read_text(), stages=[], activate=True,
                            others={path.name: path.read_text() for path in others})
        else:
            deploy_workflow(session, name, main.read_text(), stages=[], activate=True)
    return name


def _fleet_act(run: _Run, row: Any, completed: Counter[str]) -> bool:
    from db.session import session_scope  # lazy, as in fleet_skip_reason
    from workers.engine import control
    from workers.engine.dispatch import send_step
    from workers.producer import send_event

    assert run.execution_id is not None and run.user_id is not None
    action = run.actions[0]
    after = action.get("after_node")
    if after and not completed[after]:
        return False
    if "complete" in action:
        complete: Callable[..., Any] = getattr(control, "complete")  # noqa: B009 - being added
        try:
            with session_scope() as session:
                version = complete(session, run.execution_id, action["complete"],
                                   action.get("data") or {})
        except control.ControlError:
            return False
        if isinstance(version, int):
            send_step(run.execution_id, version)
        return True
    if (row.step_enqueued_at is not None or action["message"] not in (row.awaiting_events or ())):
        return False
    send_event(action["message"], user=run.user_id, data=action.get("payload") or {})
    return True


def run_fleet(scenarios: list[Scenario]) -> dict[str, Outcome]:
    """Deploy and start every scenario, drive them all at once, wait until each has ended."""
    from db.session import session_scope  # lazy, as in fleet_skip_reason
    from tests.workflow_helpers import execution, history, new_user
    from workers.celery_app import app
    from workers.engine import control
    from workers.engine.dispatch import send_step
    from workers.queues import TaskNames

    runs = [_Run(s, actions=list(s.drive)) for s in scenarios]
    for run in runs:
        try:
            name = _deploy(run.scenario)
        except Exception as exc:  # the fleet refused the file: that is an outcome too
            run.outcome = Outcome("refused at deploy", note=str(exc))
            continue
        run.user_id = new_user()
        with session_scope() as session:
            run.execution_id = control.start(session, name, run.user_id,
                                             start_variables(run.scenario))
        send_step(run.execution_id, 0)
    deadline = time.monotonic() + 3 * TIMEOUT
    last_wake = 0.0
    while any(r.outcome is None for r in runs) and time.monotonic() < deadline:
        if time.monotonic() - last_wake > 0.2:  # no beat runs in the tests: play it
            app.send_task(TaskNames.WAKE_DUE_TIMERS)
            last_wake = time.monotonic()
        for run in runs:
            if run.outcome is not None or run.execution_id is None:
                continue
            row = execution(run.execution_id)
            completed = Counter(n for _, n, o in history(run.execution_id) if o == "completed")
            if row.status in ("completed", "failed", "cancelled"):
                run.outcome = Outcome(row.status, completed, dict(row.variables or {}),
                                      row.current_node_id if row.status == "failed" else None,
                                      row.error_message or "")
            elif getattr(row, "stalled_at", None) is not None:
                run.outcome = Outcome("stalled", completed, None, note=row.error_message or "")
            elif run.actions and _fleet_act(run, row, completed):
                run.actions.pop(0)
        time.sleep(0.1)
    for run in runs:
        if run.outcome is None and run.execution_id is not None:
            row = execution(run.execution_id)
            completed = Counter(n for _, n, o in history(run.execution_id) if o == "completed")
            run.outcome = Outcome(
                row.status, completed, None,
                note=f"still {row.status} at node {row.current_node_id} after {3 * TIMEOUT:.0f}s"
                     f" (awaiting {row.awaiting_events}, wake_at {row.wake_at}); actions left: "
                     f"{run.actions}")
    return {r.scenario.name: r.outcome for r in runs if r.outcome is not None}
