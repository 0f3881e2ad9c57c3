"""Service-task operator calls (actions queue): side effects, retried, exactly once per key."""

from __future__ import annotations

from typing import Any

import structlog

from db.session import session_scope
from workers.base_task import FleetTask
from workers.celery_app import app
from workers.engine import dispatch
from workers.log import get_logger
from workers.operators.deliveries import ActionResult, fail_action, run_action
from workers.queues import TaskNames
from workers.retry_policy import GiveUp

log = get_logger(__name__)


def _follow_up(result: ActionResult) -> None:
    dispatch.send_ingest_followups(result.ingested)
    if result.execution_id is not None and result.step_version is not None:
        dispatch.send_step(result.execution_id, result.step_version)


class ActionTask(FleetTask):
    """Past the retry bound (or on a permanent error) the delivery is marked failed and the
    execution's next step fails the node, instead of dead-lettering the message."""

    abstract = True

    def _dead_letter(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any],
                     decision: GiveUp) -> None:
        key = args[0] if args else kwargs.get("key")
        if not isinstance(key, str):
            super()._dead_letter(exc, args, kwargs, decision)
            return
        reason = f"{type(exc).__name__}: {exc}"
        if decision.transient:
            reason = f"gave up after {self.request.retries or 0} retries: {reason}"
        with session_scope() as session:
            result = fail_action(session, key, reason, (self.request.retries or 0) + 1)
        _follow_up(result)


@app.task(base=ActionTask, bind=True, name=TaskNames.RUN_ACTION)
def run(self: ActionTask, key: str) -> dict[str, str]:
    """Run the operator of one action delivery, then step its execution.

    Returns the status, and the send gateway's channel and outcome when the operator
    sends to the user (counted in `fleet_sends_total` by workers/metrics.py).
    """
    structlog.contextvars.bind_contextvars(execution_id=key.split(":", 1)[0], action_key=key)
    result = run_action(self.session, key)
    self.after_commit(lambda: _follow_up(result))
    if result.send is None:
        return {"status": result.status}
    return {"status": result.status, "channel": result.send[0], "send_outcome": result.send[1]}
