"""A trigger's `variables`: checked at `fleet apply` (naming the trigger), stored as written."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from workers.definitions import DefinitionError, apply, load
from workers.rules.triggers import StartPath, StartVariableError, compile_start_variables

MINIMAL = (Path(__file__).parent / "bpmn" / "minimal.bpmn").read_text()


def _file(tmp_path: Path, tag: str, variables: Any) -> Path:
    (tmp_path / "flow.bpmn").write_text(MINIMAL)
    doc = {"workflows": [{"name": f"flow-{tag}", "file": "flow.bpmn"}],
           "triggers": [{"name": f"trig-{tag}", "event_type": "order.placed",
                         "workflow": f"flow-{tag}", "variables": variables}]}
    path = tmp_path / "fleet.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def test_paths_compile_to_their_root_and_keys() -> None:
    assert compile_start_variables({"order_id": "event.data.order.id",
                                    "plan": "user.attributes.plan", "email": "user.email"}) == (
        ("order_id", StartPath("event", ("data", "order", "id"))),
        ("plan", StartPath("user", ("attributes", "plan"))),
        ("email", StartPath("user", ("email",))))


@pytest.mark.parametrize(("variables", "message"), [
    ({"order_id": "evnt.data.order_id"}, "unknown root 'evnt'"),
    ({"order_id": "event"}, "names no field of event"),
    ({"order_id": "event.payload.x"}, "names no field of event"),
    ({"order_id": "event.event_id.x"}, "event.event_id has no keys below it"),
    ({"order_id": "event.data..x"}, "bad key path"),
    ({"order_id": "event.data." + ".".join("k" * 9)}, "bad key path"),
    ({"order_id": 3}, "the path must be a string"),
    ({"order id": "event.data.x"}, "a name is a letter"),
    ({"event": "event.data.x"}, "the fleet's own variable"),
])
def test_apply_refuses_bad_variables_naming_the_trigger(tmp_path: Path, variables: Any,
                                                        message: str) -> None:
    with pytest.raises(StartVariableError, match=message):
        compile_start_variables(variables)
    tag = uuid.uuid4().hex[:8]
    with pytest.raises(DefinitionError) as raised:
        load(_file(tmp_path, tag, variables))
    assert f"trigger trig-{tag}:" in str(raised.value) and message in str(raised.value)


def test_variables_that_are_no_mapping_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StartVariableError, match="must be a mapping"):
        compile_start_variables(["event.data.x"])
    with pytest.raises(DefinitionError, match=r"/triggers/0/variables: trigger trig-list: "):
        load(_file(tmp_path, "list", ["event.data.x"]))


@pytest.fixture()
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
        session.rollback()


@pytest.mark.servers
def test_apply_stores_the_mapping_and_an_edit_updates_it(session: Session, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    first = {"order_id": "event.data.order_id"}
    assert f"trigger trig-{tag}" in apply(session, *load(_file(tmp_path, tag, first))).created
    stored = "SELECT start_variables FROM triggers WHERE name = :n"
    assert session.execute(text(stored), {"n": f"trig-{tag}"}).scalar_one() == first
    second = {**first, "plan": "user.attributes.plan"}
    assert f"trigger trig-{tag}" in apply(session, *load(_file(tmp_path, tag, second))).updated
    assert session.execute(text(stored), {"n": f"trig-{tag}"}).scalar_one() == second
