"""Declarative definitions: workflows, segments and triggers applied by name from YAML.

    workflows:
      - name: welcome
        file: bpmn/welcome.bpmn          # relative to the YAML file
        stages: [Acquisition]
        status: active                   # draft | active | inactive | archived
    segments:
      - name: power-users
        conditions: {field: user.attributes.sessions, op: gte, value: 10}
        ttl: 1h                          # how long a computed membership stays valid
        kind: dynamic                    # or static (members set by hand)
    triggers:
      - name: welcome-on-signup
        event_type: user.signed_up
        conditions: {}
        workflow: welcome
        reentry: no_concurrent           # or allow
        max_runs_per_user: 1
        cooldown: 7d

Everything is validated before anything is written (conditions, BPMN, references
between definitions); then one transaction creates or updates each by name. A
workflow whose BPMN changed gets a new version; running executions keep theirs.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import Text, cast, select, update
from sqlalchemy.orm import Session

from db.models import LIFECYCLE_STAGES, Trigger, UserSegment, Workflow, WorkflowVersion
from workers.engine.bpmn import BpmnError
from workers.engine.validate import validate_bpmn
from workers.operators.registry import operator_names
from workers.rules.conditions import (
    MAX_COST,
    ConditionError,
    parse,
    parse_duration,
    segment_refs,
)

# Service-task operators the engine can run; a BPMN naming another is refused at deploy.
OPERATORS: frozenset[str] = operator_names()


class DefinitionError(ValueError):
    """The document is invalid; nothing was written."""


def _stages(stages: list[str]) -> list[str]:
    unknown = [s for s in stages if s not in LIFECYCLE_STAGES]
    if unknown:
        raise ValueError(f"unknown lifecycle stages {unknown} (expected {list(LIFECYCLE_STAGES)})")
    return stages


def _seconds(value: str | int | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(parse_duration(value).total_seconds())
    except ConditionError as exc:
        raise ValueError(exc.message) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkflowDef(_Strict):
    name: str = Field(min_length=1, max_length=255)
    file: Path
    description: str | None = None
    stages: list[str] = []
    status: Literal["draft", "active", "inactive", "archived"] = "active"

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        return _stages(value)


class SegmentDef(_Strict):
    name: str = Field(min_length=1, max_length=255)
    description: str | None = None
    conditions: dict[str, Any] = {}
    kind: Literal["dynamic", "static"] = "dynamic"
    ttl: str | int = "1h"
    stages: list[str] = []

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        return _stages(value)

    @property
    def ttl_seconds(self) -> int:
        return _seconds(self.ttl) or 3600


class TriggerDef(_Strict):
    name: str = Field(min_length=1, max_length=255)
    event_type: str = Field(min_length=1, max_length=255)
    conditions: dict[str, Any] = {}
    workflow: str | None = None
    enabled: bool = True
    reentry: Literal["no_concurrent", "allow"] = "no_concurrent"
    max_runs_per_user: int | None = Field(default=None, gt=0)
    cooldown: str | int | None = None

    @property
    def cooldown_seconds(self) -> int | None:
        return _seconds(self.cooldown)


class Definitions(_Strict):
    workflows: list[WorkflowDef] = []
    segments: list[SegmentDef] = []
    triggers: list[TriggerDef] = []


Verb = Literal["created", "updated", "unchanged"]
Change = tuple[Verb, str]  # what happened to one definition, e.g. ("created", "segment vip")


@dataclass(frozen=True)
class ApplyReport:
    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    @classmethod
    def of(cls, changes: Iterable[Change]) -> ApplyReport:
        """The report of these changes, each list in the order they were made."""
        done = list(changes)
        return cls(created=tuple(item for verb, item in done if verb == "created"),
                   updated=tuple(item for verb, item in done if verb == "updated"),
                   unchanged=tuple(item for verb, item in done if verb == "unchanged"))


def load(path: Path) -> tuple[Definitions, dict[str, str]]:
    """Parse and validate a definitions file; returns it and each workflow's BPMN XML."""
    try:
        doc = Definitions.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise DefinitionError(f"{path}: {exc}") from None
    problems: list[str] = []
    xml: dict[str, str] = {}
    for wf in doc.workflows:
        source = (path.parent / wf.file)
        try:
            xml[wf.name] = source.read_text()
            validate_bpmn(xml[wf.name], OPERATORS)
        except (OSError, BpmnError) as exc:
            problems.append(f"workflow {wf.name} ({source}): {exc}")
    for seg in doc.segments:
        try:
            parse(seg.conditions, allow_event=False, max_cost=MAX_COST)
            _ = seg.ttl_seconds
        except (ConditionError, ValueError) as exc:
            problems.append(f"segment {seg.name}: {exc}")
    for trig in doc.triggers:
        try:
            parse(trig.conditions, max_cost=MAX_COST)
            _ = trig.cooldown_seconds
        except (ConditionError, ValueError) as exc:
            problems.append(f"trigger {trig.name}: {exc}")
    for kind, items in (("workflow", doc.workflows), ("segment", doc.segments),
                        ("trigger", doc.triggers)):
        names = [i.name for i in items]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"{kind} {dup}: defined twice")
    if problems:
        raise DefinitionError("\n".join(problems))
    return doc, xml


def _next_version(current: str) -> str:
    major = current.split(".", 1)[0]
    return f"{int(major) + 1}.0.0" if major.isdigit() else f"{current}+1"


def apply(session: Session, doc: Definitions, xml: dict[str, str]) -> ApplyReport:
    """Create or update every definition by name, in the caller's transaction."""
    changes: list[Change] = []
    now = dt.datetime.now(dt.UTC)
    workflow_ids: dict[str, Any] = {}
    for wf in doc.workflows:
        workflow_ids[wf.name], change = _apply_workflow(session, wf.name, xml[wf.name],
                                                        wf.description, wf.stages, wf.status, now)
        changes.append(change)
    for seg in doc.segments:
        values: dict[str, Any] = {
            "description": seg.description, "conditions": seg.conditions, "kind": seg.kind,
            "ttl_seconds": seg.ttl_seconds, "lifecycle_stages": seg.stages}
        changes.append(_upsert(session, UserSegment, seg.name, values, now, "segment"))
    segment_names = {seg.name for seg in doc.segments}
    for kind, name, conditions in (
            [("segment", s.name, s.conditions) for s in doc.segments]
            + [("trigger", t.name, t.conditions) for t in doc.triggers]):
        for ref in segment_refs(parse(conditions)):
            if ref not in segment_names and session.execute(select(UserSegment.id).where(
                    (UserSegment.name == ref) | (cast(UserSegment.id, Text) == ref))).first() is None:
                raise DefinitionError(f"{kind} {name}: in_segment names no segment: {ref!r}")
    for trig in doc.triggers:
        workflow_id = None
        if trig.workflow is not None:
            workflow_id = workflow_ids.get(trig.workflow) or session.execute(
                select(Workflow.id).where(Workflow.name == trig.workflow)).scalar_one_or_none()
            if workflow_id is None:
                raise DefinitionError(f"trigger {trig.name}: no workflow named {trig.workflow!r}")
        values = {"event_type": trig.event_type, "conditions": trig.conditions,
                  "workflow_id": workflow_id, "enabled": trig.enabled, "reentry": trig.reentry,
                  "max_runs_per_user": trig.max_runs_per_user,
                  "cooldown_seconds": trig.cooldown_seconds}
        changes.append(_upsert(session, Trigger, trig.name, values, now, "trigger"))
    return ApplyReport.of(changes)


def _apply_workflow(session: Session, name: str, xml: str, description: str | None,
                    stages: list[str], status: str | None,
                    now: dt.datetime) -> tuple[uuid.UUID, Change]:
    """Create or update one workflow by name; changed BPMN bumps the version (status None: keep).

    Returns the workflow's id and what happened to it.
    """
    change: Change
    process_id = validate_bpmn(xml, OPERATORS).process_id
    row = session.execute(select(Workflow).where(Workflow.name == name)).scalar_one_or_none()
    if row is None:
        row = Workflow(name=name, description=description, bpmn_xml=xml, version="1.0.0",
                       lifecycle_stages=stages, status=status or "draft")
        session.add(row)
        session.flush()
        change = ("created", f"workflow {name} 1.0.0")
    elif (row.bpmn_xml, row.status, row.description, row.lifecycle_stages) == (
            xml, status or row.status, description, stages):
        change = ("unchanged", f"workflow {name}")
    else:
        if row.bpmn_xml != xml:
            row.version = _next_version(row.version)
            row.bpmn_xml = xml
        row.status, row.description, row.lifecycle_stages = status or row.status, description, stages
        row.updated_at = now
        change = ("updated", f"workflow {name} {row.version}")
    if session.get(WorkflowVersion, (row.id, row.version)) is None:
        session.add(WorkflowVersion(workflow_id=row.id, version=row.version, bpmn_xml=row.bpmn_xml,
                                    process_id=process_id))
    return row.id, change


def deploy_workflow(session: Session, name: str, xml: str, *, stages: list[str],
                    activate: bool, description: str | None = None) -> ApplyReport:
    """`fleet workflow deploy`: validate and store one BPMN file as the named workflow."""
    try:
        validate_bpmn(xml, OPERATORS)
        _stages(stages)
    except (BpmnError, ValueError) as exc:
        raise DefinitionError(f"workflow {name}: {exc}") from None
    _, change = _apply_workflow(session, name, xml, description, stages,
                                "active" if activate else None, dt.datetime.now(dt.UTC))
    return ApplyReport.of([change])


_Named = TypeVar("_Named", UserSegment, Trigger)


def _upsert(session: Session, model: type[_Named], name: str, values: dict[str, Any],
            now: dt.datetime, kind: str) -> Change:
    """Create or update one segment or trigger by name; returns what happened to it."""
    row = session.execute(select(model).where(model.name == name)).scalar_one_or_none()
    if row is None:
        session.add(model(name=name, **values))
        return ("created", f"{kind} {name}")
    if all(getattr(row, k) == v for k, v in values.items()):
        return ("unchanged", f"{kind} {name}")
    session.execute(update(model).where(model.id == row.id).values(**values, updated_at=now))
    return ("updated", f"{kind} {name}")
