"""Parse BPMN files safely and find the process to run with SpiffWorkflow.

The XML is parsed by us, hardened (no DTD, no entities, no network, bounded size),
before SpiffWorkflow sees the tree: its own `add_bpmn_str` would use lxml's
defaults. Files drawn in SpiffArena's modeler work: the spiff extensions parser
is used.

A workflow is one main file and, optionally, the files holding the processes its
call activities call. Drawings SpiffWorkflow would misread are refused here, before
it parses them: it crashes on some (business rule tasks without DMN, complex
gateways, a message defined nowhere) and silently drops others (a link, signal or
compensation definition on a catch event makes it a pass-through), so that what
deploy accepts is what runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree
from SpiffWorkflow.bpmn.parser.ValidationException import ValidationException
from SpiffWorkflow.bpmn.specs.mixins.subworkflow_task import CallActivity, SubWorkflowTask
from SpiffWorkflow.spiff.parser.process import SpiffBpmnParser

MAX_BPMN_BYTES = 2 * 1024 * 1024
BPMN_NS = "http://www.omg.org/spec/BPMN/20100524/MODEL"
NS = {"bpmn": BPMN_NS}
MAIN_FILE = "the main file"  # how errors name the first file, which has no name of its own

_EMIT = "emit an event with a service task (operator `emit_event`) instead"
_LOOP = "loop with an exclusive gateway whose flow goes back to the task instead"
# Drawn elements the fleet cannot run, with what to draw instead.
_REFUSED_ELEMENTS = {
    "businessRuleTask": "business rule (DMN) tasks are not supported: decide with the "
                        "conditions of an exclusive gateway or in a script task",
    "complexGateway": "complex gateways are not supported: use an inclusive gateway "
                      "(a condition on each outgoing flow) or an exclusive one",
    "sendTask": f"sending a message is not supported: {_EMIT}",
    "transaction": "transactions are not supported: use an embedded subprocess with an "
                   "error boundary event",
    "adHocSubProcess": "ad-hoc subprocesses are not supported: draw the order of the "
                       "tasks with sequence flows in an embedded subprocess",
}
# Markers on an activity the fleet cannot run.
_REFUSED_MARKERS = {
    "multiInstanceLoopCharacteristics": f"multi-instance activities are not supported: {_LOOP}",
    "standardLoopCharacteristics": f"loop activities are not supported: {_LOOP}",
}
# Event definitions the fleet runs, by the event that carries them.
_DEFINITIONS_ALLOWED = {
    "startEvent": {"message", "timer"},
    "endEvent": {"error", "terminate"},
    "intermediateCatchEvent": {"message", "timer"},
    "boundaryEvent": {"message", "timer", "error"},
    "receiveTask": {"message"},
    "intermediateThrowEvent": set(),
}
_DEFINITION_REASONS = {
    "signal": "signals are not supported: wait for an event with a message catch event "
              "(its message name is the event type)",
    "escalation": "escalations are not supported: use an error end event and an error "
                  "boundary event",
    "conditional": "conditional events are not supported: use an exclusive gateway, or a "
                   "timer and an exclusive gateway in a loop",
    "link": "link events are not supported: draw the sequence flow itself",
    "compensate": "compensation is not supported: undo with an error boundary event and "
                  "the tasks after it",
    "cancel": "cancel events belong to transactions, which are not supported: use an "
              "error end event and an error boundary event",
    "message": f"throwing a message is not supported: {_EMIT}",
    "error": "an error is thrown only by an end event (and caught by an error boundary event)",
    "terminate": "terminate is only an end event",
    "timer": "a timer is a start, intermediate catch or boundary event",
}


class BpmnError(ValueError):
    """The file is not a deployable BPMN workflow; the message names the element and why."""


@dataclass(frozen=True)
class ParsedBpmn:
    process_id: str
    spec: Any  # SpiffWorkflow's BpmnProcessSpec
    subprocess_specs: dict[str, Any]


def _tree(xml: str | bytes) -> Any:
    data = xml.encode("utf-8") if isinstance(xml, str) else xml
    if len(data) > MAX_BPMN_BYTES:
        raise BpmnError(f"file larger than {MAX_BPMN_BYTES // 1024} KiB")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise BpmnError("DOCTYPE and entity declarations are not allowed in BPMN files")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                             load_dtd=False, remove_comments=True)
    try:
        return etree.fromstring(data, parser=parser)
    except etree.XMLSyntaxError as exc:
        raise BpmnError(f"not well-formed XML: {exc}") from None


def _local(element: Any) -> str:
    """The BPMN tag name of an element ('' for other namespaces, comments and the like)."""
    tag = element.tag
    prefix = f"{{{BPMN_NS}}}"
    return tag.removeprefix(prefix) if isinstance(tag, str) and tag.startswith(prefix) else ""


def _refusals(root: Any) -> Iterator[str]:
    """What SpiffWorkflow would crash on or misread in one document, element by element."""
    messages = set(root.xpath("//bpmn:message/@id", namespaces=NS))
    for element in root.iter():
        name = _local(element)
        owner = element.getparent()
        if name in _REFUSED_ELEMENTS:
            yield f"element {element.get('id')}: {_REFUSED_ELEMENTS[name]}"
        elif name in _REFUSED_MARKERS and owner is not None:
            yield f"element {owner.get('id')}: {_REFUSED_MARKERS[name]}"
        elif name == "subProcess" and element.get("triggeredByEvent") == "true":
            yield (f"element {element.get('id')}: event subprocesses are not supported: put the "
                   "work in an embedded subprocess and attach boundary events to it")
        elif name.endswith("EventDefinition") and owner is not None:
            kind, event = name.removesuffix("EventDefinition"), _local(owner)
            if kind not in _DEFINITIONS_ALLOWED.get(event, {kind}):
                reason = _DEFINITION_REASONS.get(kind, f"{kind} events are not supported")
                yield f"element {owner.get('id')}: {reason}"
        ref = element.get("messageRef") if name in ("messageEventDefinition", "receiveTask") else None
        if ref is not None and ref not in messages:
            carrier = owner if name == "messageEventDefinition" else element
            yield (f"element {carrier.get('id')}: message `{ref}` is defined nowhere: add "
                   f'<bpmn:message id="{ref}" name="order.completed"/>, named after the event '
                   "type it waits for")


def _main_process(main_tree: Any, called: set[str], process_id: str | None,
                  known: Mapping[str, Any]) -> str:
    """`process_id`, or else the one executable process of the main file nobody calls."""
    if process_id is not None:
        if process_id not in known:
            raise BpmnError(f"no process `{process_id}` in the deployed files "
                            f"(processes: {', '.join(sorted(known))})")
        return process_id
    processes = main_tree.xpath("//bpmn:process", namespaces=NS)
    executable = [p.get("id") for p in processes if p.get("isExecutable") == "true"]
    candidates = [p for p in (executable or [p.get("id") for p in processes]) if p not in called]
    if not candidates:
        callers = sorted(c.get("id") for c in main_tree.xpath("//bpmn:callActivity", namespaces=NS)
                         if c.get("calledElement") in set(executable or known))
        raise BpmnError("the main file has no process to start: it has none, or a call "
                        "activity calls every one"
                        + (f" (called by {', '.join(f'`{c}`' for c in callers)})"
                           if callers else ""))
    if len(candidates) > 1:
        raise BpmnError(
            "several executable processes and none calls the others: "
            f"{', '.join(f'`{p}`' for p in sorted(candidates))}; keep one executable "
            '(isExecutable="false" on the others), move the others to files of their own, '
            "or name the one to run (`--process ID`, `process:` in a definitions file)")
    return candidates[0]


def _subprocesses(parser: Any, spec: Any, found: dict[str, Any],
                  path: tuple[str, ...] = ()) -> dict[str, Any]:
    """The specs `spec` calls or embeds, recursively; a called process must be deployed.

    A process that calls itself, directly or through others, is refused: each call
    opens one more nested instance, so the execution would step for ever.
    """
    path = (*path, spec.name)
    for task_spec in spec.task_specs.values():
        if not isinstance(task_spec, SubWorkflowTask):
            continue
        called = task_spec.spec
        if called in path:
            raise BpmnError(f"call activity `{task_spec.bpmn_id}` calls process `{called}`, "
                            f"which is already running it ({' → '.join((*path, called))}): "
                            "the execution would never end; remove the cycle (loop with a "
                            "gateway instead)")
        if called in found:
            continue
        if parser.get_process_parser(called) is None:
            kind = "call activity" if isinstance(task_spec, CallActivity) else "subprocess"
            raise BpmnError(f"{kind} `{task_spec.bpmn_id}` calls process `{called}`, which is in "
                            "no deployed file: deploy both files together (`fleet workflow "
                            "deploy MAIN.bpmn OTHER.bpmn --name NAME`, or a list as `file:`)")
        found[called] = parser.get_spec(called)
        _subprocesses(parser, found[called], found, path)
    return found


def parse_bpmn(xml: str | bytes, others: Mapping[str, str] | None = None,
               process_id: str | None = None) -> ParsedBpmn:
    """The process to run and every process it calls, parsed and checked.

    `others` maps file names to the XML of the files holding called processes. The
    process run is `process_id`, or else the one executable process of the main file
    that no call activity calls. An error in another file starts with its name.
    """
    trees: dict[str, Any] = {}
    for label, text in {MAIN_FILE: xml, **(others or {})}.items():
        prefix = "" if label == MAIN_FILE else f"{label}: "
        try:
            trees[label] = _tree(text)
        except BpmnError as exc:
            raise BpmnError(f"{prefix}{exc}") from None
        problem = next(_refusals(trees[label]), None)
        if problem is not None:
            raise BpmnError(prefix + problem)
    called = {c for tree in trees.values()
              for c in tree.xpath("//bpmn:callActivity/@calledElement", namespaces=NS)}
    parser = SpiffBpmnParser()
    try:
        for label, tree in trees.items():
            parser.add_bpmn_xml(tree, filename=label)
        main = _main_process(trees[MAIN_FILE], called, process_id, parser.process_parsers)
        spec = parser.get_spec(main)
        subprocesses = _subprocesses(parser, spec, {})
    except ValidationException as exc:
        element = getattr(exc, "id", None) or getattr(exc, "name", None) or "?"
        where = getattr(exc, "file_name", "") or MAIN_FILE
        prefix = "" if where == MAIN_FILE else f"{where}: "
        raise BpmnError(f"{prefix}element {element}: {exc}") from None
    used = {main, *subprocesses}
    for label, tree in trees.items():
        ids = tree.xpath("//bpmn:process/@id", namespaces=NS)
        if label != MAIN_FILE and not used.intersection(ids):
            raise BpmnError(f"{label}: none of its processes ({', '.join(f'`{p}`' for p in ids)}) "
                            f"is called from `{main}`: leave the file out")
    return ParsedBpmn(main, spec, subprocesses)
