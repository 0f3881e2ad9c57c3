"""Segment membership refresh (segments queue)."""

from __future__ import annotations

import datetime as dt
import uuid
from functools import partial

from tasks.maintenance import relay_outbox
from workers.base_task import FleetTask
from workers.celery_app import app
from workers.events.outbox import add_segment_transitions
from workers.log import get_logger
from workers.queues import TaskNames
from workers.rules.segments import refresh_segment, segments_due

log = get_logger(__name__)
HORIZON = dt.timedelta(minutes=1)  # refresh a little before memberships expire


@app.task(base=FleetTask, bind=True, name=TaskNames.REFRESH_SEGMENT)
def refresh(self: FleetTask, segment_id: str) -> int | None:
    """Recompute one dynamic segment's memberships (set-based)."""
    result = refresh_segment(self.session, uuid.UUID(segment_id))
    if result is not None:
        if add_segment_transitions(self.session, result.transitions):
            self.after_commit(relay_outbox.delay)  # entries and exits go out now, not in 2 s
        log.info("segment.refreshed", segment_id=segment_id, members=result.members,
                 removed=result.removed, transitions=len(result.transitions))
    return None if result is None else result.members


@app.task(base=FleetTask, bind=True, name=TaskNames.REFRESH_EXPIRED_SEGMENTS,
          workspace_scope="each")
def refresh_expired(self: FleetTask) -> int:
    """Beat: send a refresh for every dynamic segment that is due (after this commit)."""
    due = segments_due(self.session, dt.datetime.now(dt.UTC), HORIZON)
    for segment_id in due:
        self.after_commit(partial(refresh.delay, str(segment_id)))
    return len(due)
