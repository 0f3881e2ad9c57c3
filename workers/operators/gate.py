"""What every operator that sends to a user calls first: the send gateway, for this call."""

from __future__ import annotations

from db.models import User
from workers.operators.context import Deferred, OperatorContext, load_user
from workers.sends.gateway import Decision, SendRequest, check


def gate(ctx: OperatorContext, channel: str, address: str | None,
         transactional: bool, user: User | None = None) -> Decision:
    """The gateway's decision for this call (recorded with it); raises Deferred when put off.

    Anything but `sent` means: do not call the channel, return `decision.as_result()`.
    `user`: the execution's user when the operator has loaded it already.
    """
    user = user or load_user(ctx)
    decision = check(ctx.session, SendRequest(
        key=ctx.key, execution_id=ctx.execution_id, workflow_id=ctx.workflow_id,
        user_id=ctx.user_id, attributes=user.attributes or {}, channel=channel,
        address=address if address is not None else user.email,
        transactional=transactional), ctx.now)
    ctx.send = (channel, decision.outcome)
    if decision.outcome == "deferred":
        assert decision.deliver_at is not None
        raise Deferred(decision.deliver_at)
    return decision
