"""Deploy-time validation of BPMN workflows: supported elements, safe expressions.

Everything the fleet cannot run is refused when a workflow is deployed, not found
at run time: unsupported elements (see workers/engine/bpmn.py for what is refused
before SpiffWorkflow parses a file; here, catch events with several definitions and
event-based gateways with more than one timer), message names that are not event
types (the execution would wait for an event no producer can send), unknown
service-task operators, and any expression the sandbox would not run (gateway
conditions, scripts, pre/post scripts, timer expressions, correlation expressions,
operator parameters), and values that could never be saved with the execution (a
script leaving `range(3)` or `list[int]` in a variable, an operator parameter that
is a set), and a message wait's `lookback` property that is not a duration. The
error names the element and the reason.
Receive tasks (a message wait drawn as a task) are supported, so that a boundary
timer can time the wait out; plain tasks pass through; user and manual tasks are
human steps; a none intermediate throw event (a milestone) passes through.
"""

from __future__ import annotations

import ast
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from SpiffWorkflow.bpmn.specs.control import (
    BoundaryEventJoin,
    BoundaryEventSplit,
    BpmnStartTask,
    SimpleBpmnTask,
    StartEventJoin,
    StartEventSplit,
    _EndJoin,
)
from SpiffWorkflow.bpmn.specs.event_definitions.item_aware_event import ErrorEventDefinition
from SpiffWorkflow.bpmn.specs.event_definitions.message import MessageEventDefinition
from SpiffWorkflow.bpmn.specs.event_definitions.multiple import MultipleEventDefinition
from SpiffWorkflow.bpmn.specs.event_definitions.simple import (
    NoneEventDefinition,
    TerminateEventDefinition,
)
from SpiffWorkflow.bpmn.specs.event_definitions.timer import TimerEventDefinition
from SpiffWorkflow.bpmn.specs.mixins.events.end_event import EndEvent
from SpiffWorkflow.bpmn.specs.mixins.events.intermediate_event import (
    BoundaryEvent,
    EventBasedGateway,
    IntermediateCatchEvent,
    IntermediateThrowEvent,
    ReceiveTask,
)
from SpiffWorkflow.bpmn.specs.mixins.events.start_event import StartEvent
from SpiffWorkflow.bpmn.specs.mixins.exclusive_gateway import ExclusiveGateway
from SpiffWorkflow.bpmn.specs.mixins.inclusive_gateway import InclusiveGateway
from SpiffWorkflow.bpmn.specs.mixins.manual_task import ManualTask
from SpiffWorkflow.bpmn.specs.mixins.none_task import NoneTask
from SpiffWorkflow.bpmn.specs.mixins.parallel_gateway import ParallelGateway
from SpiffWorkflow.bpmn.specs.mixins.script_task import ScriptTask
from SpiffWorkflow.bpmn.specs.mixins.service_task import ServiceTask
from SpiffWorkflow.bpmn.specs.mixins.subworkflow_task import (
    AdHocSubprocess,
    CallActivity,
    EventSubprocess,
    SubWorkflowTask,
    TransactionSubprocess,
)
from SpiffWorkflow.bpmn.specs.mixins.user_task import UserTask

from workers.durations import parse_lookback
from workers.engine.bpmn import BpmnError, ParsedBpmn, parse_bpmn
from workers.engine.sandbox import SandboxError, check, never_storable
from workers.event_types import EVENT_TYPE_RULE, is_event_type

# Internal specs SpiffWorkflow adds around the drawn elements.
_CONTROL = (BpmnStartTask, _EndJoin, BoundaryEventSplit, BoundaryEventJoin, StartEventSplit,
            StartEventJoin)
_SUBPROCESS_NOT_SUPPORTED = (TransactionSubprocess, EventSubprocess, AdHocSubprocess)
_SUPPORTED = (StartEvent, EndEvent, ExclusiveGateway, InclusiveGateway, ParallelGateway,
              EventBasedGateway, ScriptTask, ServiceTask, IntermediateCatchEvent, BoundaryEvent,
              SubWorkflowTask, CallActivity, NoneTask, UserTask, ManualTask,
              IntermediateThrowEvent,  # bpmn.py refuses every definition on it: a milestone
              ReceiveTask)  # a message wait drawn as a task, so boundary events can time it out
_EVENTS = (NoneEventDefinition, TimerEventDefinition, MessageEventDefinition,
           ErrorEventDefinition, TerminateEventDefinition)


@dataclass(frozen=True)
class ValidatedWorkflow:
    parsed: ParsedBpmn
    awaited_events: frozenset[str]  # message names: the event types executions may wait for
    # Message name -> how far back a wait for it looks in the audit log when it begins:
    # the catch event's `lookback` property (spiffworkflow:property), the longest if
    # several waits name one message.
    lookbacks: Mapping[str, dt.timedelta] = field(default_factory=dict)

    @property
    def process_id(self) -> str:
        return self.parsed.process_id


def _specs(parsed: ParsedBpmn) -> Iterator[Any]:
    for spec in (parsed.spec, *parsed.subprocess_specs.values()):
        yield from spec.task_specs.values()


def _definitions(definition: Any) -> Iterator[Any]:
    """The definition and, for a multiple event, the ones it holds.

    An event-based gateway takes over the event definitions of the catch events
    after it (a MultipleEventDefinition; the catch events are left with none), so
    their messages and timers are checked and collected on the gateway.
    """
    if isinstance(definition, MultipleEventDefinition):
        for item in definition.event_definitions:
            yield from _definitions(item)
    elif definition is not None:
        yield definition


def _correlation_expressions(spec: Any) -> Iterator[tuple[str, Literal["eval"], str]]:
    """The correlation expressions of a message wait, which run in the sandbox too.

    Retrieval expressions run against the event's payload, process-variable ones
    (the spiff extension) against the waiting task's data.
    """
    for definition in _definitions(getattr(spec, "event_definition", None)):
        if not isinstance(definition, MessageEventDefinition):
            continue
        for prop in definition.correlation_properties:
            yield f"correlation property {prop.name!r}", "eval", prop.retrieval_expression
        for prop in getattr(definition, "process_correlations", None) or []:
            yield f"process correlation {prop.name!r}", "eval", prop.retrieval_expression


def _expressions(spec: Any) -> Iterator[tuple[str, Literal["eval", "exec"], str]]:
    """(what, mode, source) for every piece of code an element carries."""
    for condition, _target in getattr(spec, "cond_task_specs", []) or []:
        args = getattr(condition, "args", None)
        if args and isinstance(args[0], str):
            yield "condition", "eval", args[0]
    if isinstance(spec, ScriptTask) and spec.script:
        yield "script", "exec", spec.script
    for attr in ("prescript", "postscript"):
        if getattr(spec, attr, None):
            yield attr, "exec", getattr(spec, attr)
    for definition in _definitions(getattr(spec, "event_definition", None)):
        if isinstance(definition, TimerEventDefinition) and definition.expression:
            yield "timer expression", "eval", definition.expression
    yield from _correlation_expressions(spec)
    for name, param in (getattr(spec, "operation_params", None) or {}).items():
        if isinstance(param, dict) and isinstance(param.get("value"), str):
            yield f"operator parameter {name!r}", "eval", param["value"]


def _message_name(element: str, name: str | None) -> str:
    """The event type a message waits for; refused unless an envelope could carry it."""
    if not name:
        raise BpmnError(f"element {element}: its message has no name: name it after the event "
                        f"type it waits for ({EVENT_TYPE_RULE})")
    if not is_event_type(name):
        raise BpmnError(f"message `{name}` of element `{element}` is not an event type: "
                        f"expected {EVENT_TYPE_RULE}")
    return name


LOOKBACK_PROPERTY = "lookback"


def _lookback(element: str, spec: Any) -> dt.timedelta | None:
    """The wait's `lookback` property as a duration ('10m', '2h', '7d'), if it has one."""
    properties = (getattr(spec, "extensions", None) or {}).get("properties") or {}
    value = properties.get(LOOKBACK_PROPERTY)
    if value is None:
        return None
    try:
        return parse_lookback(value)
    except ValueError as exc:
        raise BpmnError(f"element {element}: property {LOOKBACK_PROPERTY}: {exc}") from None


def validate_bpmn(xml: str | bytes, operators: frozenset[str] | None = None, *,
                  others: Mapping[str, str] | None = None,
                  process_id: str | None = None,
                  param_checks: Mapping[str, Callable[[Mapping[str, Any]], None]] | None = None,
                  ) -> ValidatedWorkflow:
    """Parse and check a workflow for deployment; raises BpmnError naming the element.

    `others` and `process_id` are those of `parse_bpmn`: the files of called processes
    and the process to run. `param_checks`: per operator, a check of its service
    task's parameters that raises ValueError (the operators' own, passed in: the
    engine does not know them).
    """
    parsed = parse_bpmn(xml, others, process_id)
    awaited: set[str] = set()
    lookbacks: dict[str, dt.timedelta] = {}
    for spec in _specs(parsed):
        element = getattr(spec, "bpmn_id", None) or spec.name
        if isinstance(spec, _CONTROL) or (type(spec) is SimpleBpmnTask):
            continue
        if isinstance(spec, _SUBPROCESS_NOT_SUPPORTED) or not isinstance(spec, _SUPPORTED):
            raise BpmnError(f"element {element}: {type(spec).__name__} is not supported: draw "
                            "it as a task, script, service, user, manual or receive task, a "
                            "gateway, a subprocess or call activity, or a supported event")
        definition = getattr(spec, "event_definition", None)
        if isinstance(definition, MultipleEventDefinition) and not isinstance(
                spec, EventBasedGateway):
            raise BpmnError(f"element {element}: an event with several definitions "
                            "is not supported")
        # SpiffWorkflow keeps one timer value per gateway task: two timers would share it.
        if sum(isinstance(d, TimerEventDefinition) for d in _definitions(definition)) > 1:
            raise BpmnError(f"element {element}: an event-based gateway with more than one "
                            "timer is not supported")
        for item in _definitions(definition):
            if not isinstance(item, _EVENTS):
                raise BpmnError(f"element {element}: {type(item).__name__} is not supported")
            if isinstance(item, MessageEventDefinition):
                awaited.add(_message_name(element, item.name))
                window = _lookback(element, spec)
                if window is not None:
                    lookbacks[item.name] = max(window, lookbacks.get(item.name, window))
        if isinstance(spec, ServiceTask) and operators is not None:
            operator = getattr(spec, "operation_name", None)
            if operator not in operators:
                raise BpmnError(f"element {element}: unknown service-task operator {operator!r} "
                                f"(known: {', '.join(sorted(operators))})")
        check_params = (param_checks or {}).get(getattr(spec, "operation_name", None) or "")
        if isinstance(spec, ServiceTask) and check_params is not None:
            try:
                check_params(spec.operation_params or {})
            except ValueError as exc:
                raise BpmnError(f"element {element}: operator "
                                f"{spec.operation_name}: {exc}") from None
        for what, mode, source in _expressions(spec):
            try:
                tree = check(source, mode)
            except SandboxError as exc:
                raise BpmnError(f"element {element}: {what} refused: {exc}") from None
            stored = never_storable(tree.body) if isinstance(tree, ast.Expression) \
                and what.startswith("operator") else None
            if stored is not None:
                raise BpmnError(f"element {element}: {what} refused: it is {stored}, which "
                                "cannot be stored with the operator call")
    return ValidatedWorkflow(parsed, frozenset(awaited), lookbacks)
