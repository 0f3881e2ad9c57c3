"""`fleet bench segments`, second part: a refresh that moves memberships starts journeys.

Over the same kind of generated users, two segments with one condition: one
unwatched, one watched by a `segment.entered` trigger. Both are refreshed in this
process (the ratio is what writing the entries to the outbox costs the refresh,
which is all the segments queue waits for); then real workers (events, maintenance)
and the beat publish the outbox and ingest the entries, and the figure is how long
until every entry has started its execution.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.session import without_statement_timeout
from workers.definitions import deploy_workflow
from workers.events.outbox import add_segment_transitions
from workers.rules.segments import refresh_segment
from workers.tools.bench.harness import BenchEnvironment

MINIMAL = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL" id="d"
                  targetNamespace="http://lifecycle-fleet/bench">
  <bpmn:process id="entered" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>f</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f" sourceRef="start" targetRef="end"/>
    <bpmn:endEvent id="end"><bpmn:incoming>f</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>"""


def _segment(session: Session, name: str, share: int) -> Any:
    """A dynamic segment holding `share` percent of the generated users."""
    condition = {"field": "user.attributes.score", "op": "gte", "value": 100 - share}
    return session.execute(text(
        "INSERT INTO user_segments (name, conditions) VALUES (:n, CAST(:c AS jsonb)) "
        "RETURNING id"), {"n": name, "c": json.dumps(condition)}).scalar_one()


def bench_segment_entries(users: int = 1_000_000, share: int = 10,
                          timeout: float = 1800) -> dict[str, Any]:
    """Refresh timings and the time from refresh commit to every entry's execution started."""
    with BenchEnvironment("segments", 1, kind="bench") as env, Session(env.engine) as session:
        without_statement_timeout(session)
        session.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage, attributes) "
            "SELECT 'u' || i || '@example.com', 'Activation', jsonb_build_object('score', i % 100) "
            "FROM generate_series(1, :n) AS i"), {"n": users})
        unwatched, watched = _segment(session, "plain", share), _segment(session, "watched", share)
        deploy_workflow(session, "on-entry", MINIMAL, stages=[], activate=True)
        session.execute(text(
            "INSERT INTO triggers (name, event_type, conditions, workflow_id, segment_id) "
            "SELECT 'entry', 'segment.entered', '{}', id, :s FROM workflows WHERE name = 'on-entry'"),
            {"s": watched})
        session.commit()
        session.execute(text("ANALYZE"))

        started = time.perf_counter()
        plain = refresh_segment(session, unwatched)
        session.commit()
        plain_s = time.perf_counter() - started
        started = time.perf_counter()
        result = refresh_segment(session, watched)
        assert plain is not None and result is not None
        entries = add_segment_transitions(session, result.transitions)
        session.commit()
        watched_s = time.perf_counter() - started

        env.start_queue_worker("events", concurrency=2)
        env.start_queue_worker("maintenance")
        started = time.perf_counter()
        env.start_beat()  # the relay-outbox beat entry publishes the entries
        env.wait(lambda: env.scalar(text("SELECT count(*) FROM workflow_executions")) >= entries,
                 timeout)
        started_s = time.perf_counter() - started
        again = time.perf_counter()
        refresh_segment(session, watched, dt.datetime.now(dt.UTC))  # nobody moves
        session.commit()
        again_s = time.perf_counter() - again
        duplicates = env.scalar(text(
            "SELECT count(*) - count(DISTINCT source_event_id) FROM workflow_executions"))
    return {"users": users, "entries": entries,
            "refresh_unwatched_s": round(plain_s, 2),
            "refresh_with_entries_s": round(watched_s, 2),
            "ratio_with_entries_to_unwatched": round(watched_s / plain_s, 2),
            "entries_to_executions_started_s": round(started_s, 1),
            "executions_started_per_s": round(entries / started_s),
            "refresh_again_no_moves_s": round(again_s, 2),
            "duplicate_starts": duplicates}
