"""The send gateway: one decision, recorded in `sends`, before any message reaches a channel.

Every operator that sends to a user (`send_message`, and `send_webhook` with
`to_user`) calls `check` first, inside the operator call's transaction. Rules, in
order; the first that applies decides:

1. **suppressed**: the address is on the suppression list, or the user opted out of
   the channel (events or attribute; workers/sends/consent.py). Applies to
   transactional sends too: a suppressed user gets nothing on that channel.
2. **held_out**: the user is in the program's or the workflow's control group
   (a sticky hash, `SendPolicy.held_out`); recorded, not delivered.
3. **deferred**: outside the send window in the user's time zone. The operator call
   waits as a durable timer and runs again, all rules re-checked, when it opens.
4. **capped**: a frequency cap is full. The count and the decision happen under a
   transaction-scoped advisory lock on the user (taken with the consent lookup,
   when a cap applies), held until the call commits, so two workers sending to one
   user at once cannot both pass a cap of 1.
5. **sent**: the channel is called next; the row's `sent_at` is what caps count.

A deferred send whose execution ends before it goes out (a goal exit) becomes
**dropped** (`drop_deferred`).

Transactional sends skip 2-4. Outcomes are counted in `fleet_sends_total` once the
call commits (from the actions task's result, workers/metrics.py).
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import TextClause, text
from sqlalchemy.orm import Session

from workers.log import get_logger
from workers.sends.config import CapDef
from workers.sends.consent import opt_out_reason
from workers.sends.policy import POLICIES, SendPolicy
from workers.sends.windows import local_day_bounds, next_open, resolve_timezone

log = get_logger(__name__)

Outcome = Literal["sent", "suppressed", "capped", "deferred", "held_out", "dropped"]
TIMEZONE_ATTRIBUTE = "timezone"


@dataclass(frozen=True)
class SendRequest:
    key: str  # the operator call's idempotency key
    execution_id: uuid.UUID
    workflow_id: uuid.UUID
    user_id: uuid.UUID
    attributes: Mapping[str, Any]
    channel: str
    address: str | None
    transactional: bool = False


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str | None = None
    deliver_at: dt.datetime | None = None  # deferred: when the window opens

    def as_result(self) -> dict[str, Any]:
        """What the workflow sees (a BPMN gateway may branch on `outcome`)."""
        result: dict[str, Any] = {"outcome": self.outcome}
        if self.reason:
            result["reason"] = self.reason
        if self.deliver_at:
            result["deliver_at"] = self.deliver_at.isoformat()
        return result


def check(session: Session, request: SendRequest, now: dt.datetime,
          policy: SendPolicy | None = None) -> Decision:
    """Decide one send and record it (caller's transaction); see the module docstring."""
    policy = policy or POLICIES.get(session)
    verdict = _decide(session, policy, request, now)
    if isinstance(verdict, Decision):
        decision = verdict
        session.execute(RECORD, _row(request, decision, now))
    else:  # only the caps are left: counted and recorded in one statement
        decision = _count_and_record(session, request, verdict, now)
    log.info("send.decided", key=request.key, channel=request.channel,
              outcome=decision.outcome, reason=decision.reason)
    return decision


@dataclass(frozen=True)
class _CapsToCount:
    caps: Sequence[tuple[CapDef, uuid.UUID | None]]  # (cap, the workflow it is of, or None)
    day_start: dt.datetime  # the user's calendar day, for `per: day`


def _decide(session: Session, policy: SendPolicy, request: SendRequest,
            now: dt.datetime) -> Decision | _CapsToCount:
    """The decision, unless it rests on the caps alone: then the caps to count."""
    messaging = policy.messaging
    workflow = policy.workflow(request.workflow_id)
    caps: list[tuple[CapDef, uuid.UUID | None]] = [] if request.transactional else [
        (cap, None) for cap in messaging.caps if cap.channel in (None, request.channel)] + [
        (cap, request.workflow_id) for cap in (workflow.settings.caps if workflow else ())
        if cap.channel in (None, request.channel)]
    # The user's send lock is taken with the consent lookup when a cap may be counted.
    reason = opt_out_reason(session, user_id=request.user_id, attributes=request.attributes,
                            channel=request.channel, address=request.address,
                            consent_attribute=messaging.consent_attribute,
                            lock=f"send:{request.user_id}" if caps else None)
    if reason is not None:
        return Decision("suppressed", reason)
    if request.transactional:
        return Decision("sent", "transactional")
    if policy.held_out(workflow, request.user_id):
        return Decision("held_out", "in the control group")
    zone, warning = resolve_timezone(request.attributes.get(TIMEZONE_ATTRIBUTE), messaging.zone)
    if warning is not None:
        log.warning("send.timezone_invalid", user_id=str(request.user_id), warning=warning,
                    fallback=messaging.timezone)
    if messaging.send_window is not None:
        opens = next_open(now, zone, messaging.send_window.window)
        if opens is not None:
            return Decision("deferred", f"outside the send window {messaging.send_window.hours} "
                            f"({zone.key})", opens)
    if not caps:
        return Decision("sent")
    return _CapsToCount(caps, local_day_bounds(now, zone)[0])


# One row per send key: the latest decision (a deferred send is decided again later).
# Written once as text: the ORM's per-call insert construct cost more than the row.
_COLUMNS = ("(key, execution_id, workflow_id, user_id, channel, transactional, outcome, reason, "
            "created_at, decided_at, sent_at, deferred_until, deferrals)")
_ON_CONFLICT = """ON CONFLICT (key) DO UPDATE SET
    outcome = excluded.outcome, reason = excluded.reason, decided_at = excluded.decided_at,
    sent_at = excluded.sent_at,
    deferred_until = CASE WHEN excluded.outcome = 'deferred' THEN excluded.deferred_until
                          ELSE sends.deferred_until END,
    deferrals = sends.deferrals + excluded.deferrals"""
RECORD = text(f"""
INSERT INTO sends {_COLUMNS}
VALUES (:key, :execution_id, :workflow_id, :user_id, :channel, :transactional, :outcome,
        :reason, :now, :now, :sent_at, :deferred_until, :deferrals)
{_ON_CONFLICT}""")


def _row(request: SendRequest, decision: Decision, now: dt.datetime) -> dict[str, Any]:
    return {"key": request.key, "execution_id": request.execution_id,
            "workflow_id": request.workflow_id, "user_id": request.user_id,
            "channel": request.channel, "transactional": request.transactional,
            "outcome": decision.outcome, "reason": decision.reason, "now": now,
            "sent_at": now if decision.outcome == "sent" else None,
            "deferred_until": decision.deliver_at,
            "deferrals": int(decision.outcome == "deferred")}


def _count_and_record(session: Session, request: SendRequest, counted: _CapsToCount,
                      now: dt.datetime) -> Decision:
    """`capped` by the first full cap, else `sent`: counted and recorded in one statement.

    It runs after the consent lookup took the user's send lock, so its snapshot holds
    every send committed by whoever held the lock before; the lock is held until the
    caller commits this row.
    """
    params = _row(request, Decision("sent"), now)
    shape = []
    for i, (cap, workflow_id) in enumerate(counted.caps):
        rolling = cap.rolling
        params[f"since{i}"] = now - rolling if rolling is not None else counted.day_start
        params[f"channel{i}"], params[f"workflow{i}"] = cap.channel, workflow_id
        params[f"max{i}"] = cap.max
        params[f"reason{i}"] = (f"cap {cap.describe()}"
                                f"{' in this workflow' if workflow_id else ''} reached")
        shape.append((cap.channel is not None, workflow_id is not None))
    params["earliest"] = min(params[f"since{i}"] for i in range(len(counted.caps)))
    outcome, reason = session.execute(_count_and_record_sql(tuple(shape)), params).one()
    return Decision(outcome, reason)


@functools.lru_cache(maxsize=128)
def _count_and_record_sql(shape: tuple[tuple[bool, bool], ...]) -> TextClause:
    """The statement for caps of this shape ((on a channel?, of a workflow?) each), built
    once per shape: parsing the text on every send cost a tenth of the gateway."""
    filters, full = [], []
    for i, (on_channel, of_workflow) in enumerate(shape):
        clause = f"sent_at > :since{i}"
        if on_channel:
            clause += f" AND channel = :channel{i}"
        if of_workflow:
            clause += f" AND workflow_id = :workflow{i}"
        filters.append(f"count(*) FILTER (WHERE {clause}) AS c{i}")
        full.append(f"WHEN c{i} >= :max{i} THEN :reason{i}")
    return text(f"""
WITH counts AS (
    SELECT {', '.join(filters)} FROM sends WHERE user_id = :user_id AND outcome = 'sent'
       AND NOT transactional AND sent_at > :earliest),
verdict AS (SELECT CASE {' '.join(full)} END AS reason FROM counts)
INSERT INTO sends {_COLUMNS}
SELECT :key, :execution_id, :workflow_id, :user_id, :channel, :transactional,
       CASE WHEN v.reason IS NULL THEN 'sent' ELSE 'capped' END, v.reason, :now, :now,
       CASE WHEN v.reason IS NULL THEN CAST(:now AS timestamptz) END, NULL, 0
  FROM verdict v
{_ON_CONFLICT}
RETURNING outcome, reason""")


DROP = text("UPDATE sends SET outcome = 'dropped', reason = :reason, decided_at = :now "
            "WHERE key = ANY(CAST(:keys AS varchar[])) AND outcome = 'deferred'")


def drop_deferred(session: Session, keys: Sequence[str], reason: str, now: dt.datetime) -> None:
    """These operator calls will not run again (their execution ended: a goal exit): a
    send deferred to the user's window is recorded as `dropped`, with the reason, so the
    figures do not count it as still deferred. Other decisions stay as they were."""
    if keys:
        session.execute(DROP, {"keys": list(keys), "reason": reason, "now": now})


def sends_of(session: Session, execution_id: uuid.UUID) -> list[dict[str, Any]]:
    """An execution's send decisions, oldest first, with the node that asked (`fleet
    execution show`)."""
    rows = session.execute(text(
        "SELECT d.node_id, s.channel, s.outcome, s.reason, s.transactional, s.created_at, "
        "s.decided_at, s.sent_at, s.deferred_until, s.deferrals FROM sends s "
        "LEFT JOIN action_deliveries d ON d.key = s.key WHERE s.execution_id = :e "
        "ORDER BY s.created_at, s.key"), {"e": execution_id}).mappings()
    return [dict(row) for row in rows]
