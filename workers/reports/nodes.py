"""Per-node analytics of one workflow version: who reached, finished, failed or waits at each node.

`fleet workflow report` prints it; `workers/reports/diagram.py` draws it on the BPMN.
The executions counted are those of one workflow version (default: the workflow's
current one, which new executions take), started within the period (`--days`).

What the engine records, and so what each figure means (workers/engine/):

* **History rows.** Every drawn node a step runs writes one `execution_steps` row
  (`executions.advance`), `seq` gap-free per execution. `completed`: the node ran. A
  service task's first step writes `waiting` (its operator call is in flight, or a send
  was deferred to the user's window) and a later step `completed`. `failed`: the node
  raised (`stepper._node_failed`). Rows that mark something else carry the execution's
  *current* node id, not a node that ran, and are left out of reaching, visits and
  edges: `stalled` (node type `Stalled`), `cancelled` (`Cancel`), the reaper's
  `retrying` re-sends (`Reaper`), and failures that are not a node's own (node types
  `Reaper`, `Budget`, `Load`, `Save`: MARKER_NODE_TYPES).
* **Waits leave no row.** A timer or message catch event, a receive task or an
  event-based gateway writes its row only when it fires; a user or manual task when
  someone completes it. Where an active (`pending`/`running`) execution waits *now* is
  read from the execution: its `awaiting_tasks` (human steps), the drawn tasks in
  state WAITING in its stored engine state (what `runner.waits` reads: catch events,
  receive tasks, event gateways, in subprocesses too; boundary events are left out,
  since they wait with the activity they are attached to, which is counted), and a
  service task whose latest row is `waiting`. A paused execution still waits where it
  is; a stalled one is counted as `stalled` at its current node instead.

Per node, counting executions (not rows: a loop counts an execution once):

* `reached`: a history row at the node, or waiting there now;
* `completed`: its latest visit ended with `completed`;
* `failed`: the execution is `failed` and its last history row, a failure, names the
  node (a marker failure names the node the execution was last at);
* `waiting`: an active execution waiting there now (see above); `stalled`: a stalled
  execution whose current node it is; `exited`: an execution that left the journey
  there (a goal exit or `exit_when`: its `Exit` row names the node it was at);
* `median_seconds`: over visits that ended (completed or failed), the time from the
  step that ran the node before to the step that ended the visit: the time a timer,
  a message, a person or an operator call took, or the queue's latency for nodes
  that run at once. Rows' `started_at` (the step's clock) are used, so a visit is
  measured on one clock; an execution's first visit starts at its own first row (a
  start event takes no time). A visit is a run of consecutive rows at one node (a
  service task's `waiting` then `completed`; a failure, a retry and the completion).

Edges: executions that went from X to Y, from consecutive visits in `seq` order, plus
an active execution's last visited node to the node it waits at now (a timer has no
row until it fires). Under a parallel gateway the branches' rows interleave, so an
edge between two branches can appear that no sequence flow draws (`drawn` false);
likewise into an embedded subprocess's inner start and out of its inner end.

Outcomes: executions by status (plus `paused` and `stalled`, and the completed ones
that ended by a goal exit or by `exit_when`: `goal_exits`, `condition_exits`). Goal conversion of
treated vs held-out users, when the workflow has a goal: `execution_goals` rows of
these executions, the holdout rule in SQL (`metrics.held_out_sql`, the gateway's),
the lift with Newcombe's interval (`lift.py`).
"""

from __future__ import annotations

import datetime as dt
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import (
    ACTIVE_EXECUTION_STATUSES,
    ExecutionStatus,
    ExitReason,
    StepOutcome,
    WorkflowVersion,
    sql_list,
)
from workers.engine.executions import EXIT_NODE_TYPE, STALL_NODE_TYPE
from workers.engine.timers import REAPER_NODE_TYPE
from workers.reports.metrics import Conversion, held_out_sql
from workers.sends.policy import load

# execution_steps.node_type of rows that name the execution's current node, not a node
# that ran (see the module docstring): workers/engine/{executions,timers,stepper}.py.
MARKER_NODE_TYPES = (STALL_NODE_TYPE, "Cancel", REAPER_NODE_TYPE, "Budget", "Load", "Save")
ENGINE_STATE_FORMAT = 1  # workers/engine/state.py FORMAT: the layout the waits are read from
WAITING_TASK_STATE = 8  # SpiffWorkflow's TaskState.WAITING, as stored in the engine state
_NODE_OUTCOMES = (StepOutcome.COMPLETED, StepOutcome.WAITING, StepOutcome.FAILED)

BPMN_NS = "http://www.omg.org/spec/BPMN/20100524/MODEL"
BPMNDI_NS = "http://www.omg.org/spec/BPMN/20100524/DI"
DC_NS = "http://www.omg.org/spec/DD/20100524/DC"
DI_NS = "http://www.omg.org/spec/DD/20100524/DI"
FLOW_NODES = frozenset({
    "startEvent", "endEvent", "intermediateCatchEvent", "intermediateThrowEvent",
    "boundaryEvent", "task", "userTask", "manualTask", "scriptTask", "serviceTask",
    "sendTask", "receiveTask", "businessRuleTask", "callActivity", "subProcess",
    "transaction", "exclusiveGateway", "parallelGateway", "inclusiveGateway",
    "eventBasedGateway", "complexGateway"})


class ReportError(LookupError):
    """No such workflow or version."""


# --------------------------------------------------------------------------- the BPMN graph


@dataclass(frozen=True)
class Bounds:
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Node:
    """A drawn flow node of the version's BPMN."""

    id: str
    name: str | None
    kind: str  # the element's tag: userTask, exclusiveGateway, ...
    process: str
    parent: str | None = None  # the embedded subprocess it is inside
    attached_to: str | None = None  # a boundary event's activity
    bounds: Bounds | None = None  # BPMNDI shape, when the file has one

    @property
    def label(self) -> str:
        return self.name or self.id


@dataclass(frozen=True)
class Flow:
    id: str
    source: str
    target: str
    waypoints: tuple[tuple[float, float], ...] = ()  # BPMNDI edge, when the file has one


@dataclass(frozen=True)
class Graph:
    """The nodes (document order, main file first) and sequence flows of a version's files."""

    process_id: str | None
    nodes: Mapping[str, Node]
    flows: tuple[Flow, ...]

    @property
    def has_di(self) -> bool:
        return any(n.bounds is not None for n in self.nodes.values())


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def parse_graph(xml: str, others: Mapping[str, str] | None = None,
                process_id: str | None = None) -> Graph:
    """Flow nodes, sequence flows and BPMNDI coordinates of the main file and the called files.

    Read with the standard library: the files were validated at deploy, and a report
    needs only ids, names, flows and coordinates. DI is read from the main file only.
    """
    nodes: dict[str, Node] = {}
    flows: list[Flow] = []
    shapes: dict[str, Bounds] = {}
    edges: dict[str, tuple[tuple[float, float], ...]] = {}
    for index, source in enumerate([xml, *(others or {}).values()]):
        root = ET.fromstring(source.encode())
        for process in root.iter(f"{{{BPMN_NS}}}process"):
            _collect(process, process.get("id", ""), None, nodes, flows)
        if index:
            continue
        for shape in root.iter(f"{{{BPMNDI_NS}}}BPMNShape"):
            bounds = shape.find(f"{{{DC_NS}}}Bounds")
            if bounds is not None and shape.get("bpmnElement"):
                shapes[shape.get("bpmnElement", "")] = Bounds(
                    *(float(bounds.get(k, 0)) for k in ("x", "y", "width", "height")))
        for edge in root.iter(f"{{{BPMNDI_NS}}}BPMNEdge"):
            points = tuple((float(p.get("x", 0)), float(p.get("y", 0)))
                           for p in edge.iter(f"{{{DI_NS}}}waypoint"))
            if edge.get("bpmnElement") and points:
                edges[edge.get("bpmnElement", "")] = points
    placed = {k: Node(n.id, n.name, n.kind, n.process, n.parent, n.attached_to, shapes.get(k))
              for k, n in nodes.items()}
    return Graph(process_id, placed,
                 tuple(Flow(f.id, f.source, f.target, edges.get(f.id, ())) for f in flows))


def _collect(container: ET.Element, process: str, parent: str | None,
             nodes: dict[str, Node], flows: list[Flow]) -> None:
    for child in container:
        kind = _local(child.tag)
        if kind == "sequenceFlow":
            flows.append(Flow(child.get("id", ""), child.get("sourceRef", ""),
                              child.get("targetRef", "")))
        elif kind in FLOW_NODES and child.get("id"):
            node_id = child.get("id", "")
            nodes.setdefault(node_id, Node(node_id, child.get("name") or None, kind, process,
                                           parent, child.get("attachedToRef")))
            if kind in ("subProcess", "transaction"):
                _collect(child, process, node_id, nodes, flows)


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class NodeStats:
    node_id: str
    name: str | None
    kind: str
    reached: int
    completed: int
    failed: int
    waiting: int
    stalled: int
    exited: int  # executions that left the journey here (a goal exit or exit_when)
    visits: int  # node visits of these executions (a loop visits a node more than once)
    median_seconds: float | None  # of the visits that ended (completed or failed)


@dataclass(frozen=True)
class EdgeStats:
    source: str
    target: str
    executions: int
    drawn: bool  # a sequence flow goes from source to target
    share: float | None  # of the executions that reached the source; None when none did

    @property
    def drop_off(self) -> float | None:
        """The share of the source's executions that did not take this edge."""
        return None if self.share is None else 1 - self.share


@dataclass(frozen=True)
class WorkflowReport:
    workflow: str
    workflow_id: uuid.UUID
    version: str
    current_version: str
    days: int | None
    since: dt.datetime | None
    generated_at: dt.datetime
    executions: int
    outcomes: Mapping[str, int]  # every status, then paused, stalled, goal and condition exits
    nodes: tuple[NodeStats, ...]
    edges: tuple[EdgeStats, ...]
    goal: str | None  # the goal's event type, when the workflow has one
    conversion: Conversion | None
    graph: Graph = field(repr=False)

    def node(self, node_id: str) -> NodeStats:
        return next(n for n in self.nodes if n.node_id == node_id)

    def edge(self, source: str, target: str) -> EdgeStats | None:
        return next((e for e in self.edges if (e.source, e.target) == (source, target)), None)

    def to_json(self) -> dict[str, Any]:
        """The `--json` document (ids as strings, times ISO 8601, rates as fractions)."""
        conversion = self.conversion.to_json() if self.conversion is not None else None
        return {
            "workflow": self.workflow, "workflow_id": str(self.workflow_id),
            "version": self.version, "current_version": self.current_version,
            "days": self.days, "since": self.since.isoformat() if self.since else None,
            "generated_at": self.generated_at.isoformat(), "executions": self.executions,
            "outcomes": dict(self.outcomes),
            "nodes": [{"node_id": n.node_id, "name": n.name, "kind": n.kind,
                       "reached": n.reached, "completed": n.completed, "failed": n.failed,
                       "waiting": n.waiting, "stalled": n.stalled, "exited": n.exited,
                       "visits": n.visits,
                       "median_seconds": n.median_seconds} for n in self.nodes],
            "edges": [{"source": e.source, "target": e.target, "executions": e.executions,
                       "drawn": e.drawn, "share": e.share, "drop_off": e.drop_off}
                      for e in self.edges],
            "goal": self.goal, "conversion": conversion}


# The executions in scope: one workflow version, started in the period.
_SCOPE = """
x AS (
    SELECT id, user_id, workflow_id, status, outcome, started_at, paused_at, stalled_at,
           current_node_id, awaiting_tasks, engine_state
      FROM workflow_executions
     WHERE workflow_id = :workflow AND workflow_version = :version
       AND started_at >= CAST(:since AS timestamptz)
)"""

# Node rows (see the module docstring), their visits (runs of consecutive rows at one
# node: `visit` numbers them per execution) and where each visit came from.
_VISITS = f"""
node_rows AS (
    SELECT s.execution_id, s.seq, s.node_id, s.outcome, s.started_at,
           lag(s.node_id) OVER w AS prev_node, lag(s.started_at) OVER w AS prev_at
      FROM execution_steps s JOIN x ON x.id = s.execution_id
     WHERE s.outcome IN ({sql_list(_NODE_OUTCOMES)})
       AND s.node_type NOT IN ({", ".join(f"'{t}'" for t in MARKER_NODE_TYPES)})
    WINDOW w AS (PARTITION BY s.execution_id ORDER BY s.seq)
),
numbered AS (
    SELECT r.*, sum(CASE WHEN r.prev_node IS DISTINCT FROM r.node_id THEN 1 ELSE 0 END)
               OVER (PARTITION BY r.execution_id ORDER BY r.seq) AS visit
      FROM node_rows r
),
visits AS (
    SELECT n.execution_id, n.visit, min(n.node_id) AS node_id,
           min(n.prev_node) FILTER (WHERE n.prev_node IS DISTINCT FROM n.node_id) AS source,
           coalesce(min(n.prev_at) FILTER (WHERE n.prev_node IS DISTINCT FROM n.node_id),
                    min(n.started_at)) AS arrived,
           max(n.started_at) AS ended,
           (array_agg(n.outcome ORDER BY n.seq DESC))[1] AS last_outcome,
           max(n.seq) AS last_seq
      FROM numbered n
     GROUP BY n.execution_id, n.visit
),
last_visit AS (
    SELECT DISTINCT ON (execution_id) execution_id, node_id FROM visits
     ORDER BY execution_id, visit DESC
),
-- Where active executions wait now: human tasks, WAITING engine tasks (drawn,
-- non-boundary nodes only: :waitable), service tasks whose latest row is `waiting`.
spots AS (
    SELECT x.id AS execution_id, t.node_id
      FROM x CROSS JOIN LATERAL unnest(x.awaiting_tasks) AS t(node_id)
     WHERE x.status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)}) AND x.stalled_at IS NULL
  UNION
    SELECT x.id, t.value->>'task_spec'
      FROM x CROSS JOIN LATERAL (
            SELECT value FROM jsonb_each(x.engine_state->'tasks')
          UNION ALL
            SELECT st.value FROM jsonb_each(coalesce(x.engine_state->'subprocesses', '{{}}'))
                   AS sp CROSS JOIN LATERAL jsonb_each(sp.value->'tasks') AS st
           ) t
     WHERE x.status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)}) AND x.stalled_at IS NULL
       AND x.engine_state->>'format' = '{ENGINE_STATE_FORMAT}'
       AND t.value->>'state' = '{WAITING_TASK_STATE}'
       AND t.value->>'task_spec' = ANY(CAST(:waitable AS text[]))
  UNION
    SELECT v.execution_id, v.node_id
      FROM (SELECT DISTINCT ON (execution_id, node_id) execution_id, node_id, last_outcome
              FROM visits ORDER BY execution_id, node_id, visit DESC) v
      JOIN x ON x.id = v.execution_id
     WHERE v.last_outcome = '{StepOutcome.WAITING}' AND x.stalled_at IS NULL
       AND x.status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)})
),
-- Visits and the waits that have no row yet, as one set: what reaching and edges count.
arrivals AS (
    SELECT execution_id, node_id, source FROM visits
  UNION ALL
    SELECT p.execution_id, p.node_id, l.node_id
      FROM spots p LEFT JOIN last_visit l ON l.execution_id = p.execution_id
     WHERE l.node_id IS DISTINCT FROM p.node_id
)"""

_NODES_SQL = f"""
WITH {_SCOPE}, {_VISITS},
per_node AS (
    SELECT node_id, count(*) AS visits,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY greatest(
               extract(epoch FROM ended - arrived), 0)) FILTER (
               WHERE last_outcome IN ('{StepOutcome.COMPLETED}', '{StepOutcome.FAILED}'))
               AS median_seconds
      FROM visits GROUP BY node_id
),
completed AS (
    SELECT node_id, count(*) AS n FROM (
        SELECT DISTINCT ON (execution_id, node_id) node_id, last_outcome FROM visits
         ORDER BY execution_id, node_id, visit DESC) v
     WHERE last_outcome = '{StepOutcome.COMPLETED}' GROUP BY node_id
),
reached AS (SELECT node_id, count(DISTINCT execution_id) AS n FROM arrivals GROUP BY node_id),
waiting AS (SELECT node_id, count(DISTINCT execution_id) AS n FROM spots GROUP BY node_id),
failed AS (
    SELECT last.node_id, count(*) AS n FROM x
      CROSS JOIN LATERAL (SELECT node_id, outcome FROM execution_steps
                           WHERE execution_id = x.id ORDER BY seq DESC LIMIT 1) last
     WHERE x.status = '{ExecutionStatus.FAILED}' AND last.outcome = '{StepOutcome.FAILED}'
     GROUP BY last.node_id
),
stalled AS (
    SELECT current_node_id AS node_id, count(*) AS n FROM x
     WHERE x.stalled_at IS NOT NULL AND x.status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)})
     GROUP BY current_node_id
),
exited AS (
    SELECT s.node_id, count(DISTINCT s.execution_id) AS n FROM execution_steps s
      JOIN x ON x.id = s.execution_id
     WHERE s.node_type = '{EXIT_NODE_TYPE}' GROUP BY s.node_id
),
ids AS (SELECT node_id FROM reached UNION SELECT node_id FROM failed
        UNION SELECT node_id FROM stalled UNION SELECT node_id FROM exited)
SELECT ids.node_id, coalesce(reached.n, 0) AS reached, coalesce(completed.n, 0) AS completed,
       coalesce(failed.n, 0) AS failed, coalesce(waiting.n, 0) AS waiting,
       coalesce(stalled.n, 0) AS stalled, coalesce(exited.n, 0) AS exited,
       coalesce(per_node.visits, 0) AS visits, per_node.median_seconds
  FROM ids LEFT JOIN reached USING (node_id) LEFT JOIN completed USING (node_id)
  LEFT JOIN failed USING (node_id) LEFT JOIN waiting USING (node_id)
  LEFT JOIN stalled USING (node_id) LEFT JOIN exited USING (node_id)
  LEFT JOIN per_node USING (node_id)
"""

_EDGES_SQL = f"""
WITH {_SCOPE}, {_VISITS}
SELECT source, node_id AS target, count(DISTINCT execution_id) AS n FROM arrivals
 WHERE source IS NOT NULL GROUP BY source, node_id ORDER BY source, node_id
"""

_OUTCOMES_SQL = f"""
WITH {_SCOPE}
SELECT status, count(*) AS n, count(*) FILTER (WHERE paused_at IS NOT NULL) AS paused,
       count(*) FILTER (WHERE stalled_at IS NOT NULL) AS stalled,
       count(*) FILTER (WHERE outcome = '{ExitReason.GOAL}') AS goal_exits,
       count(*) FILTER (WHERE outcome = '{ExitReason.EXITED}') AS condition_exits
  FROM x GROUP BY status
"""

_CONVERSION_SQL = f"""
WITH {_SCOPE}
SELECT CASE WHEN {{held_out}} THEN 'held_out' ELSE 'treated' END AS grp,
       count(*) AS n, count(g.execution_id) AS converted
  FROM x LEFT JOIN execution_goals g ON g.execution_id = x.id GROUP BY 1
"""


def workflow_report(session: Session, name: str, version: str | None = None,
                    days: int | None = None, now: dt.datetime | None = None) -> WorkflowReport:
    """The per-node report of workflow `name` at `version` (default: its current one), of
    executions started in the last `days` days (None: all). Raises ReportError."""
    now = now or dt.datetime.now(dt.UTC)
    workflow = session.execute(text("SELECT id, name, version FROM workflows WHERE name = :n"),
                               {"n": name}).one_or_none()
    if workflow is None:
        raise ReportError(f"no workflow named {name!r}")
    wanted = version or workflow.version
    stored = session.get(WorkflowVersion, (workflow.id, wanted))
    if stored is None:
        known = session.execute(text(
            "SELECT version FROM workflow_versions WHERE workflow_id = :w ORDER BY created_at"),
            {"w": workflow.id}).scalars().all()
        raise ReportError(f"workflow {name} has no version {wanted!r} "
                          f"(deployed: {', '.join(known) or 'none'})")
    graph = parse_graph(stored.bpmn_xml, stored.extra_files, stored.process_id)
    since = now - dt.timedelta(days=days) if days is not None else None
    params: dict[str, Any] = {
        "workflow": workflow.id, "version": wanted,
        "since": since or dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
        "waitable": [n.id for n in graph.nodes.values() if n.kind != "boundaryEvent"]}

    found = {row.node_id: row for row in session.execute(text(_NODES_SQL), params)}
    nodes = [_node_stats(node_id, graph.nodes.get(node_id), found.get(node_id))
             for node_id in [*graph.nodes, *sorted(set(found) - set(graph.nodes))]]
    reached = {n.node_id: n.reached for n in nodes}
    drawn = {(f.source, f.target) for f in graph.flows}
    edges = [EdgeStats(row.source, row.target, row.n, (row.source, row.target) in drawn,
                       row.n / reached[row.source] if reached.get(row.source) else None)
             for row in session.execute(text(_EDGES_SQL), params)]

    outcomes: dict[str, int] = dict.fromkeys(ExecutionStatus, 0) | {
        "paused": 0, "stalled": 0, "goal_exits": 0, "condition_exits": 0}
    for row in session.execute(text(_OUTCOMES_SQL), params):
        outcomes[row.status] = row.n
        for key in ("paused", "stalled", "goal_exits", "condition_exits"):
            outcomes[key] += getattr(row, key)
    executions = sum(outcomes[s] for s in ExecutionStatus)

    policy = load(session)
    settings = policy.workflow(workflow.id)
    goal = settings.settings.goal if settings is not None else None
    conversion = None
    if goal is not None:
        held_out, holdout_params = held_out_sql(policy)
        groups = {row.grp: (row.n, row.converted) for row in session.execute(
            text(_CONVERSION_SQL.format(held_out=held_out)), {**params, **holdout_params})}
        conversion = Conversion(workflow.name, *groups.get("treated", (0, 0)),
                                *groups.get("held_out", (0, 0)))
    return WorkflowReport(workflow.name, workflow.id, wanted, workflow.version, days, since, now,
                          executions, outcomes, tuple(nodes), tuple(edges),
                          goal.event_type if goal else None, conversion, graph)


def _node_stats(node_id: str, node: Node | None, row: Any) -> NodeStats:
    figures = (row.reached, row.completed, row.failed, row.waiting, row.stalled, row.exited,
               row.visits, None if row.median_seconds is None else float(row.median_seconds)
               ) if row is not None else (0, 0, 0, 0, 0, 0, 0, None)
    return NodeStats(node_id, node.name if node else None, node.kind if node else "unknown",
                     *figures)


def workflow_names(session: Session) -> list[str]:
    """Every workflow's name, for callers that report on each (the demo's report)."""
    return list(session.execute(text("SELECT name FROM workflows ORDER BY name")).scalars())
