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
   transaction-scoped advisory lock on the user, held until the call commits, so
   two workers sending to one user at once cannot both pass a cap of 1.
5. **sent**: the channel is called next; the row's `sent_at` is what caps count.

Transactional sends skip 2-4. Outcomes are counted in `fleet_sends_total` once the
call commits (from the actions task's result, workers/metrics.py).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.models import Send
from workers.log import get_logger
from workers.sends.config import CapDef
from workers.sends.consent import opt_out_reason
from workers.sends.policy import POLICIES, SendPolicy
from workers.sends.windows import local_day_bounds, next_open, resolve_timezone

log = get_logger(__name__)

Outcome = Literal["sent", "suppressed", "capped", "deferred", "held_out"]
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
    decision = _decide(session, policy, request, now)
    _record(session, request, decision, now)
    log.info("send.decided", key=request.key, channel=request.channel,
             outcome=decision.outcome, reason=decision.reason)
    return decision


def _decide(session: Session, policy: SendPolicy, request: SendRequest,
            now: dt.datetime) -> Decision:
    messaging = policy.messaging
    reason = opt_out_reason(session, user_id=request.user_id, attributes=request.attributes,
                            channel=request.channel, address=request.address,
                            consent_attribute=messaging.consent_attribute)
    if reason is not None:
        return Decision("suppressed", reason)
    if request.transactional:
        return Decision("sent", "transactional")
    workflow = policy.workflow(request.workflow_id)
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
    caps: list[tuple[CapDef, uuid.UUID | None]] = [(cap, None) for cap in messaging.caps]
    if workflow is not None:
        caps += [(cap, request.workflow_id) for cap in workflow.settings.caps]
    full = _full_cap(session, request, caps, zone, now)
    if full is not None:
        return Decision("capped", f"cap {full} reached")
    return Decision("sent")


def _full_cap(session: Session, request: SendRequest,
              caps: Sequence[tuple[CapDef, uuid.UUID | None]], zone: Any,
              now: dt.datetime) -> str | None:
    """The first cap this send would exceed, counted under the user's send lock; else None."""
    relevant = [(cap, wf) for cap, wf in caps if cap.channel in (None, request.channel)]
    if not relevant:
        return None
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
                    {"k": f"send:{request.user_id}"})
    day_start, _ = local_day_bounds(now, zone)
    filters: list[str] = []
    params: dict[str, Any] = {"user_id": request.user_id}
    for index, (cap, workflow_id) in enumerate(relevant):
        rolling = cap.rolling
        params[f"since{index}"] = now - rolling if rolling is not None else day_start
        clause = f"sent_at > :since{index}"
        if cap.channel is not None:
            clause += f" AND channel = :channel{index}"
            params[f"channel{index}"] = cap.channel
        if workflow_id is not None:
            clause += f" AND workflow_id = :workflow{index}"
            params[f"workflow{index}"] = workflow_id
        filters.append(f"count(*) FILTER (WHERE {clause})")
    params["earliest"] = min(params[f"since{i}"] for i in range(len(relevant)))
    counts = session.execute(text(
        f"SELECT {', '.join(filters)} FROM sends WHERE user_id = :user_id "
        "AND outcome = 'sent' AND NOT transactional AND sent_at > :earliest"), params).one()
    for (cap, workflow_id), count in zip(relevant, counts, strict=True):
        if count >= cap.max:
            return cap.describe() + (" in this workflow" if workflow_id else "")
    return None


def _record(session: Session, request: SendRequest, decision: Decision, now: dt.datetime) -> None:
    """One row per send key: the latest decision (a deferred send is decided again later)."""
    deferred = decision.outcome == "deferred"
    values = {"outcome": decision.outcome, "reason": decision.reason, "decided_at": now,
              "sent_at": now if decision.outcome == "sent" else None,
              "deferred_until": decision.deliver_at}
    insert = pg_insert(Send).values(
        key=request.key, execution_id=request.execution_id, workflow_id=request.workflow_id,
        user_id=request.user_id, channel=request.channel, transactional=request.transactional,
        created_at=now, deferrals=int(deferred), **values)
    session.execute(insert.on_conflict_do_update(
        index_elements=[Send.key],
        set_={**values, "deferred_until": decision.deliver_at if deferred
              else Send.deferred_until,
              "deferrals": Send.deferrals + int(deferred)}))


def sends_of(session: Session, execution_id: uuid.UUID) -> list[dict[str, Any]]:
    """An execution's send decisions, oldest first, with the node that asked (`fleet
    execution show`)."""
    rows = session.execute(text(
        "SELECT d.node_id, s.channel, s.outcome, s.reason, s.transactional, s.created_at, "
        "s.decided_at, s.sent_at, s.deferred_until, s.deferrals FROM sends s "
        "LEFT JOIN action_deliveries d ON d.key = s.key WHERE s.execution_id = :e "
        "ORDER BY s.created_at, s.key"), {"e": execution_id}).mappings()
    return [dict(row) for row in rows]
