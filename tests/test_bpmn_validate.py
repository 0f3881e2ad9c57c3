"""Deploy-time BPMN validation: what is refused, with the element named."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.engine.bpmn import BpmnError
from workers.engine.validate import validate_bpmn

BPMN = Path(__file__).parent / "bpmn"
SCORE = (BPMN / "score_gateway.bpmn").read_text()
MINIMAL = (BPMN / "minimal.bpmn").read_text()


def _with_task(task_xml: str) -> str:
    """minimal.bpmn with one element between start and end."""
    return MINIMAL.replace(
        '<bpmn:sequenceFlow id="to_end" sourceRef="start" targetRef="end"/>',
        '<bpmn:sequenceFlow id="to_end" sourceRef="start" targetRef="x"/>' + task_xml +
        '<bpmn:sequenceFlow id="x_end" sourceRef="x" targetRef="end"/>',
    ).replace("<bpmn:incoming>to_end</bpmn:incoming></bpmn:endEvent>",
              "<bpmn:incoming>x_end</bpmn:incoming></bpmn:endEvent>")


IO = "<bpmn:incoming>to_end</bpmn:incoming><bpmn:outgoing>x_end</bpmn:outgoing>"


def test_a_supported_workflow_passes() -> None:
    assert validate_bpmn(SCORE).process_id == "score"


@pytest.mark.parametrize(("xml", "message"), [
    ((BPMN / "hostile_script.bpmn").read_text(), "element compute: script refused"),
    (SCORE.replace("score &gt; 10", "().__class__.__base__.__subclasses__()"),
     "element decide: condition refused"),
    (SCORE.replace("score &gt; 10", "9**9**9 or score"), "element decide: condition refused"),
    (_with_task(f'<bpmn:userTask id="x">{IO}</bpmn:userTask>'), "element x: UserTask"),
    (_with_task(f'<bpmn:manualTask id="x">{IO}</bpmn:manualTask>'), "element x: ManualTask"),
    (_with_task(f'<bpmn:serviceTask id="x">{IO}</bpmn:serviceTask>'),
     "element x: .*operator"),
    (_with_task(f'<bpmn:intermediateCatchEvent id="x">{IO}<bpmn:signalEventDefinition/>'
                "</bpmn:intermediateCatchEvent>"), "not supported"),
    (_with_task(f'<bpmn:intermediateCatchEvent id="x">{IO}<bpmn:timerEventDefinition>'
                '<bpmn:timeDuration>__import__("os")</bpmn:timeDuration>'
                "</bpmn:timerEventDefinition></bpmn:intermediateCatchEvent>"),
     "element x: timer expression refused"),
    ('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><d>&x;</d>',
     "DOCTYPE"),
    ("<a>" * 10 + "x" * (3 * 1024 * 1024), "larger than"),
    ("<bpmn", "not well-formed"),
])
def test_refused_with_the_element_and_reason(xml: str, message: str) -> None:
    with pytest.raises(BpmnError, match=message):
        validate_bpmn(xml, operators=frozenset({"send_message"}))


def test_message_waits_and_timers_are_accepted() -> None:
    xml = _with_task(f'<bpmn:intermediateCatchEvent id="x">{IO}<bpmn:timerEventDefinition>'
                     '<bpmn:timeDuration>"PT1H"</bpmn:timeDuration>'
                     "</bpmn:timerEventDefinition></bpmn:intermediateCatchEvent>")
    assert validate_bpmn(xml).process_id == "minimal"
    waiting = _with_task(
        f'<bpmn:intermediateCatchEvent id="x">{IO}<bpmn:messageEventDefinition '
        'messageRef="order_done"/></bpmn:intermediateCatchEvent>'
    ).replace("</bpmn:process>", '</bpmn:process><bpmn:message id="order_done" '
              'name="order.completed"/>')
    assert validate_bpmn(waiting).awaited_events == {"order.completed"}


def _script(script: str) -> str:
    return SCORE.replace("score = base * 2", script + "\nscore = base * 2")


@pytest.mark.parametrize(("xml", "message"), [
    (_script("r = range(3)"), "element compute: script refused: variable 'r' is left holding a range"),
    (_script("x = list[int]"), r"element compute: script refused: list\[\.\.\.\] is a type"),
    (_script("s = {1, 2}"), "element compute: script refused: variable 's' .*a set"),
    (_script("d = {}\nk = d.keys()"), "element compute: .*dict_keys view"),
    (_with_task(f'<bpmn:serviceTask id="x">{IO}<bpmn:extensionElements>'
                '<spiffworkflow:serviceTaskOperator id="send_message"><spiffworkflow:parameters>'
                '<spiffworkflow:parameter id="to" type="any" value="set([1])"/>'
                "</spiffworkflow:parameters></spiffworkflow:serviceTaskOperator>"
                "</bpmn:extensionElements></bpmn:serviceTask>").replace(
        'id="minimal-definitions"', 'xmlns:spiffworkflow="http://spiffworkflow.org/bpmn/'
        'schema/1.0/core" id="minimal-definitions"'),
     "element x: operator parameter 'to' refused: it is a set"),
])
def test_values_that_can_never_be_stored_are_refused_at_deploy(xml: str, message: str) -> None:
    """Each deployed, then made every execution reaching it a zombie."""
    with pytest.raises(BpmnError, match=message):
        validate_bpmn(xml, operators=frozenset({"send_message"}))
