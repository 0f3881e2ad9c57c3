"""The invariants checked after every chaos scenario and soak (RELIABILITY.md lists them).

Each is one read-only query against the run's database, compared with what the run
sent (its `SentLog`) and what its webhook receiver saw. A violation is a sentence;
an empty list means nothing was lost, nothing was done twice and nothing is stuck.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, text

from db.models import ACTIVE_EXECUTION_STATUSES, sql_list
from workers.tools.chaos.program import JOURNEY, SentLog
from workers.tools.chaos.receiver import WebhookServer


@dataclass
class InvariantReport:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    lost: int = 0
    duplicated: int = 0
    executions: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    messages_sent: int = 0
    webhook_deliveries: int = 0
    webhook_effects: int = 0
    stage_changes: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one(conn: Connection, sql: str) -> Any:
    return conn.execute(text(sql)).scalar_one()


def _whereabouts(conn: Connection) -> str:
    """Which sent events are missing, and any dead letter that mentions them without its id."""
    missing = conn.execute(text(
        "SELECT s.event_id::text, s.good FROM sent_events s WHERE NOT EXISTS "
        "(SELECT 1 FROM lifecycle_events e WHERE e.event_id = s.event_id) AND NOT EXISTS "
        "(SELECT 1 FROM dead_letters d WHERE d.event_id = s.event_id AND NOT s.good)")).all()
    ids = [row[0] for row in missing]
    letters = conn.execute(text(
        "SELECT d.id, d.source, left(d.reason, 200) FROM dead_letters d "
        "WHERE EXISTS (SELECT 1 FROM unnest(CAST(:ids AS text[])) i "
        "              WHERE position(convert_to(i, 'UTF8') IN d.raw_payload) > 0)"),
        {"ids": ids}).all()
    good = sum(1 for row in missing if row[1])
    return (f"{good} good, {len(ids) - good} bad, e.g. {ids[:3]}; "
            f"dead letters mentioning them: {[tuple(r) for r in letters][:5]}")


def check(engine: Engine, sent: SentLog, receiver: WebhookServer | None) -> InvariantReport:
    """Compare the settled fleet's database with what was sent (no step may be on its way)."""
    report = InvariantReport(sent=sent.sent)
    bad = report.violations
    with engine.begin() as conn:
        conn.execute(text("CREATE TEMP TABLE sent_events (event_id uuid PRIMARY KEY, good bool) "
                          "ON COMMIT DROP"))
        conn.execute(text("INSERT INTO sent_events SELECT unnest(CAST(:ids AS uuid[])), true"),
                     {"ids": sent.good})
        conn.execute(text("INSERT INTO sent_events SELECT unnest(CAST(:ids AS uuid[])), false"),
                     {"ids": sent.bad})
        rows, distinct = conn.execute(text(
            "SELECT count(*), count(DISTINCT e.event_id) FROM lifecycle_events e "
            "JOIN sent_events s USING (event_id) WHERE s.good")).one()
        report.accepted, report.duplicated = distinct, rows - distinct
        report.rejected = _one(conn, "SELECT count(DISTINCT d.event_id) FROM dead_letters d "
                                     "JOIN sent_events s USING (event_id) WHERE NOT s.good")
        report.lost = report.sent - report.accepted - report.rejected
        if report.lost:
            bad.append(f"{report.lost} sent events are neither in lifecycle_events "
                       f"nor in dead_letters: {_whereabouts(conn)}")
        if report.duplicated:
            bad.append(f"{report.duplicated} events are in lifecycle_events more than once")
        if wrong := _one(conn, "SELECT count(*) FROM lifecycle_events e "
                               "JOIN sent_events s USING (event_id) WHERE NOT s.good"):
            bad.append(f"{wrong} bad envelopes were accepted")
        if wrong := _one(conn, "SELECT count(DISTINCT d.event_id) FROM dead_letters d "
                               "JOIN sent_events s USING (event_id) WHERE s.good"):
            bad.append(f"{wrong} good events were dead-lettered")

        if doubled := _one(conn, "SELECT count(*) FROM (SELECT 1 FROM trigger_executions "
                                 "WHERE event_id IS NOT NULL GROUP BY trigger_id, event_id "
                                 "HAVING count(*) > 1) d"):
            bad.append(f"{doubled} trigger evaluations are recorded more than once")
        if over := _one(conn, "SELECT count(*) FROM (SELECT 1 FROM workflow_executions e "
                              "JOIN triggers t ON t.id = e.trigger_id "
                              "WHERE t.max_runs_per_user IS NOT NULL "
                              "GROUP BY e.trigger_id, e.user_id, t.max_runs_per_user "
                              "HAVING count(*) > t.max_runs_per_user) o"):
            bad.append(f"{over} users have more executions than their trigger allows")

        report.executions = {status: count for status, count in conn.execute(text(
            "SELECT status, count(*) FROM workflow_executions GROUP BY 1"))}
        # After settling, an active execution must rest on a timer or a message.
        if stuck := _one(conn, "SELECT count(*) FROM workflow_executions "
                               f"WHERE status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)}) "
                               "AND paused_at IS NULL "
                               "AND wake_at IS NULL AND awaiting_events IS NULL"):
            bad.append(f"{stuck} active executions wait for no timer and no message")
        if failed := report.executions.get("failed", 0):
            errors = [row[0] for row in conn.execute(text(
                "SELECT DISTINCT left(error_message, 300) FROM workflow_executions "
                "WHERE status = 'failed' LIMIT 3"))]
            bad.append(f"{failed} executions failed: {'; '.join(map(str, errors))}")
        report.steps = _one(conn, "SELECT count(*) FROM execution_steps")
        if gaps := _one(conn, "SELECT count(*) FROM (SELECT execution_id FROM execution_steps "
                              "GROUP BY 1 HAVING min(seq) <> 1 OR max(seq) <> count(*) "
                              "OR count(DISTINCT seq) <> count(*)) g"):
            bad.append(f"{gaps} executions have gaps or repeats in their step history")
        _side_effects(conn, report, receiver)
    return report


def _side_effects(conn: Connection, report: InvariantReport,
                  receiver: WebhookServer | None) -> None:
    """Once per (execution, node), counted where the effect lands."""
    bad = report.violations
    journeys = ("SELECT e.id FROM workflow_executions e JOIN workflows w ON w.id = e.workflow_id "
                f"WHERE w.name = '{JOURNEY}'")
    report.messages_sent = _one(conn, f"SELECT count(*) FROM message_log "
                                      f"WHERE execution_id IN ({journeys})")
    if doubled := _one(conn, "SELECT count(*) FROM (SELECT 1 FROM message_log "
                             "WHERE execution_id IS NOT NULL GROUP BY execution_id "
                             "HAVING count(*) > 1) d"):
        bad.append(f"{doubled} executions sent their message more than once")
    if missing := _one(conn, f"SELECT count(*) FROM ({journeys}) j WHERE EXISTS "
                             "(SELECT 1 FROM execution_steps s WHERE s.execution_id = j.id "
                             "AND s.node_id = 'welcome' AND s.outcome = 'completed') "
                             "AND NOT EXISTS (SELECT 1 FROM message_log m "
                             "WHERE m.execution_id = j.id)"):
        bad.append(f"{missing} executions passed `welcome` without a message in message_log")
    # The send gateway: a message went out exactly when its decision says `sent`.
    if unsent := _one(conn, "SELECT count(*) FROM message_log m WHERE NOT EXISTS (SELECT 1 "
                            "FROM sends s WHERE s.key = m.idempotency_key AND s.outcome = 'sent')"):
        bad.append(f"{unsent} messages in message_log have no 'sent' decision in sends")
    if undelivered := _one(conn, "SELECT count(*) FROM sends s WHERE s.outcome = 'sent' "
                                 "AND s.channel <> 'webhook' AND NOT EXISTS (SELECT 1 FROM "
                                 "message_log m WHERE m.idempotency_key = s.key)"):
        bad.append(f"{undelivered} sends decided 'sent' never reached message_log")
    report.stage_changes = _one(conn, f"SELECT count(*) FROM user_lifecycle_history "
                                      f"WHERE workflow_execution_id IN ({journeys})")
    if doubled := _one(conn, "SELECT count(*) FROM (SELECT 1 FROM user_lifecycle_history "
                             "WHERE workflow_execution_id IS NOT NULL "
                             "GROUP BY workflow_execution_id, to_stage HAVING count(*) > 1) d"):
        bad.append(f"{doubled} executions changed the same stage more than once")
    if receiver is None:
        return
    report.webhook_deliveries = len(receiver.deliveries)
    report.webhook_effects = receiver.effects()
    conn.execute(text("CREATE TEMP TABLE received_keys (key text PRIMARY KEY) ON COMMIT DROP"))
    conn.execute(text("INSERT INTO received_keys SELECT DISTINCT unnest(CAST(:k AS text[]))"),
                 {"k": receiver.keys})
    if unknown := _one(conn, "SELECT count(*) FROM received_keys r WHERE NOT EXISTS "
                             "(SELECT 1 FROM action_deliveries a WHERE a.key = r.key)"):
        bad.append(f"{unknown} webhook deliveries carry a key no operator call has")
    if doubled := _one(conn, "SELECT count(*) FROM (SELECT 1 FROM received_keys r "
                             "JOIN action_deliveries a USING (key) "
                             "GROUP BY a.execution_id, a.node_id HAVING count(*) > 1) d"):
        bad.append(f"{doubled} (execution, node) pairs had their webhook take effect "
                   "under two keys")
    if missing := _one(conn, f"SELECT count(*) FROM ({journeys}) j WHERE EXISTS "
                             "(SELECT 1 FROM execution_steps s WHERE s.execution_id = j.id "
                             "AND s.node_id = 'notify' AND s.outcome = 'completed') "
                             "AND NOT EXISTS (SELECT 1 FROM action_deliveries a "
                             "JOIN received_keys r USING (key) WHERE a.execution_id = j.id "
                             "AND a.node_id = 'notify')"):
        bad.append(f"{missing} executions completed `notify` but the receiver never saw it")
    if overlapping := receiver.overlapping():
        bad.append(f"{len(overlapping)} webhooks were delivered twice at the same time")
