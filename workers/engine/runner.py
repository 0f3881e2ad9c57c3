"""Run a SpiffWorkflow workflow one drawn BPMN node at a time (no database here).

SpiffWorkflow adds control tasks around the drawn elements (the Start root, end
joins, boundary-event splits); they are run eagerly so that every step runs exactly
one node a modeler drew. Subprocesses are served deepest first, as SpiffWorkflow's
own `do_engine_steps` does.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from SpiffWorkflow.bpmn.specs.event_definitions.message import MessageEventDefinition
from SpiffWorkflow.bpmn.specs.event_definitions.multiple import MultipleEventDefinition
from SpiffWorkflow.bpmn.specs.event_definitions.timer import TimerEventDefinition
from SpiffWorkflow.bpmn.specs.mixins.events.intermediate_event import (
    BoundaryEvent,
    EventBasedGateway,
)
from SpiffWorkflow.bpmn.specs.mixins.manual_task import ManualTask
from SpiffWorkflow.bpmn.specs.mixins.service_task import ServiceTask
from SpiffWorkflow.bpmn.specs.mixins.user_task import UserTask
from SpiffWorkflow.bpmn.util.event import BpmnEvent
from SpiffWorkflow.bpmn.workflow import BpmnWorkflow
from SpiffWorkflow.task import Task
from SpiffWorkflow.util.task import TaskState

from workers.engine.sandbox import SandboxError
from workers.engine.script_engine import ACTION_RESULT


@dataclass(frozen=True)
class Waits:
    """What a workflow with no ready node is waiting for."""

    wake_at: dt.datetime | None  # the earliest timer
    messages: tuple[str, ...]  # message names (event types) it can catch


def _workflows(workflow: BpmnWorkflow) -> Iterator[Any]:
    yield from sorted(workflow.get_active_subprocesses(), key=lambda s: s.depth, reverse=True)
    yield workflow


def is_human_task(task: Task) -> bool:
    """A user or manual task: it runs when someone completes it (`control.complete`)."""
    return isinstance(task.task_spec, (UserTask, ManualTask))


def _ready(workflow: Any) -> Iterator[Task]:
    """Ready tasks the engine runs by itself.

    SpiffWorkflow marks a plain `bpmn:task` manual too; here it is a pass-through
    node, as most BPMN engines treat an abstract task. Only user and manual tasks
    wait for a person.
    """
    for task in workflow.get_tasks_iterator(state=TaskState.READY):
        if not is_human_task(task):
            yield task


def is_node(task: Task) -> bool:
    """A drawn BPMN element (control tasks SpiffWorkflow adds have no bpmn_id)."""
    return getattr(task.task_spec, "bpmn_id", None) is not None


def _after_run(task: Task) -> None:
    parent_id = task.workflow.parent_task_id
    if parent_id is not None:  # as do_engine_steps: let the subprocess task see the change
        parent = task.workflow.top_workflow.get_task_from_id(parent_id)
        parent.task_spec._update(parent)


def _run_control(workflow: BpmnWorkflow) -> None:
    progressed = True
    while progressed:
        progressed = False
        for wf in _workflows(workflow):
            for task in _ready(wf):
                if not is_node(task):
                    task.run()
                    _after_run(task)
                    progressed = True
                    break
            if progressed:
                break


def _first_event_only(workflow: BpmnWorkflow) -> None:
    """An event-based gateway follows the first event it saw, not every one.

    SpiffWorkflow 3.2 also records a timer that is due when the gateway is next
    looked at, after a message was caught, and would then take both ways.
    """
    for wf in _workflows(workflow):
        for task in wf.get_tasks_iterator(state=TaskState.READY):
            seen = task.internal_data.get("seen_events") or []
            if isinstance(task.task_spec, EventBasedGateway) and len(seen) > 1:
                task.internal_data["seen_events"] = seen[:1]


def _caught_message(workflow: BpmnWorkflow) -> Task | None:
    """A wait made ready by a message this step delivered (see `next_node`)."""
    for wf in _workflows(workflow):
        for task in _ready(wf):
            definition = getattr(task.task_spec, "event_definition", None)
            # An event-based gateway's race is its own (_timer_came_first, _first_event_only).
            if is_node(task) and isinstance(definition, MessageEventDefinition) \
                    and not isinstance(task.task_spec, EventBasedGateway):
                return task
    return None


def next_node(workflow: BpmnWorkflow) -> Task | None:
    """The next ready drawn node (control tasks before it are run), or None.

    A wait that caught a message is run before timers are looked at: its cancelling
    boundary timer, due by now too, is then cancelled as the wait completes instead
    of firing beside it and taking the other way as well. Which of the two came
    first is decided before the message is handed over (the stepper keeps one whose
    event occurred after a due timer for the next step). An event-based gateway's
    race is decided by `_timer_came_first` and `_first_event_only` instead.
    """
    _run_control(workflow)
    caught = _caught_message(workflow)
    if caught is not None:
        return caught
    workflow.refresh_timers()
    _first_event_only(workflow)
    _run_control(workflow)
    for wf in _workflows(workflow):
        for task in _ready(wf):
            return task
    return None


def run_node(workflow: BpmnWorkflow, task: Task) -> None:
    """Run one drawn node, then the control tasks it made ready."""
    task.run()
    _after_run(task)
    _run_control(workflow)


def complete_service_task(workflow: BpmnWorkflow, task: Task, result: Any) -> None:
    """Run a service task with the result its operator produced on the actions queue."""
    task.internal_data[ACTION_RESULT] = result
    run_node(workflow, task)


def human_tasks(workflow: BpmnWorkflow) -> tuple[str, ...]:
    """Node ids of the ready user and manual tasks: what the execution awaits from people."""
    return tuple(sorted({task.task_spec.bpmn_id for wf in _workflows(workflow)
                         for task in wf.get_tasks_iterator(state=TaskState.READY)
                         if is_human_task(task)}))


def human_task(workflow: BpmnWorkflow, node_id: str) -> Task | None:
    """The ready user or manual task `node_id`, if there is one."""
    for wf in _workflows(workflow):
        for task in wf.get_tasks_iterator(state=TaskState.READY):
            if is_human_task(task) and task.task_spec.bpmn_id == node_id:
                return task
    return None


def complete_human_task(workflow: BpmnWorkflow, task: Task, data: dict[str, Any]) -> None:
    """Run a ready user or manual task, `data` (what the person gave) merged into its data."""
    task.data.update(data)
    run_node(workflow, task)


_UNDERWAY = TaskState.WAITING | TaskState.READY | TaskState.STARTED


def stall_reason(workflow: BpmnWorkflow) -> str:
    """Why a workflow with nothing ready, due, awaited or in flight cannot go on."""
    blocked = sorted({f"{task.task_spec.bpmn_id} ({TaskState.get_name(task.state).lower()})"
                      for wf in _workflows(workflow)
                      for task in wf.get_tasks_iterator(state=_UNDERWAY)
                      if is_node(task)})
    where = f"; unfinished: {', '.join(blocked)}" if blocked else ""
    return ("no node is ready and nothing is awaited (no timer, message, human task or "
            f"operator call){where}")


def is_service_task(task: Task) -> bool:
    return isinstance(task.task_spec, ServiceTask)


def service_call(task: Task) -> tuple[str, dict[str, Any]]:
    """(operator, evaluated parameters) of a ready service task."""
    params = task.task_spec.evaluate_params(task)
    return task.task_spec.operation_name, {k: v["value"] for k, v in params.items()}


def _parse_when(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _definitions(task: Task) -> list[Any]:
    """The event definitions a waiting task catches.

    An event-based gateway waits with a MultipleEventDefinition holding those of
    the catch events after it (one message and one timer, say).
    """
    definition = task.task_spec.event_definition
    if isinstance(definition, MultipleEventDefinition):
        return list(definition.event_definitions)
    return [definition]


def waits(workflow: BpmnWorkflow) -> Waits:
    """The earliest timer and the messages the workflow is waiting for."""
    wake_at: dt.datetime | None = None
    messages: set[str] = set()
    for task in list(workflow.event_manager.tasks.values()):
        if not task.has_state(TaskState.WAITING):
            continue
        for definition in _definitions(task):
            if isinstance(definition, MessageEventDefinition):
                messages.add(definition.name)
            elif isinstance(definition, TimerEventDefinition):
                when = _parse_when(definition.details(task).value)
                if when is not None and (wake_at is None or when < wake_at):
                    wake_at = when
    return Waits(wake_at, tuple(sorted(messages)))


def waiting_nodes(workflow: BpmnWorkflow) -> list[str]:
    """The drawn nodes the workflow waits at: catch events, receive tasks, event gateways.

    A boundary event waits with the activity it is attached to, which is the node named.
    """
    return sorted({task.task_spec.name for task in workflow.get_tasks(state=TaskState.WAITING)
                   if not isinstance(task.task_spec, BoundaryEvent)
                   and not task.task_spec.name.startswith(("Start", "End"))})


def occurred_at(payload: dict[str, Any]) -> dt.datetime | None:
    """When a message's event occurred (its producer's `occurred_at`), if it says."""
    return _parse_when(payload.get("occurred_at"))


def _timer_came_first(task: Task, payload: dict[str, Any]) -> bool:
    """An event-based gateway's timer was due before the event occurred (the step ran late)."""
    occurred = occurred_at(payload)
    if occurred is None or not isinstance(task.task_spec, EventBasedGateway):
        return False
    for definition in _definitions(task):
        if isinstance(definition, TimerEventDefinition):
            due = _parse_when(definition.details(task).value)
            if due is not None and due <= occurred:
                return True
    return False


def _expect_correlations(task: Task, definition: MessageEventDefinition) -> None:
    """Set the values this wait expects from the process variables it names.

    SpiffWorkflow does so when a catch event starts waiting (the spiff extension
    `processVariableCorrelation`), but not for the branches of an event-based
    gateway, whose definitions the gateway holds; doing it here covers both.
    """
    if getattr(definition, "process_correlations", None):
        definition.update_task(task)


def _event(task: Task, definition: MessageEventDefinition,
           payload: dict[str, Any]) -> BpmnEvent | None:
    """The message as SpiffWorkflow's event, with its correlation values.

    Each retrieval expression runs in the sandbox against the payload
    (`{event_id, event_type, data, occurred_at}`); None when one cannot be
    evaluated (the event lacks the property, say): such an event matches nothing.
    """
    try:
        _expect_correlations(task, definition)
        correlations = definition.calculate_correlations(
            task.workflow.script_engine, definition.correlation_properties, payload)
    except SandboxError:
        return None
    return BpmnEvent(definition, payload, correlations)


def deliver(workflow: BpmnWorkflow, name: str, payload: dict[str, Any]) -> bool:
    """Hand a message to the workflow; True only when the engine caught it.

    A wait with correlation properties catches it only when the values match
    (SpiffWorkflow's `catches`). Caught means a waiting task took it and stopped
    waiting; a message that no task took (no such wait, other correlation values,
    too late for a gateway whose timer came first) is left to the caller.
    """
    manager = workflow.event_manager
    waiting = [t for t in list(manager.tasks.values()) if t.has_state(TaskState.WAITING)]
    for task in waiting:
        if _timer_came_first(task, payload):
            continue
        for definition in _definitions(task):
            if not isinstance(definition, MessageEventDefinition) or definition.name != name:
                continue
            event = _event(task, definition, payload)
            if event is None or not task.task_spec.catches(task, event):
                continue
            # internal=False: an event nothing catches is not queued for a later look
            caught = manager.catch(event, internal=False)
            return caught > 0 and any(not t.has_state(TaskState.WAITING) for t in waiting)
    return False


def variables(workflow: BpmnWorkflow, task: Task | None) -> dict[str, Any]:
    """The execution's variables as JSON: the workflow's result, or the last node's data."""
    data = workflow.data if workflow.is_completed() else (task.data if task else {})
    data = {k: v for k, v in data.items() if k != "data_objects" or v}
    return json.loads(json.dumps(data, default=str))
