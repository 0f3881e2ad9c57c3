"""Per-branch goal conversion of A/B splits: exposures, conversions and the lift of each
variant over the first (the declared baseline), from `split_exposures`.

Conversion means what it means in the nightly goal figures (workers/reports/metrics.py):
the exposed execution has an `execution_goals` row. That row is only written for a goal
event inside the workflow's window after the start (workers/events/goals.py), so the
window needs no second check here, and a branch's figures add up to the workflow's.
A workflow without a goal has exposures but no conversion figures (None, not 0%).

Read live (one grouped statement over the period's exposures, by their index), not
from `metrics_daily`: a split is watched while it runs. The period is the exposure's
time, so an execution counts in the period it reached the split.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from workers.reports.lift import Lift, lift

BRANCHES = text("""
SELECT w.name AS workflow, e.node_id, e.variant, min(e.position) AS position,
       count(*) AS exposures, count(g.execution_id) AS converted,
       coalesce(jsonb_typeof(w.settings->'goal') = 'object', false) AS has_goal
  FROM split_exposures e
  JOIN workflows w ON w.id = e.workflow_id
  LEFT JOIN execution_goals g ON g.execution_id = e.execution_id
 WHERE e.created_at >= CAST(:since AS timestamptz)
   AND (CAST(:workflow AS text) IS NULL OR w.name = CAST(:workflow AS text))
 GROUP BY w.name, w.settings, e.node_id, e.variant
 ORDER BY w.name, e.node_id, min(e.position), e.variant
""")


@dataclass(frozen=True)
class Branch:
    """One variant of a split: its exposures and, when the workflow has a goal, conversions."""

    variant: str
    exposures: int
    converted: int | None  # None: the workflow has no goal
    lift: Lift | None  # against the split's first variant; None for the first itself

    @property
    def rate(self) -> float | None:
        if self.converted is None or not self.exposures:
            return None
        return self.converted / self.exposures


@dataclass(frozen=True)
class Split:
    workflow: str
    node_id: str
    branches: tuple[Branch, ...]  # the declared order: the first is the baseline

    @property
    def exposures(self) -> int:
        return sum(b.exposures for b in self.branches)


def split_conversions(session: Session, since: dt.date | dt.datetime,
                      workflow: str | None = None) -> list[Split]:
    """Each split (workflow, node) exposed from `since` (a date: its UTC midnight), by variant."""
    if not isinstance(since, dt.datetime):
        since = dt.datetime.combine(since, dt.time(), dt.UTC)
    grouped: dict[tuple[str, str], list[tuple[str, int, int, bool]]] = {}
    for row in session.execute(BRANCHES, {"since": since, "workflow": workflow}):
        grouped.setdefault((row.workflow, row.node_id), []).append(
            (row.variant, int(row.exposures), int(row.converted), bool(row.has_goal)))
    splits = []
    for (name, node_id), rows in grouped.items():
        base_variant, base_n, base_converted, has_goal = rows[0]
        branches = [Branch(base_variant, base_n, base_converted if has_goal else None, None)]
        for variant, n, converted, _ in rows[1:]:
            branches.append(Branch(variant, n, converted if has_goal else None,
                                   lift(n, converted, base_n, base_converted)
                                   if has_goal else None))
        splits.append(Split(name, node_id, tuple(branches)))
    return splits
