"""What a demo run did, read back from PostgreSQL (the record of truth).

Every figure is scoped to the run: its users are those whose e-mail ends with the
run's domain (`DemoStream.domain`), and its dead letters are those whose raw bytes
name that domain. So a summary is right on a database shared with other runs.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import ACTIVE_EXECUTION_STATUSES, LIFECYCLE_STAGES, ExecutionStatus, sql_list
from workers.reports.metrics import Conversion, held_out_sql
from workers.reports.splits import Split, split_conversions
from workers.sends.gateway import TIMEZONE_ATTRIBUTE
from workers.sends.policy import SendPolicy
from workers.sends.policy import load as load_policy
from workers.sends.windows import next_open, resolve_timezone

SEND_OUTCOMES = ("sent", "deferred", "suppressed", "capped", "held_out", "dropped")

# The run's users; every query below starts from it.
RUN_USERS = "SELECT id FROM users WHERE email LIKE :pattern"


def _params(domain: str) -> dict[str, Any]:
    escaped = domain.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return {"pattern": f"%@{escaped}"}


@dataclass(frozen=True)
class TriggerFigures:
    name: str
    event_type: str
    workflow: str | None
    evaluated: int
    matched: int
    started: int


@dataclass
class WorkflowFigures:
    name: str
    statuses: dict[str, int] = field(default_factory=dict)  # status -> executions
    outcomes: dict[str, int] = field(default_factory=dict)  # end node of completed ones
    failures: dict[str, int] = field(default_factory=dict)  # error message -> executions

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


@dataclass(frozen=True)
class SendFigures:
    """The send gateway's decisions for the run's users (table `sends`)."""

    by_workflow: dict[str, dict[str, int]]  # workflow -> outcome -> sends (latest decision)
    deferred: int  # sends put off to the window at least once
    deferred_sent: int  # ... that then went out
    deferred_sent_in_window: int  # ... at an instant the user's window was open
    first_release: str | None  # when the first deferred send went out (UTC, ISO)

    @property
    def by_outcome(self) -> dict[str, int]:
        out = dict.fromkeys(SEND_OUTCOMES, 0)
        for counts in self.by_workflow.values():
            for outcome, n in counts.items():
                out[outcome] = out.get(outcome, 0) + n
        return out


@dataclass
class Summary:
    domain: str
    users: int
    stages: dict[str, int]  # users now in each stage (AARRR order)
    events: int  # audit rows of the run's users (producer events and workflow events)
    events_by_type: dict[str, int]
    stage_moves: int  # user_lifecycle_history rows
    triggers: list[TriggerFigures]
    workflows: list[WorkflowFigures]
    messages: int  # message_log rows (the default channel)
    messages_by_template: dict[tuple[str, str], int]  # (channel, template) -> messages
    dead_letters: int
    dead_letter_reasons: list[str]
    waiting_timers: int  # executions still active on a timer
    waiting_messages: int  # ... on a message
    in_flight: int  # ... with a step or operator call on its way
    sends: SendFigures
    conversions: list[Conversion]  # per workflow with a goal: treated vs held out
    splits: list[Split]  # A/B splits of the last day: branches and their goal conversion
    early_projects: int  # users whose first project came before the nudge began waiting
    needless_nudges: int  # nudges sent though the wait should have caught the project
    late_nudges: int  # nudges deferred to the send window, the project created meanwhile
    segment_moves: dict[tuple[str, str], int]  # (segment, entered|exited) -> transitions
    early_exits: dict[tuple[str, str], int]  # (workflow, goal|exited) -> executions ended early
    scheduled: dict[tuple[str, str], int]  # (schedule, workflow) -> executions its runs started

    @property
    def reached(self) -> dict[str, int]:
        """The AARRR funnel: users in each stage or a later one."""
        out, running = {}, 0
        for stage in reversed(LIFECYCLE_STAGES):
            running += self.stages.get(stage, 0)
            out[stage] = running
        return {stage: out[stage] for stage in LIFECYCLE_STAGES}

    @property
    def evaluated(self) -> int:
        return sum(t.evaluated for t in self.triggers)

    @property
    def matched(self) -> int:
        return sum(t.matched for t in self.triggers)

    @property
    def executions(self) -> dict[str, int]:
        out = {status.value: 0 for status in ExecutionStatus}
        for wf in self.workflows:
            for status, count in wf.statuses.items():
                out[status] = out.get(status, 0) + count
        return out


def progress(session: Session, domain: str) -> dict[str, int]:
    """Cheap figures for a progress line: active executions by what they wait for.

    An event of the run's users still in the outbox counts as in flight (and active):
    the execution it starts does not exist yet.
    """
    row = session.execute(text(
        f"SELECT count(*) FILTER (WHERE step_enqueued_at IS NOT NULL) AS in_flight, "
        f"count(*) FILTER (WHERE step_enqueued_at IS NULL AND wake_at IS NOT NULL) AS timers, "
        f"count(*) FILTER (WHERE step_enqueued_at IS NULL AND wake_at IS NULL "
        f"                 AND awaiting_events IS NOT NULL) AS messages, "
        f"count(*) AS active "
        f"FROM workflow_executions WHERE status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)}) "
        f"AND user_id IN ({RUN_USERS})"), _params(domain)).one()
    # Segment entries and exits of the run's users not yet relayed: executions to come.
    outbox = session.execute(text(
        "SELECT count(*) FROM event_outbox WHERE status = 'PENDING' AND partition_key IN "
        "(SELECT CAST(id AS text) FROM users WHERE email LIKE :pattern)"),
        _params(domain)).scalar_one()
    done = session.execute(text(
        f"SELECT count(*) FROM workflow_executions "
        f"WHERE status NOT IN ({sql_list(ACTIVE_EXECUTION_STATUSES)}) "
        f"AND user_id IN ({RUN_USERS})"), _params(domain)).scalar_one()
    return {"in_flight": row.in_flight + outbox, "timers": row.timers,
            "messages": row.messages, "active": row.active + outbox, "finished": done}


def summarize(session: Session, domain: str) -> Summary:
    """Every figure of the run, in one read-only pass."""
    p = _params(domain)
    stages = dict.fromkeys(LIFECYCLE_STAGES, 0)
    for stage, count in session.execute(text(
            "SELECT current_lifecycle_stage, count(*) FROM users WHERE email LIKE :pattern "
            "GROUP BY 1"), p).all():
        stages[stage] = count
    events_by_type: dict[str, int] = dict(session.execute(text(
        f"SELECT event_type, count(*) FROM lifecycle_events WHERE user_id IN ({RUN_USERS}) "
        f"GROUP BY 1 ORDER BY 2 DESC, 1"), p).all())
    stage_moves = session.execute(text(
        f"SELECT count(*) FROM user_lifecycle_history WHERE user_id IN ({RUN_USERS})"),
        p).scalar_one()
    triggers = [TriggerFigures(r.name, r.event_type, r.workflow, r.evaluated, r.matched, r.started)
                for r in session.execute(text(
                    f"SELECT t.name, t.event_type, w.name AS workflow, "
                    f"coalesce(x.evaluated, 0) AS evaluated, coalesce(x.matched, 0) AS matched, "
                    f"coalesce(x.started, 0) AS started FROM triggers t "
                    f"LEFT JOIN workflows w ON w.id = t.workflow_id "
                    f"JOIN (SELECT trigger_id, count(*) AS evaluated, "
                    f"      count(*) FILTER (WHERE condition_met) AS matched, "
                    f"      count(workflow_execution_id) AS started "
                    f"      FROM trigger_executions WHERE user_id IN ({RUN_USERS}) "
                    f"      GROUP BY trigger_id) x ON x.trigger_id = t.id "
                    f"ORDER BY t.created_at, t.name"), p)]
    workflows: dict[str, WorkflowFigures] = {}
    for r in session.execute(text(
            f"SELECT w.name, e.status, e.current_node_id, e.error_message, count(*) AS n, "
            f"min(e.started_at) AS first FROM workflow_executions e "
            f"JOIN workflows w ON w.id = e.workflow_id WHERE e.user_id IN ({RUN_USERS}) "
            f"GROUP BY 1, 2, 3, 4 ORDER BY 6"), p):
        wf = workflows.setdefault(r.name, WorkflowFigures(r.name))
        wf.statuses[r.status] = wf.statuses.get(r.status, 0) + r.n
        if r.status == "completed":
            wf.outcomes[r.current_node_id] = wf.outcomes.get(r.current_node_id, 0) + r.n
        elif r.status == "failed":
            reason = (r.error_message or "unknown")[:200]
            wf.failures[reason] = wf.failures.get(reason, 0) + r.n
    messages_by_template: dict[tuple[str, str], int] = defaultdict(int)
    for r in session.execute(text(
            f"SELECT channel, coalesce(template, '-') AS template, count(*) AS n FROM message_log "
            f"WHERE user_id IN ({RUN_USERS}) GROUP BY 1, 2 ORDER BY 3 DESC, 2"), p):
        messages_by_template[(r.channel, r.template)] = r.n
    needle = {"needle": domain.encode()}
    dead = session.execute(text(
        "SELECT reason FROM dead_letters WHERE position(:needle IN raw_payload) > 0 "
        "ORDER BY id"), needle).scalars().all()
    waits = progress(session, domain)
    policy = load_policy(session)
    early, needless, late = _nudges(session, p)
    exits = {(r.name, r.outcome): r.n for r in session.execute(text(
        f"SELECT w.name, e.outcome, count(*) AS n FROM workflow_executions e "
        f"JOIN workflows w ON w.id = e.workflow_id WHERE e.outcome IS NOT NULL "
        f"AND e.user_id IN ({RUN_USERS}) GROUP BY 1, 2 ORDER BY 1, 2"), p)}
    scheduled = {(r.schedule, r.name): r.n for r in session.execute(text(
        f"SELECT e.variables->'schedule'->>'name' AS schedule, w.name, count(*) AS n "
        f"FROM workflow_executions e JOIN workflows w ON w.id = e.workflow_id "
        f"WHERE e.start_key IS NOT NULL AND e.variables ? 'schedule' "
        f"AND e.user_id IN ({RUN_USERS}) GROUP BY 1, 2 ORDER BY 1, 2"), p)}
    moves = {(r.segment, r.kind): r.n for r in session.execute(text(
        f"SELECT event_data->>'segment' AS segment, split_part(event_type, '.', 2) AS kind, "
        f"count(*) AS n FROM lifecycle_events WHERE user_id IN ({RUN_USERS}) "
        f"AND event_type IN ('segment.entered', 'segment.exited') GROUP BY 1, 2 ORDER BY 1, 2"),
        p)}
    return Summary(
        domain=domain, users=sum(stages.values()), stages=stages,
        events=sum(events_by_type.values()), events_by_type=events_by_type,
        stage_moves=stage_moves, triggers=triggers, workflows=list(workflows.values()),
        messages=sum(messages_by_template.values()),
        messages_by_template=dict(messages_by_template),
        dead_letters=len(dead), dead_letter_reasons=list(dead),
        waiting_timers=waits["timers"], waiting_messages=waits["messages"],
        in_flight=waits["in_flight"],
        sends=_sends(session, p, policy), conversions=_conversions(session, p, policy),
        splits=split_conversions(session, dt.datetime.now(dt.UTC) - dt.timedelta(days=1)),
        early_projects=early, needless_nudges=needless, late_nudges=late, segment_moves=moves,
        early_exits=exits, scheduled=scheduled,
    )


NUDGE_WORKFLOW, NUDGE_FOR, NUDGE_TIMEOUT = "activation-nudge", "project.created", "no_project_yet"


def _nudges(session: Session, p: dict[str, Any]) -> tuple[int, int, int]:
    """The look-back wait's proof, from the activation nudge's executions: (users whose
    first project was recorded before the execution began; nudges sent though the project
    was recorded before the wait timed out, i.e. the wait missed it; nudges sent though
    the project came after the timeout, while the nudge waited for the send window)."""
    row = session.execute(text(
        f"WITH nudge AS (SELECT e.id, e.user_id, e.started_at, "
        f"    (SELECT min(s.started_at) FROM execution_steps s WHERE s.execution_id = e.id "
        f"     AND s.node_id = :timeout) AS timed_out FROM workflow_executions e "
        f"  JOIN workflows w ON w.id = e.workflow_id WHERE w.name = :nudge "
        f"  AND e.user_id IN ({RUN_USERS})), "
        f"first_project AS (SELECT user_id, min(created_at) AS at FROM lifecycle_events "
        f"  WHERE event_type = :for AND user_id IN (SELECT user_id FROM nudge) GROUP BY 1), "
        f"sent AS (SELECT n.timed_out, f.at FROM message_log m "
        f"  JOIN nudge n ON n.id = m.execution_id "
        f"  JOIN first_project f ON f.user_id = n.user_id WHERE f.at < m.sent_at) "
        f"SELECT (SELECT count(*) FROM nudge n JOIN first_project f USING (user_id) "
        f"        WHERE f.at <= n.started_at) AS early, "
        f"  (SELECT count(*) FROM sent WHERE timed_out IS NULL OR at < timed_out) AS missed, "
        f"  (SELECT count(*) FROM sent WHERE at >= timed_out) AS late"),
        {**p, "nudge": NUDGE_WORKFLOW, "for": NUDGE_FOR, "timeout": NUDGE_TIMEOUT}).one()
    return int(row.early), int(row.missed), int(row.late)


def _sends(session: Session, p: dict[str, Any], policy: SendPolicy) -> SendFigures:
    by_workflow: dict[str, dict[str, int]] = {}
    for r in session.execute(text(
            f"SELECT w.name, s.outcome, count(*) AS n FROM sends s JOIN workflows w "
            f"ON w.id = s.workflow_id WHERE s.user_id IN ({RUN_USERS}) GROUP BY 1, 2 "
            f"ORDER BY 1"), p):
        by_workflow.setdefault(r.name, dict.fromkeys(SEND_OUTCOMES, 0))[r.outcome] = r.n
    released = session.execute(text(
        f"SELECT s.outcome, s.sent_at, u.attributes->>'{TIMEZONE_ATTRIBUTE}' AS zone "
        f"FROM sends s JOIN users u ON u.id = s.user_id "
        f"WHERE s.deferrals > 0 AND s.user_id IN ({RUN_USERS})"), p).all()
    sent = [r for r in released if r.outcome == "sent"]
    window = policy.messaging.send_window
    inside = sum(1 for r in sent if window is None or next_open(
        r.sent_at, resolve_timezone(r.zone, policy.messaging.zone)[0], window.window) is None)
    first = min((r.sent_at for r in sent), default=None)
    return SendFigures(by_workflow, len(released), len(sent), inside,
                       first.isoformat(timespec="seconds") if first else None)


def _conversions(session: Session, p: dict[str, Any], policy: SendPolicy) -> list[Conversion]:
    """Goal conversion of the run's executions, split by the gateway's holdout rule."""
    goals = [w.id for w in policy.workflows.values() if w.settings.goal is not None]
    if not goals:
        return []
    held_out, params = held_out_sql(policy)
    figures: dict[str, dict[bool, tuple[int, int]]] = {}
    for r in session.execute(text(
            f"SELECT w.name, ({held_out}) AS held_out, count(*) AS n, "
            f"count(g.execution_id) AS converted FROM workflow_executions x "
            f"JOIN workflows w ON w.id = x.workflow_id "
            f"LEFT JOIN execution_goals g ON g.execution_id = x.id "
            f"WHERE x.user_id IN ({RUN_USERS}) AND x.workflow_id = ANY(:goal_workflows) "
            f"GROUP BY 1, 2 ORDER BY 1"), {**p, **params, "goal_workflows": goals}):
        figures.setdefault(r.name, {})[bool(r.held_out)] = (r.n, r.converted)
    return [Conversion(name, *groups.get(False, (0, 0)), *groups.get(True, (0, 0)))
            for name, groups in figures.items()]
