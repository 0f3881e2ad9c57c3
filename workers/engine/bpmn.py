"""Parse a BPMN file safely and find its executable process with SpiffWorkflow.

The XML is parsed by us, hardened (no DTD, no entities, no network, bounded size),
before SpiffWorkflow sees the tree: its own `add_bpmn_str` would use lxml's
defaults. Files drawn in SpiffArena's modeler work: the spiff extensions parser
is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lxml import etree
from SpiffWorkflow.bpmn.parser.ValidationException import ValidationException
from SpiffWorkflow.spiff.parser.process import SpiffBpmnParser

MAX_BPMN_BYTES = 2 * 1024 * 1024
NS = {"bpmn": "http://www.omg.org/spec/BPMN/20100524/MODEL"}


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


def parse_bpmn(xml: str | bytes) -> ParsedBpmn:
    """The executable process (or the only one) of a BPMN file, parsed and validated."""
    parser = SpiffBpmnParser()
    tree = _tree(xml)
    # Processes reached by a call activity must be executable for SpiffWorkflow to parse
    # them, but they are not the entry point: the one process nobody calls is.
    called = set(tree.xpath("//bpmn:callActivity/@calledElement", namespaces=NS))
    try:
        parser.add_bpmn_xml(tree)
        process_ids = [p for p in (parser.get_process_ids() or list(parser.process_parsers))
                       if p not in called]
        if len(process_ids) != 1:
            raise BpmnError(f"expected one executable process, found {sorted(process_ids)}")
        process_id = process_ids[0]
        spec = parser.get_spec(process_id)
        subprocesses = parser.get_subprocess_specs(process_id)
    except ValidationException as exc:
        element = getattr(exc, "id", None) or getattr(exc, "name", None) or "?"
        raise BpmnError(f"element {element}: {exc}") from None
    return ParsedBpmn(process_id, spec, subprocesses)
