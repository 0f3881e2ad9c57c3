"""Engine state of an execution: SpiffWorkflow's task tree, pruned and without the spec.

SpiffWorkflow serializes the whole task tree (every task ever run) plus the whole
process spec. Stored per step, that grows with history and makes long loops
quadratic (spiff-arena #2960). Two things keep our state O(live nodes):

* the spec is not stored: it is the deployed version's, parsed once per worker
  (`workers.engine.specs`), and handed back when the state is loaded;
* finished history is pruned before every save: subtrees with nothing live in
  them are dropped, and the root moves down past finished tasks to the last one
  above the live part of the tree (whose data is then stored in full).

A finished instance of a join is kept while another instance of that join is
live, because a parallel/inclusive join merges its branches' data from them.

Task data goes through the serializer's registry (SpiffWorkflow converts it only
when it writes JSON itself), so dates and durations a script leaves are stored and
come back as such. A state PostgreSQL would refuse (a value JSON has no form for,
NaN, NUL, a lone surrogate, a cycle) raises Unstorable naming the variable, before
anything is written.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any
from uuid import UUID

from SpiffWorkflow.bpmn.serializer.default.workflow import (
    BpmnWorkflowConverter,
    TaskConverter,
    WorkflowConverter,
)
from SpiffWorkflow.bpmn.serializer.workflow import BpmnWorkflowSerializer
from SpiffWorkflow.bpmn.workflow import BpmnWorkflow
from SpiffWorkflow.specs.Join import Join
from SpiffWorkflow.spiff.serializer.config import SPIFF_CONFIG
from SpiffWorkflow.task import Task
from SpiffWorkflow.util.task import TaskState

from workers.engine.script_engine import SandboxScriptEngine
from workers.engine.specs import LoadedSpec
from workers.engine.values import Refused, check_storable

FORMAT = 1  # bump when the stored layout changes; loaders refuse what they don't know
_SCRIPT_ENGINE = SandboxScriptEngine()
# In JSON written with ensure_ascii=False: a lone surrogate, or an escaped NUL (\u0000
# after an even run of backslashes), both of which jsonb refuses.
_REFUSED_IN_JSON = re.compile(r"[\ud800-\udfff]|(?<!\\)(?:\\\\)*\\u0000")


class Unstorable(ValueError):
    """An execution's state or variables that PostgreSQL would refuse; the message says why."""


def check_json(value: Any, what: str) -> None:
    """Refuse what json.dumps or jsonb would refuse, so a step never fails at commit."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise Unstorable(f"{what} cannot be stored: {exc}") from None
    if _REFUSED_IN_JSON.search(text):
        raise Unstorable(f"{what} cannot be stored: text with a NUL character or a lone "
                         "surrogate")


class _TaskConverter(TaskConverter):
    """SpiffWorkflow's task converter, with task data converted by the registry too."""

    def to_dict(self, task: Task) -> dict[str, Any]:
        dct: dict[str, Any] = super().to_dict(task)
        dct["data"] = self.registry.convert(_escaped(self.registry.clean(dct["data"])))
        if dct["delta"]:
            dct["delta"]["updates"] = self.registry.convert(_escaped(dct["delta"]["updates"]))
        return dct


class _Literal:
    """A dict of the execution's data with a `typename` key, kept as data.

    The registry restores any stored dict whose `typename` names a registered class
    (`datetime`, `UUID`, SpiffWorkflow's own) as that object, so a producer's
    `{"typename": "BpmnWorkflow"}` in event data broke loading the execution. Such
    dicts are stored wrapped and come back as they were. (Not a dict subclass: the
    registry's `clean` copies dicts into plain ones.)
    """

    __slots__ = ("value",)

    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value


def _escaped(value: Any) -> Any:
    """`value` with every dict that has a `typename` key wrapped as a `_Literal`."""
    if isinstance(value, dict):
        inner = {k: _escaped(v) for k, v in value.items()}
        return _Literal(inner) if "typename" in value else inner
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


class _StateConverter(BpmnWorkflowConverter):
    """SpiffWorkflow's workflow converter, minus the spec (restored from the cache)."""

    def to_dict(self, workflow: BpmnWorkflow) -> dict[str, Any]:
        dct: dict[str, Any] = WorkflowConverter.to_dict(self, workflow)
        dct["subprocesses"] = self.mapping_to_dict(workflow.subprocesses)
        dct["format"] = FORMAT
        return dct

    def from_dict(self, dct: dict[str, Any], loaded: LoadedSpec | None = None) -> BpmnWorkflow:
        if loaded is None:
            raise ValueError("engine state is restored with its workflow version's spec")
        if dct.get("format") != FORMAT:
            raise ValueError(f"engine state format {dct.get('format')!r} is not {FORMAT}")
        workflow = BpmnWorkflow(loaded.spec, loaded.subprocess_specs,
                                script_engine=_SCRIPT_ENGINE, deserializing=True)
        workflow.tasks = self.mapping_from_dict(_parents_first(dct), UUID, workflow=workflow)
        workflow.task_tree = workflow.tasks.get(UUID(dct["root"]))
        self.set_default_attributes(workflow, dct)
        subprocesses = {tid: {**sp, "tasks": _parents_first(sp)}
                        for tid, sp in dct["subprocesses"].items()}
        self.subprocesses_from_dict(subprocesses, workflow)
        return workflow


def _parents_first(dct: dict[str, Any]) -> dict[str, Any]:
    """The task mapping ordered root first, parents before children.

    A task's data is stored as a delta on its parent's, so parents must be restored
    first; jsonb does not keep the key order the serializer wrote.
    """
    tasks: dict[str, Any] = dct["tasks"]
    ordered: dict[str, Any] = {}
    queue = [dct["root"]]
    while queue:
        tid = queue.pop(0)
        if tid in tasks and tid not in ordered:
            ordered[tid] = tasks[tid]
            queue.extend(tasks[tid]["children"])
    return ordered


_REGISTRY = BpmnWorkflowSerializer.configure({**SPIFF_CONFIG, BpmnWorkflow: _StateConverter,
                                              Task: _TaskConverter})
_REGISTRY.register(dt.date, lambda v: {"value": v.isoformat()},
                   lambda v: dt.date.fromisoformat(v["value"]))
_REGISTRY.register(_Literal, lambda v: {"value": {k: _REGISTRY.convert(x) for k, x in v.value.items()}},
                   lambda v: {k: _REGISTRY.restore(x) for k, x in v["value"].items()},
                   typename="FleetLiteral")


def new_workflow(loaded: LoadedSpec, variables: dict[str, Any]) -> BpmnWorkflow:
    """A fresh workflow whose start task carries the execution's variables."""
    workflow = BpmnWorkflow(loaded.spec, loaded.subprocess_specs, script_engine=_SCRIPT_ENGINE)
    workflow.get_next_task(spec_name="Start").set_data(**variables)
    return workflow


def _finished(task: Task) -> bool:
    return task.has_state(TaskState.FINISHED_MASK)


def _prune_tree(workflow: Any) -> None:
    tasks: dict[UUID, Task] = workflow.tasks
    live_joins = {t.task_spec.name for t in tasks.values()
                  if isinstance(t.task_spec, Join) and not _finished(t)}

    def needed(task: Task) -> bool:
        return not _finished(task) or task.task_spec.name in live_joins

    keep: dict[UUID, bool] = {}
    for task in reversed(list(tasks.values())):  # children were created after their parents
        keep[task.id] = needed(task) or any(keep.get(c, False) for c in task._children)
    root = workflow.task_tree
    if not keep[root.id]:
        return  # nothing live: a completed workflow keeps its (small) final tree
    # Move the root down while it is finished history with one kept, finished child.
    while True:
        kept = [c for c in root.children if keep[c.id]]
        if needed(root) or len(kept) != 1 or not _finished(kept[0]) or needed(kept[0]):
            break
        root = kept[0]
    retained: dict[UUID, Task] = {}
    stack = [root]
    while stack:
        task = stack.pop()
        retained[task.id] = task
        task._children = [c for c in task._children if keep[c]]
        stack.extend(tasks[c] for c in task._children)
    if root is not workflow.task_tree:
        data = root.data
        root._parent = None
        root.data = data
        workflow.task_tree = root
    workflow.tasks = {tid: t for tid, t in tasks.items() if tid in retained}
    if workflow.last_task is not None and workflow.last_task.id not in retained:
        workflow.last_task = None


def prune(workflow: BpmnWorkflow) -> None:
    """Drop finished history from the workflow and its subprocesses (see module doc)."""
    _prune_tree(workflow)
    for sp in list(workflow.subprocesses.values()):
        _prune_tree(sp)
    alive = set(workflow.tasks)
    for sp in workflow.subprocesses.values():
        alive.update(sp.tasks)
    for task_id in [tid for tid in workflow.subprocesses if tid not in alive]:
        del workflow.subprocesses[task_id]


def _unstorable_variable(workflow: BpmnWorkflow) -> str | None:
    """Which variable makes the state unstorable (for the error message), if one does."""
    holders = [workflow, *workflow.subprocesses.values()]
    datas = [workflow.data] + [t.data for w in holders for t in w.tasks.values()]
    for data in datas:
        for name, value in data.items():
            try:
                check_storable(f"variable {name!r}", value)
            except Refused as exc:
                return str(exc)
    return None


def dump(workflow: BpmnWorkflow) -> dict[str, Any]:
    """The JSON-ready state to store: pruned, without the spec. Raises Unstorable."""
    prune(workflow)
    try:
        dumped: dict[str, Any] = _REGISTRY.convert(workflow)
        check_json(dumped, "the engine state")
    except (Unstorable, TypeError, ValueError, RecursionError) as exc:
        raise Unstorable(_unstorable_variable(workflow) or str(exc)) from None
    return dumped


def load(state: dict[str, Any], loaded: LoadedSpec) -> BpmnWorkflow:
    """Rebuild a workflow from `dump`'s output and the version's cached spec."""
    return _REGISTRY.restore(state, loaded=loaded)
