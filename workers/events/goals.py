"""Goals reached: the one writer of `execution_goals`.

A workflow may declare a goal (`workflows.settings`: an event type, a condition,
a window after the start). Ingest calls `record_goals` in its transaction: an
admitted event of a goal's type whose condition holds for the event and its user
is the goal reached by each of that user's executions of the workflow (running or
ended, any status) that started at most the window before the event was recorded.

The window is on the fleet's clock (the ingest's `now`), as `performed` counts are,
not on the producer's `occurred_at`: a producer's clock a few seconds behind, or an
event that waited in a backlog, must not lose a conversion that came right after
the start. (`reached_at` keeps `occurred_at`.) An event backfilled long after it
happened therefore counts for the executions running when it is recorded.
Each execution records its goal once, with the first such event: a redelivered
or later event changes nothing. This is what "conversion" means in the metrics.
A workflow with `exit_on_goal` also ends the executions that reached it
(workers/events/exits.py, called by ingest right after `record_goals`).

Conditions are the trigger language, evaluated by the same compiled predicates
with the same memberships (`workers/rules/triggers.py` loads and caches the goals
with the triggers), so a segment in a goal reads as it does in a trigger.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

from workers.events.envelope import Event
from workers.rules.membership import MembershipResolver
from workers.rules.triggers import ActiveTriggers, UserView

# One statement per batch, the same text whatever its size (arrays, not VALUES rows).
# The window join uses idx_executions_user (user_id, started_at); inserting in
# execution id order takes the foreign key's row locks in one order.
RECORD = text("""
INSERT INTO execution_goals (execution_id, workflow_id, user_id, event_id, event_type, reached_at)
SELECT DISTINCT ON (x.id) x.id, x.workflow_id, x.user_id, k.event_id, k.event_type, k.reached_at
  FROM unnest(CAST(:workflows AS uuid[]), CAST(:users AS uuid[]), CAST(:events AS uuid[]),
              CAST(:types AS text[]), CAST(:reached AS timestamptz[]),
              CAST(:windows AS interval[]))
       AS k(workflow_id, user_id, event_id, event_type, reached_at, goal_window)
  JOIN workflow_executions x ON x.user_id = k.user_id AND x.workflow_id = k.workflow_id
   AND x.started_at BETWEEN CAST(:now AS timestamptz) - k.goal_window
                        AND CAST(:now AS timestamptz)
 ORDER BY x.id, k.reached_at, k.event_id
ON CONFLICT (execution_id) DO NOTHING RETURNING execution_id
""")


def record_goals(session: Session, events: Sequence[Event], users: Mapping[str, UserView],
                 definitions: ActiveTriggers, membership: MembershipResolver,
                 now: dt.datetime) -> int:
    """Record the goals these admitted events reach; returns how many executions reached one.

    Costs no query when no workflow has a goal of these events' types, one
    statement otherwise (plus the membership prefetch when a goal names a segment).
    """
    relevant = [(e, goals) for e in events if (goals := definitions.goals_for(e.event_type))]
    if not relevant:
        return 0
    membership.prefetch([users[e.user].id for e, _ in relevant],
                        {ref for _, goals in relevant for g in goals for ref in g.segment_refs})
    reached = [(e, g) for e, goals in relevant for g in goals
               if g.evaluate(e, users[e.user], now, membership, session)]
    if not reached:
        return 0
    return len(session.execute(RECORD, {
        "workflows": [g.workflow_id for _, g in reached],
        "users": [users[e.user].id for e, _ in reached],
        "events": [e.event_id for e, _ in reached],
        "types": [e.event_type for e, _ in reached],
        "reached": [e.occurred_at for e, _ in reached],
        "windows": [g.window for _, g in reached], "now": now}).all())
