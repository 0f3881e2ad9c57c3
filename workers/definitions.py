"""Declarative definitions: workflows, segments and triggers applied by name from YAML.

    messaging: {...}                     # the send policy (workers/sends/config.py)
    workflows:
      - name: welcome
        file: bpmn/welcome.bpmn          # relative to the YAML file; or a list: the main
                                         # file first, then the files of processes it calls
        process: welcome                 # optional: the process to run (default: the main
                                         # file's one executable process nobody calls)
        stages: [Acquisition]
        status: active                   # draft | active | inactive | archived
        goal: {event_type: project.created, within: 14d}   # what conversion means
        holdout: 10                      # percent of users in this workflow's control group
        caps: [{max: 2, per: 7d}]        # this workflow's sends
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
        variables:                       # start variables: {name: path into event or user}
          order_id: event.data.order_id  # a missing key gives None
          plan: user.attributes.plan
    schedules:                           # scheduled audience journeys (workers/schedules/)
      - name: weekly-win-back
        workflow: win_back
        segment: dormant                 # optional: every user when left out
        cron: "0 10 * * 1"               # or every: 7d, or manual: true (fleet schedule run)
        timezone: Europe/Berlin          # the zone the cron's wall-clock times are read in
        batch_size: 1000                 # users started per transaction
        reentry: no_concurrent           # skip users in the workflow already (or allow)

Everything is validated before anything is written (conditions, BPMN, references
between definitions), and every problem is named by its JSON pointer in the file
(`/triggers/0/cooldown: trigger t: ...`); then one transaction creates or updates each
by name. A
workflow whose BPMN changed gets a new version; running executions keep theirs.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy import Text, cast, select, update
from sqlalchemy.orm import Session

from db.models import (
    LIFECYCLE_STAGES,
    ProgramSetting,
    Trigger,
    UserSegment,
    Workflow,
    WorkflowVersion,
)
from workers.engine.bpmn import BpmnError
from workers.engine.validate import ValidatedWorkflow, validate_bpmn
from workers.event_types import EVENT_TYPE_RULE, SEGMENT_ENTERED, SEGMENT_EXITED, is_event_type
from workers.operators.registry import PARAM_CHECKS, operator_names
from workers.rules.conditions import (
    MAX_COST,
    ConditionError,
    parse,
    parse_duration,
    segment_refs,
)
from workers.rules.triggers import compile_start_variables
from workers.schedules import runs as schedule_runs
from workers.schedules.cron import parse_cron, zone
from workers.sends.config import CapDef, GoalDef, MessagingDef, WorkflowSettings
from workers.sends.policy import MESSAGING

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
    # Where the definition is in the file, as a JSON pointer (set by `_parse`), so the
    # checks after validation name the place too.
    _at: str = PrivateAttr(default="")


class WorkflowDef(_Strict):
    name: str = Field(min_length=1, max_length=255)
    file: Path | list[Path]  # a list: the main file first, then the files of called processes
    process: str | None = None
    description: str | None = None
    stages: list[str] = []
    status: Literal["draft", "active", "inactive", "archived"] = "active"
    # The send gateway's per-workflow settings (workers/sends/config.py WorkflowSettings).
    goal: GoalDef | None = None
    holdout: float = Field(default=0, ge=0, le=100)
    caps: list[CapDef] = []
    lookback: str | None = None  # how far back its message waits look ('1h'; validated below)
    exit_on_goal: bool = False  # the goal ends a running execution wherever it is
    exit_when: dict[str, Any] | None = None  # so does this condition on the user

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        return _stages(value)

    @field_validator("lookback", "exit_when")
    @classmethod
    def _setting(cls, value: Any, info: ValidationInfo) -> Any:
        """Checked by the model workers load the settings with (one meaning for both)."""
        try:
            name = str(info.field_name)
            return getattr(WorkflowSettings.model_validate({name: value}), name)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    @field_validator("exit_on_goal")
    @classmethod
    def _exit_needs_goal(cls, value: bool, info: ValidationInfo) -> bool:
        # An invalid goal is missing from info.data: reported at /goal, not here.
        if value and "goal" in info.data and info.data["goal"] is None:
            raise ValueError("exit_on_goal needs a goal: the goal is what ends the execution")
        return value

    @property
    def settings(self) -> dict[str, Any]:
        return WorkflowSettings(goal=self.goal, holdout=self.holdout, caps=self.caps,
                                lookback=self.lookback, exit_on_goal=self.exit_on_goal,
                                exit_when=self.exit_when).model_dump(mode="json")

    @field_validator("file")
    @classmethod
    def _some_file(cls, value: Path | list[Path]) -> Path | list[Path]:
        if value == []:
            raise ValueError("names no file")
        return value

    @property
    def files(self) -> list[Path]:
        return self.file if isinstance(self.file, list) else [self.file]


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


_SEGMENT_KEYS = {"segment_entered": SEGMENT_ENTERED, "segment_exited": SEGMENT_EXITED}


def _trigger_event_type(value: str) -> str:
    if not is_event_type(value):
        raise ValueError(f"{value!r} is not an event type ({EVENT_TYPE_RULE}): no event "
                         "could ever match it")
    if value in _SEGMENT_KEYS.values():
        raise ValueError(f"{value!r} is the fleet's own event: write "
                         f"on: {{{value.replace('.', '_')}: SEGMENT}}")
    return value


class TriggerOn(_Strict):
    """What starts a trigger's workflow: one event type, or a user entering or leaving a segment."""

    event: str | None = Field(default=None, min_length=1, max_length=255)
    segment_entered: str | None = Field(default=None, min_length=1, max_length=255)
    segment_exited: str | None = Field(default=None, min_length=1, max_length=255)

    @field_validator("event")
    @classmethod
    def _is_event_type(cls, value: str | None) -> str | None:
        return None if value is None else _trigger_event_type(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> TriggerOn:
        given = [k for k in ("event", *_SEGMENT_KEYS) if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("name exactly one of event, segment_entered, segment_exited "
                             f"(got {', '.join(given) or 'none'})")
        return self


class TriggerDef(_Strict):
    """A trigger: `event_type: X`, or `on: {event: X}`, `{segment_entered: S}`, `{segment_exited: S}`."""

    name: str = Field(min_length=1, max_length=255)
    event_type: str | None = Field(default=None, min_length=1, max_length=255)
    on: TriggerOn | None = None
    conditions: dict[str, Any] = {}
    workflow: str | None = None
    enabled: bool = True
    reentry: Literal["no_concurrent", "allow"] = "no_concurrent"
    max_runs_per_user: int | None = Field(default=None, gt=0)
    cooldown: str | int | None = None
    # Start variables mapped from the event and the user (workers/rules/triggers.py).
    variables: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `on:` key as the boolean true (as in GitHub Actions files).
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @field_validator("event_type")
    @classmethod
    def _is_event_type(cls, value: str | None) -> str | None:
        return None if value is None else _trigger_event_type(value)

    @model_validator(mode="after")
    def _one_start(self) -> TriggerDef:
        if (self.event_type is None) == (self.on is None):
            raise ValueError("give either event_type or on, not both or neither")
        return self

    @property
    def starts_on(self) -> tuple[str, str | None]:
        """(event type, watched segment's name or None)."""
        if self.on is None:
            assert self.event_type is not None
            return self.event_type, None
        for key, event_type in _SEGMENT_KEYS.items():
            if getattr(self.on, key) is not None:
                return event_type, getattr(self.on, key)
        assert self.on.event is not None
        return self.on.event, None

    @property
    def cooldown_seconds(self) -> int | None:
        return _seconds(self.cooldown)


MIN_EVERY_SECONDS = 60  # the beat looks for due schedules every 30 s


class ScheduleDef(_Strict):
    """A scheduled audience journey: exactly one of `cron` (read in `timezone`), `every`, `manual`."""

    name: str = Field(min_length=1, max_length=255)
    workflow: str = Field(min_length=1, max_length=255)
    segment: str | None = Field(default=None, min_length=1, max_length=255)  # None: everyone
    cron: str | None = None
    timezone: str = "UTC"
    every: str | int | None = None
    manual: bool = False
    batch_size: int = Field(default=1000, ge=1, le=10000)
    reentry: Literal["no_concurrent", "allow"] = "no_concurrent"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: str | int | None) -> str | int | None:
        seconds = _seconds(value)
        if seconds is not None and seconds < MIN_EVERY_SECONDS:
            raise ValueError(f"must be at least {MIN_EVERY_SECONDS}s (got {seconds}s)")
        return value

    @model_validator(mode="after")
    def _one_when(self) -> ScheduleDef:
        given = [k for k, v in (("cron", self.cron), ("every", self.every),
                                ("manual", self.manual or None)) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of cron, every or manual: true "
                             f"(got {', '.join(given) or 'none'})")
        return self

    @property
    def when(self) -> schedule_runs.When:
        if self.cron is not None:
            return schedule_runs.When("cron", " ".join(self.cron.split()), self.timezone)
        if self.every is not None:
            return schedule_runs.When("interval", interval_seconds=_seconds(self.every))
        return schedule_runs.When("manual")


class Definitions(_Strict):
    messaging: MessagingDef | None = None  # None: the stored policy is left as it is
    workflows: list[WorkflowDef] = []
    segments: list[SegmentDef] = []
    triggers: list[TriggerDef] = []
    schedules: list[ScheduleDef] = []


@dataclass(frozen=True)
class WorkflowSource:
    """A workflow's BPMN: the main file, the files of the processes it calls, what to run."""

    xml: str
    others: Mapping[str, str] = field(default_factory=dict)  # file name -> XML
    process_id: str | None = None  # None: the main file's one executable process

    def validate(self) -> ValidatedWorkflow:
        return validate_bpmn(self.xml, OPERATORS, others=self.others, process_id=self.process_id,
                             param_checks=PARAM_CHECKS)


def read_source(paths: Sequence[Path], process_id: str | None = None) -> WorkflowSource:
    """The workflow in these files, the first the main one; raises OSError or DefinitionError."""
    main, *rest = paths
    names = [path.name for path in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DefinitionError(f"two files named {', '.join(twice)}: a workflow's files are "
                              "stored by name, rename one")
    return WorkflowSource(main.read_text(), {path.name: path.read_text() for path in rest},
                          process_id)


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


def load(path: Path) -> tuple[Definitions, dict[str, WorkflowSource]]:
    """Parse and validate a definitions file; returns it and each workflow's BPMN files.

    Every problem of every definition is collected, so one run names them all; each
    line starts with the file's name.
    """
    problems: list[str] = []
    doc = _parse(_read_yaml(path), problems)
    sources: dict[str, WorkflowSource] = {}
    for wf in doc.workflows:
        files = [path.parent / file for file in wf.files]
        try:
            sources[wf.name] = read_source(files, wf.process)
            sources[wf.name].validate()
        except (OSError, BpmnError, DefinitionError) as exc:
            problems.append(f"{wf._at}/file: workflow {wf.name} ({', '.join(map(str, files))}): "
                            f"{exc}")
    for seg in doc.segments:
        problems += _problems(seg, f"segment {seg.name}",
                              conditions=partial(parse, seg.conditions, allow_event=False,
                                                 max_cost=MAX_COST),
                              ttl=partial(_seconds, seg.ttl))
    for trig in doc.triggers:
        problems += _problems(trig, f"trigger {trig.name}",
                              conditions=partial(parse, trig.conditions, max_cost=MAX_COST),
                              cooldown=partial(_seconds, trig.cooldown),
                              variables=partial(compile_start_variables, trig.variables))
    for sched in doc.schedules:
        if sched.cron is not None:
            problems += _problems(sched, f"schedule {sched.name}",
                                  cron=partial(parse_cron, sched.cron, sched.timezone))
    for kind, items in (("workflow", doc.workflows), ("segment", doc.segments),
                        ("trigger", doc.triggers), ("schedule", doc.schedules)):
        names = [i.name for i in items]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            where = ", ".join(i._at for i in items if i.name == dup)
            problems.append(f"{where}: {kind} {dup}: defined twice")
    if problems:
        raise DefinitionError("\n".join(f"{path}: {problem}" for problem in problems))
    return doc, sources


def _read_yaml(path: Path) -> object:
    """The file's YAML; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise DefinitionError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{path}: invalid YAML: {exc}") from None


_SECTIONS: dict[str, tuple[str, type[_Strict]]] = {
    "workflows": ("workflow", WorkflowDef), "segments": ("segment", SegmentDef),
    "triggers": ("trigger", TriggerDef), "schedules": ("schedule", ScheduleDef)}


def _parse(raw: object, problems: list[str]) -> Definitions:
    """The definitions that are valid on their own; each invalid one adds its problems."""
    if raw is None:
        return Definitions()
    if not isinstance(raw, dict):
        problems.append(f"/: expected a mapping with messaging, {', '.join(_SECTIONS)}, got "
                        f"{type(raw).__name__}")
        return Definitions()
    problems += [f"/{key}: unknown section (expected messaging, {', '.join(_SECTIONS)})"
                 for key in raw if key not in _SECTIONS and key != "messaging"]
    valid: dict[str, Any] = {}
    if raw.get("messaging") is not None:
        try:
            valid["messaging"] = MessagingDef.model_validate(raw["messaging"])
        except ValidationError as exc:
            problems += [f"{_pointer('messaging', *error['loc'])}: messaging: "
                         f"{error['msg'].removeprefix('Value error, ')}"
                         for error in exc.errors()]
    for section, (kind, model) in _SECTIONS.items():
        items = raw.get(section) or []
        if not isinstance(items, list):
            problems.append(f"/{section}: expected a list, got {type(items).__name__}")
            continue
        valid[section] = []
        for index, item in enumerate(items):
            name = item.get("name") if isinstance(item, dict) else None
            label = f"{kind} {name}" if isinstance(name, str) and name else f"{kind} #{index + 1}"
            try:
                definition = model.model_validate(item)
            except ValidationError as exc:
                problems += [f"{_pointer(section, index, *error['loc'])}: {label}: "
                             f"{error['msg'].removeprefix('Value error, ')}"
                             for error in exc.errors()]
            else:
                definition._at = _pointer(section, index)
                valid[section].append(definition)
    return Definitions(**valid)


def _pointer(*parts: int | str) -> str:
    """The JSON pointer (RFC 6901) of a place in the document, e.g. /triggers/0/cooldown."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _problems(definition: _Strict, label: str, **checks: Callable[[], object]) -> list[str]:
    """Run every check (keyword: the field it checks); one line for each that fails."""
    found = []
    for name, check in checks.items():
        try:
            check()
        except (ConditionError, ValueError) as exc:
            found.append(f"{definition._at}/{name}: {label}: {exc}")
    return found


def _next_version(current: str) -> str:
    major = current.split(".", 1)[0]
    return f"{int(major) + 1}.0.0" if major.isdigit() else f"{current}+1"


def apply(session: Session, doc: Definitions, sources: Mapping[str, WorkflowSource]) -> ApplyReport:
    """Create or update every definition by name, in the caller's transaction.

    References to segments and workflows in neither the document nor the database are
    all reported in one DefinitionError, after which the caller must roll back.
    """
    changes: list[Change] = []
    now = dt.datetime.now(dt.UTC)
    if doc.messaging is not None:
        changes.append(_apply_messaging(session, doc.messaging, now))
    workflow_ids: dict[str, Any] = {}
    for wf in doc.workflows:
        workflow_ids[wf.name], change = _apply_workflow(session, wf.name, sources[wf.name],
                                                        wf.description, wf.stages, wf.status, now,
                                                        wf.settings)
        changes.append(change)
    for seg in doc.segments:
        values: dict[str, Any] = {
            "description": seg.description, "conditions": seg.conditions, "kind": seg.kind,
            "ttl_seconds": seg.ttl_seconds, "lifecycle_stages": seg.stages}
        changes.append(_upsert(session, UserSegment, seg.name, values, now, "segment"))
    segment_names = {seg.name for seg in doc.segments}
    problems: list[str] = []
    for kind, definition, conditions in (
            [("segment", s, s.conditions) for s in doc.segments]
            + [("trigger", t, t.conditions) for t in doc.triggers]):
        for ref in segment_refs(parse(conditions)):
            if ref not in segment_names and session.execute(select(UserSegment.id).where(
                    (UserSegment.name == ref) | (cast(UserSegment.id, Text) == ref))).first() is None:
                problems.append(f"{definition._at}/conditions: {kind} {definition.name}: "
                                f"in_segment names no segment: {ref!r}")
    for trig in doc.triggers:
        workflow_id = None
        if trig.workflow is not None:
            workflow_id = workflow_ids.get(trig.workflow) or session.execute(
                select(Workflow.id).where(Workflow.name == trig.workflow)).scalar_one_or_none()
            if workflow_id is None:
                problems.append(f"{trig._at}/workflow: trigger {trig.name}: no workflow named "
                                f"{trig.workflow!r}")
                continue
        event_type, segment_name = trig.starts_on
        segment_id = None
        if segment_name is not None:
            session.flush()  # the document's segments, added above
            segment_id = session.execute(select(UserSegment.id).where(
                UserSegment.name == segment_name)).scalar_one_or_none()
            if segment_id is None:
                problems.append(f"{trig._at}/on: trigger {trig.name}: no segment named "
                                f"{segment_name!r}")
                continue
        values = {"event_type": event_type, "segment_id": segment_id,
                  "conditions": trig.conditions, "workflow_id": workflow_id, "enabled": trig.enabled, "reentry": trig.reentry,
                  "max_runs_per_user": trig.max_runs_per_user,
                  "cooldown_seconds": trig.cooldown_seconds,
                  "start_variables": trig.variables}
        changes.append(_upsert(session, Trigger, trig.name, values, now, "trigger"))
    changes += _apply_schedules(session, doc.schedules, workflow_ids, now, problems)
    if problems:  # the caller's transaction rolls back what was written
        raise DefinitionError("\n".join(problems))
    return ApplyReport.of(changes)


def _apply_schedules(session: Session, schedules: Sequence[ScheduleDef],
                     workflow_ids: Mapping[str, Any], now: dt.datetime,
                     problems: list[str]) -> list[Change]:
    """Create or update each schedule by name (workers/schedules/runs.py writes them).

    A workflow or segment named neither in the document nor in the database adds a
    problem with its path instead.
    """
    changes: list[Change] = []
    if schedules:
        session.flush()  # the document's segments, added above
    for sched in schedules:
        workflow_id = workflow_ids.get(sched.workflow) or session.execute(
            select(Workflow.id).where(Workflow.name == sched.workflow)).scalar_one_or_none()
        if workflow_id is None:
            problems.append(f"{sched._at}/workflow: schedule {sched.name}: no workflow named "
                            f"{sched.workflow!r}")
        segment_id = None
        if sched.segment is not None:
            segment_id = session.execute(select(UserSegment.id).where(
                UserSegment.name == sched.segment)).scalar_one_or_none()
            if segment_id is None:
                problems.append(f"{sched._at}/segment: schedule {sched.name}: no segment named "
                                f"{sched.segment!r}")
        if workflow_id is None or (sched.segment is not None and segment_id is None):
            continue
        verb = schedule_runs.upsert(session, sched.name, schedule_runs.ScheduleValues(
            workflow_id=workflow_id, when=sched.when, segment_id=segment_id,
            batch_size=sched.batch_size, reentry=sched.reentry), now)
        changes.append((verb, f"schedule {sched.name}"))
    return changes


def _apply_messaging(session: Session, messaging: MessagingDef, now: dt.datetime) -> Change:
    """Store the program's send policy (program_settings 'messaging'); workers reload it."""
    value = messaging.model_dump(mode="json")
    row = session.get(ProgramSetting, MESSAGING)
    if row is None:
        session.add(ProgramSetting(name=MESSAGING, value=value, updated_at=now))
        return ("created", "messaging policy")
    if row.value == value:
        return ("unchanged", "messaging policy")
    row.value, row.updated_at = value, now
    return ("updated", "messaging policy")


def _apply_workflow(session: Session, name: str, source: WorkflowSource,
                    description: str | None, stages: list[str], status: str | None,
                    now: dt.datetime, settings: dict[str, Any] | None = None
                    ) -> tuple[uuid.UUID, Change]:
    """Create or update one workflow by name; changed BPMN bumps the version (status None: keep).

    The BPMN is the main file, the other files and the process run: a change to any
    is a new version. `workflows.bpmn_xml` keeps the main file, `workflow_versions`
    all of them. Returns the workflow's id and what happened to it.
    """
    change: Change
    process_id = source.validate().process_id
    bpmn = (source.xml, dict(source.others), process_id)
    row = session.execute(select(Workflow).where(Workflow.name == name)).scalar_one_or_none()
    if row is None:
        row = Workflow(name=name, description=description, bpmn_xml=source.xml, version="1.0.0",
                       lifecycle_stages=stages, status=status or "draft",
                       settings=settings or {})
        session.add(row)
        session.flush()
        change = ("created", f"workflow {name} 1.0.0")
    else:
        current = session.get(WorkflowVersion, (row.id, row.version))
        stored = (row.bpmn_xml, current.extra_files, current.process_id) if current else (
            row.bpmn_xml, {}, process_id)
        wanted = row.settings if settings is None else settings  # deploy keeps them
        if (stored, row.status, row.description, row.lifecycle_stages, row.settings) == (
                bpmn, status or row.status, description, stages, wanted):
            change = ("unchanged", f"workflow {name}")
        else:
            if stored != bpmn:
                row.version = _next_version(row.version)
                row.bpmn_xml = source.xml
            row.status, row.description = status or row.status, description
            row.lifecycle_stages, row.updated_at, row.settings = stages, now, wanted
            change = ("updated", f"workflow {name} {row.version}")
    if session.get(WorkflowVersion, (row.id, row.version)) is None:
        session.add(WorkflowVersion(workflow_id=row.id, version=row.version, bpmn_xml=row.bpmn_xml,
                                    extra_files=dict(source.others), process_id=process_id))
    return row.id, change


def deploy_workflow(session: Session, name: str, xml: str, *, stages: list[str],
                    activate: bool, description: str | None = None,
                    others: Mapping[str, str] | None = None,
                    process_id: str | None = None) -> ApplyReport:
    """`fleet workflow deploy`: validate and store BPMN files as the named workflow.

    `xml` is the main file; `others` ({file name: XML}) hold the processes it calls.
    """
    try:
        _stages(stages)
        _, change = _apply_workflow(session, name, WorkflowSource(xml, others or {}, process_id),
                                    description, stages, "active" if activate else None,
                                    dt.datetime.now(dt.UTC))
    except (BpmnError, ValueError) as exc:
        raise DefinitionError(f"workflow {name}: {exc}") from None
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
