"""Step messages in micro-batches: one transaction, one flush and one commit for many steps.

The workflows worker buffers `workflows.step` messages (`workers.batches`: up to
`FLEET_STEP_BATCH_SIZE` or `FLEET_STEP_BATCH_WAIT_MS`) and hands each buffer here.
A step's fixed costs (round trips, the commit's WAL flush, Celery's per-task
overhead) are then shared by the batch, as ingest shares them (`workers.events.micro_batch`).

celery-batches acknowledges the buffer when `run` returns, so `run` returns only
once every message is safe, each exactly as a single step would be:

* committed with the batch (`stepper.step_many`), then its next steps, timer
  messages and operator calls published together;
* if the batch fails, each message runs alone in a transaction of its own
  (`stepper.step`, which fails only its own execution on a value PostgreSQL
  refuses), so one bad step cannot take the others down;
* a message that fails alone with a transient error is published again with the
  retry policy's backoff and its retry count (as `FleetTask` retries); past the
  bound, or failing for good, it is dead-lettered with its body for replay;
* while the database is unreachable the whole buffer goes back to the broker with
  backoff at once, rather than waiting in this pool process;
* a message that is not a step (wrong arguments) is dead-lettered at once;
* if even that publish or dead letter cannot be made, the pool process exits
  without returning: nothing is acknowledged and the broker delivers the buffer again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from db import tenancy
from db.models import DEFAULT_WORKSPACE_ID
from db.session import session_scope
from workers.celery_app import app
from workers.dead_letters import record_dead_letter
from workers.engine import dispatch, stepper
from workers.engine.stepper import StepResult
from workers.errors import is_outage
from workers.log import get_logger
from workers.queues import TaskNames
from workers.retry_policy import OUTAGE_RETRIES, GiveUp, RetryLater, RetryPolicy, outage_retries

log = get_logger(__name__)

MAX_BATCH_RETRY_DELAY = 1.0  # a failed batch is retried in-process briefly, then split


@dataclass(frozen=True)
class StepMessage:
    """One buffered `workflows.step(execution_id, expected_version)` message."""

    execution_id: uuid.UUID
    version: int
    task_id: str | None
    retries: int
    outages: int  # of those retries, how many waited out an outage (workers.retry_policy)
    workspace_id: uuid.UUID  # the `fleet_workspace` header's (absent: the default workspace)

    @property
    def key(self) -> tuple[uuid.UUID, int]:
        return self.execution_id, self.version


class NotAStep(ValueError):
    """A message on the step task whose arguments are not (execution id, version)."""


def parse(request: Any) -> StepMessage:
    """The step a buffered request carries; NotAStep says what is wrong with it."""
    args = list(request.args or ())
    kwargs = dict(request.kwargs or {})
    values = [*args, *(kwargs.pop(name) for name in ("execution_id", "expected_version")
                       if name in kwargs)]
    if len(values) != 2 or kwargs:
        raise NotAStep(f"a step takes (execution_id, expected_version), got args {args!r} "
                       f"and kwargs {request.kwargs!r}")
    execution_id, version = values
    try:
        parsed = uuid.UUID(str(execution_id))
    except ValueError:
        raise NotAStep(f"execution_id {execution_id!r} is not a UUID") from None
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**31:
        raise NotAStep(f"expected_version {version!r} is not a version number")
    headers = getattr(request, "request_dict", None) or {}
    retries = headers.get("retries")
    retries = retries if isinstance(retries, int) and not isinstance(retries, bool) \
        and retries >= 0 else 0
    header = headers.get(tenancy.HEADER)
    workspace_id = DEFAULT_WORKSPACE_ID if header is None else tenancy.parse_header(header)
    if workspace_id is None:
        raise NotAStep(f"the {tenancy.HEADER} header {str(header)[:80]!r} is not a workspace id")
    return StepMessage(parsed, version, getattr(request, "id", None), retries,
                       outage_retries(headers, retries), workspace_id)


@dataclass(frozen=True)
class BatchReport:
    """What one buffer did, for the log and the task's result."""

    messages: int
    outcomes: dict[str, int]
    split: bool  # the batch failed and its messages ran one by one
    republished: int
    dead_lettered: int


def run(requests: Sequence[Any]) -> BatchReport:
    """Run a buffer of step requests; returns only when every one is safe (module doc)."""
    steps: list[StepMessage] = []
    dead = 0
    for request in requests:
        try:
            steps.append(parse(request))
        except NotAStep as exc:
            with tenancy.workspace(DEFAULT_WORKSPACE_ID):  # its own may be what is wrong
                _dead_letter_or_exit(_raw(request), exc)
            dead += 1
    results, split, republished, failed = _run_durably(steps)
    dead += failed
    _send(results)
    outcomes = Counter(str(result.outcome) for _, result in results)
    return BatchReport(len(requests), dict(outcomes), split, republished, dead)


def _by_workspace(steps: list[StepMessage]) -> dict[uuid.UUID, list[StepMessage]]:
    groups: dict[uuid.UUID, list[StepMessage]] = {}
    for message in steps:
        groups.setdefault(message.workspace_id, []).append(message)
    return groups


def _step_all(steps: list[StepMessage]) -> list[tuple[StepMessage, StepResult]]:
    """Every step of the buffer in one transaction, workspace after workspace: the tenant
    is switched between groups (db/tenancy.py), so each group's statements see its own
    workspace only, and the buffer still costs one commit."""
    groups = _by_workspace(steps)
    done: list[tuple[StepMessage, StepResult]] = []
    first = next(iter(groups))
    with tenancy.workspace(first), session_scope() as session:
        for workspace_id, group in groups.items():
            if workspace_id != first:  # the first is the transaction's from its start
                tenancy.switch(session, workspace_id)
            done += zip(group, stepper.step_many(session, [s.key for s in group]), strict=True)
    return done


def _run_durably(steps: list[StepMessage]
                 ) -> tuple[list[tuple[StepMessage, StepResult]], bool, int, int]:
    """(results committed, split?, republished, dead-lettered) for the parsed steps."""
    if not steps:
        return [], False, 0, 0
    policy = RetryPolicy.from_settings().in_process(MAX_BATCH_RETRY_DELAY)
    retries = 0
    while True:
        try:
            return _step_all(steps), False, 0, 0
        except Exception as exc:
            if is_outage(exc):
                log.warning("steps.batch_outage", error=repr(exc), steps=len(steps))
                for message in steps:
                    _retry_later(message, exc, RetryPolicy.from_settings())
                return [], False, len(steps), 0
            decision = policy.decide(exc, retries)
            if isinstance(decision, GiveUp):
                log.warning("steps.batch_split", error=repr(exc), steps=len(steps))
                break
            retries += 1
            time.sleep(decision.delay)
    return _one_by_one(steps)


def _one_by_one(steps: list[StepMessage]
                ) -> tuple[list[tuple[StepMessage, StepResult]], bool, int, int]:
    results: list[tuple[StepMessage, StepResult]] = []
    republished = dead = 0
    policy = RetryPolicy.from_settings()
    for message in steps:
        try:
            with tenancy.workspace(message.workspace_id), session_scope() as session:
                results.append((message, stepper.step(session, *message.key)))
        except Exception as exc:
            if _retry_later(message, exc, policy):
                republished += 1
            else:
                dead += 1
    return results, True, republished, dead


def _retry_later(message: StepMessage, exc: Exception, policy: RetryPolicy) -> bool:
    """Publish the message again after its backoff (True), or dead-letter it (False), in
    its workspace (the header, the dead letter's row)."""
    with tenancy.workspace(message.workspace_id):
        return _retry_or_dead_letter(message, exc, policy)


def _retry_or_dead_letter(message: StepMessage, exc: Exception, policy: RetryPolicy) -> bool:
    decision = policy.decide(exc, message.retries, message.outages)
    if isinstance(decision, RetryLater):
        log.warning("task.retry", execution_id=str(message.execution_id), error=repr(exc),
                    retries=message.retries + 1)
        try:
            app.send_task(TaskNames.STEP, args=[str(message.execution_id), message.version],
                          countdown=decision.delay, retries=message.retries + 1,
                          task_id=message.task_id,
                          headers={OUTAGE_RETRIES: message.outages + is_outage(exc)})
            return True
        except Exception as send_error:  # neither stored nor re-published: do not ack
            log.critical("steps.batch_unsafe", error=repr(send_error))
            os._exit(70)
    reason = repr(exc) if not decision.transient else (
        f"gave up after {message.retries} retries: {type(exc).__name__}: {exc}")
    _dead_letter_or_exit(_raw_step(message), exc, reason)
    return False


def _raw(request: Any) -> str:
    return json.dumps({"task": TaskNames.STEP, "id": getattr(request, "id", None),
                       "args": list(request.args or ()), "kwargs": dict(request.kwargs or {})},
                      default=str)


def _raw_step(message: StepMessage) -> str:
    return json.dumps({"task": TaskNames.STEP, "id": message.task_id,
                       "args": [str(message.execution_id), message.version], "kwargs": {}})


def _dead_letter_or_exit(raw: str, exc: Exception, reason: str | None = None) -> None:
    """Commit a dead letter (replayable: the task's name and arguments), or exit unacked."""
    reason = reason or f"{type(exc).__name__}: {exc}"
    try:
        with session_scope() as session:
            dead_letter_id = record_dead_letter(session, source=TaskNames.STEP, reason=reason,
                                                raw=raw, error_type=type(exc).__qualname__)
    except Exception as db_error:
        log.critical("steps.dead_letter_failed", error=repr(db_error), reason=reason)
        os._exit(70)
    log.error("task.dead_lettered", dead_letter_id=dead_letter_id, reason=reason)


def _send(results: list[tuple[StepMessage, StepResult]]) -> None:
    """After commit: every next step, delayed step and operator call of the batch, each
    workspace's published inside it (the `fleet_workspace` header)."""
    by_workspace: dict[uuid.UUID, list[tuple[StepMessage, StepResult]]] = {}
    for message, result in results:
        by_workspace.setdefault(message.workspace_id, []).append((message, result))
    for workspace_id, done in by_workspace.items():
        with tenancy.workspace(workspace_id):
            _send_workspace(done)


def _send_workspace(results: list[tuple[StepMessage, StepResult]]) -> None:
    """Every next step, delayed step and operator call of one workspace's results, together."""
    now: dict[tuple[uuid.UUID, int], None] = {}  # ordered sets: copies in a batch send once
    later: dict[dt.datetime, dict[tuple[uuid.UUID, int], None]] = {}
    actions: dict[str, None] = {}
    for message, result in results:
        if result.next_version is not None:
            step = (message.execution_id, result.next_version)
            if result.send_at is None:
                now[step] = None
            else:
                later.setdefault(result.send_at, {})[step] = None
        if result.action_key is not None:
            actions[result.action_key] = None
    try:
        dispatch.send_steps(now)
        for eta, due in later.items():
            dispatch.send_steps(due, eta=eta)
        dispatch.send_actions(list(actions))
    except Exception as exc:  # committed: a lost send is the reaper's (and the sweep's) to find
        log.error("steps.send_failed", error=repr(exc), steps=len(now), actions=len(actions))
