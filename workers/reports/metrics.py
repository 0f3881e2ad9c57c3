"""Nightly metrics: one day's figures upserted into `metrics_daily`, idempotently.

One statement computes every figure of a day from the audit tables, upserts it
(one row per date x stage x metric x dimensions) and deletes the rows of that date
it no longer produces. Running it twice leaves the same rows, ids included, so a
rerun or a backfill is always safe.

| metric | stage | dimensions |
|---|---|---|
| users_in_stage (at end of day) | the stage | {} |
| stage_entries (user_lifecycle_history, and new users into the stage they were created in), stage_exits | the stage | {} |
| events | the user's stage when recorded ('Unknown' without one) | {"event_type"} |
| triggers_evaluated, triggers_matched | All | {"trigger"} |
| executions_started, executions_completed, executions_failed | All | {"workflow"} |
| execution_median_seconds (completed that day) | All | {"workflow"} |
| conversion_7d, conversion_30d: share of users who entered the stage 7 (30) days before and reached the next stage within 7 (30) days | the stage | {"to"} |
| sends: send decisions by their (final) outcome, on the day decided | All | {"workflow", "channel", "outcome"} |
| goal_executions, goal_conversions: executions started that day of a workflow with a goal, and those of them that reached it (execution_goals) | All | {"workflow", "group"} |

`group` is `treated` or `held_out`, the send gateway's rule (`SendPolicy.held_out`)
written in SQL with the stored policy. The goal figures have a statement of their
own (GOALS): a conversion arrives up to the goal's window after the start, so
computing a day also refreshes each workflow's goal figures of every start day whose
window (that workflow's) was still open on it (`goal_days`), which keeps them current
without redoing whole days, and leaves a closed window's figures as they were.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from db import tenancy
from db.models import DEFAULT_WORKSPACE_ID, LIFECYCLE_STAGES, SEND_OUTCOMES, ExecutionStatus
from workers.reports.lift import Lift, lift
from workers.sends.holdout import holdout_sql
from workers.sends.policy import SendPolicy, load

_NEXT_STAGE = ", ".join(
    f"('{a}', '{b}')" for a, b in zip(LIFECYCLE_STAGES, LIFECYCLE_STAGES[1:], strict=False))

GOAL_METRICS = "('goal_executions', 'goal_conversions')"  # upserted by GOALS, not AGGREGATE

AGGREGATE = text(f"""
WITH day AS (SELECT CAST(:start AS timestamptz) AS s, CAST(:end AS timestamptz) AS e),
next_stage(stage, next) AS (VALUES {_NEXT_STAGE}),
computed(lifecycle_stage, metric_name, metric_value, dimensions) AS (
    SELECT stage, 'users_in_stage', count(*)::numeric, '{{}}'::jsonb FROM (
        SELECT coalesce(
            (SELECT h.to_stage FROM user_lifecycle_history h, day
              WHERE h.user_id = u.id AND h.transitioned_at < day.e
              ORDER BY h.transitioned_at DESC LIMIT 1),
            (SELECT h.from_stage FROM user_lifecycle_history h, day
              WHERE h.user_id = u.id AND h.transitioned_at >= day.e
              ORDER BY h.transitioned_at LIMIT 1),
            u.current_lifecycle_stage) AS stage
        FROM users u, day WHERE u.created_at < day.e
    ) at_end GROUP BY stage
  UNION ALL
    SELECT entries.stage, 'stage_entries', count(*), '{{}}' FROM (
        SELECT h.to_stage AS stage FROM user_lifecycle_history h, day
         WHERE h.transitioned_at >= day.s AND h.transitioned_at < day.e
      UNION ALL
        -- A new user enters the stage they were created in (no history row says so):
        -- the first move's from_stage, else the stage they are still in.
        SELECT CASE WHEN first_move.found THEN first_move.from_stage
                    ELSE u.current_lifecycle_stage END
          FROM users u CROSS JOIN day
          LEFT JOIN LATERAL (
            SELECT h.from_stage, true AS found FROM user_lifecycle_history h
             WHERE h.user_id = u.id ORDER BY h.transitioned_at LIMIT 1) first_move ON true
         WHERE u.created_at >= day.s AND u.created_at < day.e
    ) entries WHERE entries.stage IS NOT NULL GROUP BY entries.stage
  UNION ALL
    SELECT h.from_stage, 'stage_exits', count(*), '{{}}' FROM user_lifecycle_history h, day
     WHERE h.transitioned_at >= day.s AND h.transitioned_at < day.e AND h.from_stage IS NOT NULL
     GROUP BY h.from_stage
  UNION ALL
    SELECT coalesce(ev.lifecycle_stage, 'Unknown'), 'events', count(*),
           jsonb_build_object('event_type', ev.event_type)
      FROM lifecycle_events ev, day WHERE ev.created_at >= day.s AND ev.created_at < day.e
     GROUP BY 1, ev.event_type
  UNION ALL
    SELECT 'All', m.name, m.value, jsonb_build_object('trigger', t.name) FROM (
        SELECT te.trigger_id, count(*) AS evaluated, count(*) FILTER (WHERE te.condition_met) AS met
          FROM trigger_executions te, day
         WHERE te.executed_at >= day.s AND te.executed_at < day.e GROUP BY te.trigger_id
    ) c JOIN triggers t ON t.id = c.trigger_id,
    LATERAL (VALUES ('triggers_evaluated', c.evaluated::numeric),
                    ('triggers_matched', c.met::numeric)) AS m(name, value)
  UNION ALL
    SELECT 'All', 'executions_started', count(*), jsonb_build_object('workflow', w.name)
      FROM workflow_executions x JOIN workflows w ON w.id = x.workflow_id, day
     WHERE x.started_at >= day.s AND x.started_at < day.e GROUP BY w.name
  UNION ALL
    SELECT 'All', 'executions_' || x.status, count(*), jsonb_build_object('workflow', w.name)
      FROM workflow_executions x JOIN workflows w ON w.id = x.workflow_id, day
     WHERE x.status IN ('{ExecutionStatus.COMPLETED}', '{ExecutionStatus.FAILED}')
       AND x.completed_at >= day.s AND x.completed_at < day.e GROUP BY x.status, w.name
  UNION ALL
    SELECT 'All', 'execution_median_seconds',
           percentile_cont(0.5) WITHIN GROUP (
               ORDER BY extract(epoch FROM x.completed_at - x.started_at))::numeric,
           jsonb_build_object('workflow', w.name)
      FROM workflow_executions x JOIN workflows w ON w.id = x.workflow_id, day
     WHERE x.status = '{ExecutionStatus.COMPLETED}' AND x.completed_at >= day.s AND x.completed_at < day.e
     GROUP BY w.name
  UNION ALL
    SELECT 'All', 'sends', count(*),
           jsonb_build_object('workflow', w.name, 'channel', s.channel, 'outcome', s.outcome)
      FROM sends s JOIN workflows w ON w.id = s.workflow_id, day
     WHERE s.decided_at >= day.s AND s.decided_at < day.e GROUP BY w.name, s.channel, s.outcome
  UNION ALL
    SELECT cohort.to_stage, 'conversion_' || cohort.days || 'd',
           round(avg(CASE WHEN EXISTS (
               SELECT 1 FROM user_lifecycle_history later
                WHERE later.user_id = cohort.user_id AND later.to_stage = cohort.next
                  AND later.transitioned_at > cohort.transitioned_at
                  AND later.transitioned_at <= cohort.transitioned_at
                      + make_interval(days => cohort.days)) THEN 1 ELSE 0 END), 6),
           jsonb_build_object('to', cohort.next)
      FROM (
        SELECT h.user_id, h.to_stage, h.transitioned_at, n.next, w.days
          FROM (VALUES (7), (30)) AS w(days), day, user_lifecycle_history h
          JOIN next_stage n ON n.stage = h.to_stage
         WHERE h.transitioned_at >= day.s - make_interval(days => w.days)
           AND h.transitioned_at < day.e - make_interval(days => w.days)
      ) cohort
     GROUP BY cohort.to_stage, cohort.next, cohort.days
),
upserted AS (
    INSERT INTO metrics_daily (metric_date, lifecycle_stage, metric_name, metric_value, dimensions)
    SELECT CAST(:day AS date), lifecycle_stage, metric_name, metric_value, dimensions FROM computed
    ON CONFLICT (workspace_id, metric_date, lifecycle_stage, metric_name, dimensions)
    DO UPDATE SET metric_value = EXCLUDED.metric_value
    WHERE metrics_daily.metric_value IS DISTINCT FROM EXCLUDED.metric_value
    RETURNING 1
),
removed AS (
    DELETE FROM metrics_daily m
     WHERE m.metric_date = CAST(:day AS date) AND m.metric_name NOT IN {GOAL_METRICS}
       AND NOT EXISTS (
        SELECT 1 FROM computed c WHERE c.lifecycle_stage = m.lifecycle_stage
           AND c.metric_name = m.metric_name AND c.dimensions = m.dimensions)
    RETURNING 1
)
SELECT (SELECT count(*) FROM computed) AS rows,
       (SELECT count(*) FROM upserted) AS written,
       (SELECT count(*) FROM removed) AS removed
""")


# Executions of each workflow with a goal started from its first open day (:workflows,
# :since: the days its window still covers) to :end, by UTC start day and group;
# {held_out} is the gateway's rule in SQL. The delete spans the same days, workflow by
# workflow (the figures of a workflow that has no goal any more: from :first on).
GOALS = """
WITH open_days(workflow_id, name, since) AS (
    SELECT * FROM unnest(CAST(:workflows AS uuid[]), CAST(:names AS text[]),
                         CAST(:since AS timestamptz[]))
),
computed(metric_date, lifecycle_stage, metric_name, metric_value, dimensions) AS (
    SELECT c.day, 'All', m.name, m.value, jsonb_build_object('workflow', c.workflow, 'group', c.grp)
      FROM (
        SELECT CAST(timezone('UTC', x.started_at) AS date) AS day, o.name AS workflow,
               CASE WHEN {held_out} THEN 'held_out' ELSE 'treated' END AS grp,
               count(*) AS started, count(g.execution_id) AS converted
          FROM open_days o JOIN workflow_executions x ON x.workflow_id = o.workflow_id
           AND x.started_at >= o.since AND x.started_at < CAST(:end AS timestamptz)
          LEFT JOIN execution_goals g ON g.execution_id = x.id
         GROUP BY 1, 2, 3
      ) c,
      LATERAL (VALUES ('goal_executions', c.started::numeric),
                      ('goal_conversions', c.converted::numeric)) AS m(name, value)
),
upserted AS (
    INSERT INTO metrics_daily (metric_date, lifecycle_stage, metric_name, metric_value, dimensions)
    SELECT metric_date, lifecycle_stage, metric_name, metric_value, dimensions FROM computed
    ON CONFLICT (workspace_id, metric_date, lifecycle_stage, metric_name, dimensions)
    DO UPDATE SET metric_value = EXCLUDED.metric_value
    WHERE metrics_daily.metric_value IS DISTINCT FROM EXCLUDED.metric_value
    RETURNING 1
),
removed AS (
    DELETE FROM metrics_daily m
     WHERE m.metric_date >= CAST(:first AS date) AND m.metric_date <= CAST(:last AS date)
       AND m.metric_name IN {metrics}
       AND NOT EXISTS (  -- a day this workflow's window no longer covers: left as it is
        SELECT 1 FROM open_days o WHERE o.name = m.dimensions->>'workflow'
           AND m.metric_date < CAST(timezone('UTC', o.since) AS date))
       AND NOT EXISTS (
        SELECT 1 FROM computed c WHERE c.metric_date = m.metric_date
           AND c.lifecycle_stage = m.lifecycle_stage AND c.metric_name = m.metric_name
           AND c.dimensions = m.dimensions)
    RETURNING 1
)
SELECT (SELECT count(*) FROM computed) AS rows,
       (SELECT count(*) FROM upserted) AS written,
       (SELECT count(*) FROM removed) AS removed
"""

MAX_GOAL_DAYS = 366  # how far back a day's run refreshes goal figures, whatever the window


def held_out_sql(policy: SendPolicy) -> tuple[str, dict[str, Any]]:
    """`SendPolicy.held_out` as a boolean SQL expression over the execution `x` (its user
    and workflow), with its bind parameters: in the program's holdout, or in the
    workflow's own (a branch per workflow that has one)."""
    params: dict[str, Any] = {}
    terms: list[str] = []
    program = policy.messaging.holdout
    if program is not None:
        terms.append(holdout_sql("x.user_id", "program_salt", "program_percent"))
        params |= {"program_salt": program.salt, "program_percent": program.percent}
    branches: list[str] = []
    for i, workflow in enumerate(sorted(policy.workflows.values(), key=lambda w: str(w.id))):
        if workflow.settings.holdout > 0:
            branches.append(f"WHEN CAST(:wf_{i} AS uuid) THEN "
                            f"{holdout_sql('x.user_id', f'wf_salt_{i}', f'wf_percent_{i}')}")
            params |= {f"wf_{i}": workflow.id, f"wf_salt_{i}": policy.workflow_salt(workflow.name),
                       f"wf_percent_{i}": workflow.settings.holdout}
    if branches:
        terms.append(f"(CASE x.workflow_id {' '.join(branches)} ELSE false END)")
    return (" OR ".join(f"({t})" for t in terms) or "false"), params


def goal_days(policy: SendPolicy, day: dt.date) -> dict[uuid.UUID, dt.date]:
    """{workflow with a goal: its first start day whose window is still open on `day`}."""
    out = {}
    for workflow in policy.workflows.values():
        if workflow.settings.goal is not None:
            back = min(math.ceil(workflow.settings.goal.window / dt.timedelta(days=1)),
                       MAX_GOAL_DAYS)
            out[workflow.id] = day - dt.timedelta(days=back)
    return out


@dataclass(frozen=True)
class DayResult:
    day: dt.date
    rows: int  # figures the day has (and the goal figures of earlier start days it refreshed)
    written: int  # rows inserted or changed (0 on a rerun with unchanged data)
    removed: int  # rows of figures the day no longer has


def aggregate_day(session: Session, day: dt.date) -> DayResult:
    """Compute and upsert one UTC day's metrics, in the caller's transaction.

    The goal figures of the start days still open on `day` are refreshed with it.
    """
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    # A whole day of audit rows: more than the fleet's default statement timeout allows.
    session.execute(text("SET LOCAL statement_timeout = '30min'"))
    row = session.execute(AGGREGATE, {"day": day, "start": start,
                                      "end": start + dt.timedelta(days=1)}).one()
    goals = refresh_goals(session, load(session), day)
    return DayResult(day, row.rows + goals.rows, row.written + goals.written,
                     row.removed + goals.removed)


def refresh_goals(session: Session, policy: SendPolicy, day: dt.date) -> DayResult:
    """Upsert goal_executions/goal_conversions of each workflow's start days that
    `goal_days` gives (one statement), and remove those figures of these days that are
    gone (all of `day`'s when no workflow has a goal any more)."""
    firsts = goal_days(policy, day)
    first = min(firsts.values(), default=day)
    held_out, params = held_out_sql(policy)
    row = session.execute(text(GOALS.format(held_out=held_out, metrics=GOAL_METRICS)), {
        **params, "workflows": list(firsts),
        "names": [policy.workflows[w].name for w in firsts],
        "since": [dt.datetime.combine(d, dt.time(), dt.UTC) for d in firsts.values()],
        "end": dt.datetime.combine(day, dt.time(), dt.UTC) + dt.timedelta(days=1),
        "first": first, "last": day}).one()
    return DayResult(day, row.rows, row.written, row.removed)


CATCH_UP_DAYS = 31  # how far back a beat that was down catches up


def days_to_aggregate(session: Session, yesterday: dt.date) -> list[dt.date]:
    """Every day up to `yesterday` that the nightly job has not done, oldest first.

    The first run does only yesterday; after that, every day the beat missed
    (down overnight, down for a week) is done once, up to CATCH_UP_DAYS back.
    """
    last = session.execute(text("SELECT max(day) FROM maintenance_runs WHERE job = :j"),
                           {"j": _job()}).scalar()
    if last is None:
        return [yesterday]
    first = max(last + dt.timedelta(days=1), yesterday - dt.timedelta(days=CATCH_UP_DAYS - 1))
    return [first + dt.timedelta(days=i) for i in range((yesterday - first).days + 1)]


def record_day(session: Session, result: DayResult) -> None:
    session.execute(text(
        "INSERT INTO maintenance_runs (job, day, result) VALUES (:j, :d, CAST(:r AS jsonb)) "
        "ON CONFLICT (job, day) DO UPDATE SET finished_at = now(), result = EXCLUDED.result"),
        {"j": _job(), "d": result.day, "r": json.dumps({"rows": result.rows,
                                                    "written": result.written,
                                                    "removed": result.removed})})


JOB = "metrics_daily"


def _job() -> str:
    """The job's name in `maintenance_runs` (global) for the current workspace: each
    workspace's days are done on their own; the default's keeps the name it always had."""
    workspace_id = tenancy.current_workspace()
    return JOB if workspace_id == DEFAULT_WORKSPACE_ID else f"{JOB}:{workspace_id}"


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Conversion:
    """A workflow's goal conversion, treated vs held out, of the executions started in a period."""

    workflow: str
    treated: int
    treated_converted: int
    held_out: int
    held_out_converted: int

    @property
    def lift(self) -> Lift:
        """Treated minus held-out rate with its 95% CI (None figures while a group is empty)."""
        return lift(self.treated, self.treated_converted, self.held_out, self.held_out_converted)

    def to_json(self) -> dict[str, object]:
        """The `--json` form (`fleet metrics show`, `fleet workflow report`): rates as fractions."""
        lifted = self.lift
        return {"workflow": self.workflow,
                "treated": {"executions": self.treated, "converted": self.treated_converted,
                            "rate": lifted.treated_rate},
                "held_out": {"executions": self.held_out, "converted": self.held_out_converted,
                             "rate": lifted.control_rate},
                "lift": None if lifted.difference is None else {
                    "difference": lifted.difference, "low": lifted.low, "high": lifted.high,
                    "relative": lifted.relative, "interval": "newcombe-hybrid-score-95"}}


def conversions(session: Session, since: dt.date) -> list[Conversion]:
    """Each workflow's goal figures summed over the start days from `since`, by name."""
    totals: dict[str, dict[tuple[str, str], int]] = {}
    for row in session.execute(text(
            "SELECT dimensions->>'workflow' AS workflow, dimensions->>'group' AS grp, "
            "metric_name, sum(metric_value) AS total FROM metrics_daily "
            f"WHERE metric_date >= :since AND metric_name IN {GOAL_METRICS} "
            "GROUP BY 1, 2, 3"), {"since": since}):
        totals.setdefault(row.workflow, {})[(row.grp, row.metric_name)] = int(row.total)
    return [Conversion(workflow, *(t.get((group, metric), 0) for group in ("treated", "held_out")
                                   for metric in ("goal_executions", "goal_conversions")))
            for workflow, t in sorted(totals.items())]


def sends_by_outcome(session: Session, since: dt.date) -> dict[tuple[str, str], dict[str, int]]:
    """{(workflow, channel): {outcome: sends decided from `since`}}, every outcome present."""
    sends: dict[tuple[str, str], dict[str, int]] = {}
    for row in session.execute(text(
            "SELECT dimensions->>'workflow' AS workflow, dimensions->>'channel' AS channel, "
            "dimensions->>'outcome' AS outcome, sum(metric_value) AS total FROM metrics_daily "
            "WHERE metric_date >= :since AND metric_name = 'sends' GROUP BY 1, 2, 3 "
            "ORDER BY 1, 2"), {"since": since}):
        counts = sends.setdefault((row.workflow, row.channel), dict.fromkeys(SEND_OUTCOMES, 0))
        counts[row.outcome] = int(row.total)
    return sends
