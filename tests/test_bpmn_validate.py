"""Deploy-time BPMN validation: what is refused, with the element named."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Workflow, WorkflowVersion
from db.session import session_scope
from tests.helpers import WorkerProcess
from workers.definitions import deploy_workflow
from workers.engine.bpmn import BpmnError
from workers.engine.specs import SpecCache
from workers.engine.validate import validate_bpmn
from workers.event_types import EVENT_TYPE_PATTERN

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
    (_with_task(f'<bpmn:sendTask id="x">{IO}</bpmn:sendTask>'), "element x: .*emit_event"),
    (_with_task(f'<bpmn:businessRuleTask id="x">{IO}</bpmn:businessRuleTask>'),
     "element x: business rule .*exclusive gateway"),
    (_with_task(f'<bpmn:task id="x">{IO}<bpmn:multiInstanceLoopCharacteristics/></bpmn:task>'),
     "element x: multi-instance .*exclusive gateway"),
    (_with_task(f'<bpmn:intermediateCatchEvent id="x">{IO}<bpmn:linkEventDefinition name="l"/>'
                "</bpmn:intermediateCatchEvent>"), "element x: link events are not supported"),
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


def _waiting_for(message_xml: str, ref: str = "m") -> str:
    return _with_task(
        f'<bpmn:intermediateCatchEvent id="x">{IO}<bpmn:messageEventDefinition '
        f'messageRef="{ref}"/></bpmn:intermediateCatchEvent>').replace("</bpmn:process>", f"</bpmn:process>{message_xml}")


def test_plain_user_manual_tasks_and_milestones_are_accepted() -> None:
    for task in ("task", "userTask", "manualTask", "intermediateThrowEvent"):
        assert validate_bpmn(_with_task(f'<bpmn:{task} id="x">{IO}</bpmn:{task}>')).process_id \
            == "minimal"


@pytest.mark.parametrize("name", ["message_1", "B", "Test Message", "order", "Order.Completed",
                                  "a." + "b" * 100])
def test_a_message_name_that_is_no_event_type_is_refused(name: str) -> None:
    """An execution would wait for an event no producer can send."""
    assert not EVENT_TYPE_PATTERN.fullmatch(name) or len(name) > 100
    xml = _waiting_for(f'<bpmn:message id="m" name="{name}"/>')
    with pytest.raises(BpmnError, match=f"message `{name}` of element `x` is not an event type: "
                                        "expected 1-100 characters of lowercase dotted words"):
        validate_bpmn(xml)


def test_a_message_without_a_name_or_definition_is_refused() -> None:
    with pytest.raises(BpmnError, match="element x: its message has no name"):
        validate_bpmn(_waiting_for('<bpmn:message id="m"/>'))
    with pytest.raises(BpmnError, match="element x: message `message_1` is defined nowhere"):
        validate_bpmn(_waiting_for("", ref="message_1"))


def test_a_message_throw_is_refused_with_what_to_do() -> None:
    xml = _with_task(f'<bpmn:intermediateThrowEvent id="x">{IO}<bpmn:messageEventDefinition '
                     'messageRef="m"/></bpmn:intermediateThrowEvent>').replace(
        "</bpmn:process>", '</bpmn:process><bpmn:message id="m" name="order.completed"/>')
    with pytest.raises(BpmnError, match="element x: throwing a message .*`emit_event`"):
        validate_bpmn(xml)


CALL_MAIN = (BPMN / "call_main.bpmn").read_text()
CALL_HELPER = (BPMN / "call_helper.bpmn").read_text()


def test_a_call_activity_whose_process_is_in_no_deployed_file_is_refused() -> None:
    with pytest.raises(BpmnError, match="call activity `call` calls process `helper`, which is "
                                        "in no deployed file: deploy both files together"):
        validate_bpmn(CALL_MAIN)


def test_several_files_deploy_together() -> None:
    validated = validate_bpmn(CALL_MAIN, others={"call_helper.bpmn": CALL_HELPER})
    assert validated.process_id == "call_main"
    assert set(validated.parsed.subprocess_specs) == {"helper"}
    # A file nothing calls is a mistake, named with its file.
    with pytest.raises(BpmnError, match="minimal.bpmn: none of its processes .*`minimal`.* "
                                        "is called from `call_main`"):
        validate_bpmn(CALL_MAIN, others={"call_helper.bpmn": CALL_HELPER, "minimal.bpmn": MINIMAL})
    with pytest.raises(BpmnError, match="call_helper.bpmn: element x: signals"):
        validate_bpmn(CALL_MAIN, others={"call_helper.bpmn": _with_task(
            f'<bpmn:intermediateCatchEvent id="x">{IO}<bpmn:signalEventDefinition/>'
            "</bpmn:intermediateCatchEvent>")})


def test_several_executable_processes_are_refused_with_a_way_out() -> None:
    both = MINIMAL.replace("</bpmn:definitions>", CALL_HELPER[CALL_HELPER.index("<bpmn:process"):])
    with pytest.raises(BpmnError, match=r"several executable processes .*`helper`, `minimal`.*"
                                        r"isExecutable=\"false\".*--process ID"):
        validate_bpmn(both)
    assert validate_bpmn(both, process_id="minimal").process_id == "minimal"
    assert validate_bpmn(both.replace('id="helper" isExecutable="true"',
                                      'id="helper" isExecutable="false"')).process_id == "minimal"
    with pytest.raises(BpmnError, match="no process `nope`"):
        validate_bpmn(both, process_id="nope")


@pytest.mark.servers
def test_a_multi_file_workflow_is_stored_and_its_spec_loads_and_runs(
        celery_worker: WorkerProcess) -> None:
    """The version keeps every file: a worker rebuilds the spec and runs the call activity."""
    from tests.workflow_helpers import nodes, start, wait_status

    name = f"multi-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        deploy_workflow(session, name, CALL_MAIN, others={"call_helper.bpmn": CALL_HELPER},
                        stages=[], activate=True)
    with session_scope() as session:
        workflow = session.execute(select(Workflow).where(Workflow.name == name)).scalar_one()
        version = session.get(WorkflowVersion, (workflow.id, workflow.version))
        assert version is not None and workflow.bpmn_xml == CALL_MAIN
        assert (version.extra_files, version.process_id) == ({"call_helper.bpmn": CALL_HELPER},
                                                             "call_main")
        loaded = SpecCache().get(session, workflow.id, workflow.version)
        assert loaded.process_id == "call_main" and set(loaded.subprocess_specs) == {"helper"}
        # The same files again: unchanged; the helper changed: a new version.
        again = deploy_workflow(session, name, CALL_MAIN, others={"call_helper.bpmn": CALL_HELPER},
                                stages=[], activate=True)
        assert again.unchanged == (f"workflow {name}",)
        changed = deploy_workflow(session, name, CALL_MAIN, stages=[], activate=True, others={
            "call_helper.bpmn": CALL_HELPER.replace("doubled + 100", "doubled + 200")})
        assert changed.updated == (f"workflow {name} 2.0.0",)
    execution_id = start(name, {"base": 5})
    row = wait_status(execution_id, "completed", "failed")
    assert row.status == "completed", row.error_message
    assert (row.variables or {})["result"] == 10 + 210
    assert nodes(execution_id) == ["start", "double", "helper_start", "help", "helper_end",
                                   "call", "milestone", "combine", "end"]


def test_a_call_activity_cycle_is_refused_at_deploy() -> None:
    """Each call opens one more nested instance: such an execution would step for ever."""
    xml = (BPMN / "call_cycle.bpmn").read_text()
    with pytest.raises(BpmnError, match=r"call activity `again` calls process `helper`, which is "
                                        r"already running it \(main → helper → helper\)"):
        validate_bpmn(xml)
    mutual = xml.replace('id="again" calledElement="helper"', 'id="again" calledElement="main"')
    with pytest.raises(BpmnError, match=r"no process to start.*called by `again`, `call`"):
        validate_bpmn(mutual)
    with pytest.raises(BpmnError, match=r"`again` calls process `main`, which is already running "
                                        r"it \(main → helper → main\)"):
        validate_bpmn(mutual, process_id="main")
