"""One step of an execution: lock it, run exactly one BPMN node, persist, say what comes next.

The row lock (`SELECT ... FOR UPDATE`) makes two steps of one execution run one
after the other; each step message carries the `state_version` it expects, so a
duplicate, late or stale message finds a different version and does nothing.
Engine state, variables, current node, status, waits and the step-history row
are written (through `executions`) in the caller's transaction; the caller sends
the next step (or the operator call) only after the commit.

Service tasks run in two steps around the actions queue: the first step records
an `action_deliveries` row (the idempotency key and the evaluated parameters) and
asks for the operator to run; once it has, the next step completes the node with
the operator's result. A send the gateway put off to the user's send window leaves
the delivery `deferred`: the execution waits on a timer, and the step it wakes
asks for the operator call again. User and manual tasks wait for a person: the execution
lists them in `awaiting_tasks` and `complete_task` runs one with the data given.

An execution with an exit requested (`executions.request_exits`: its goal reached
while its workflow has `exit_on_goal`), or whose workflow's `exit_when` holds for its
user (`HOOKS.exit_when`), is ended by its next step before any node runs, whatever
version the step message carries and whatever it waits for: a timer, a message, an
event-based gateway, a human task, a send deferred to the user's window, a pause.
Its operator calls not yet run are dropped (`_exit`). Locking: the request is written
by ingest under `FOR KEY SHARE` only, so it never waits for a step; a step that holds
the row when the goal arrives has read no request, and the step message ingest sends
after its commit finds the row busy, comes back after that step commits and then
ends it (`executions.request_exits`).

An execution that is running with nothing ready, due, awaited or in flight can
never go on by itself: the step that finds it so marks it stalled, with the
reason, and sends nothing (the reaper leaves it alone until it is retried).

A step whose writes cannot be saved (a value PostgreSQL refuses in the state, the
variables or an operator's parameters) fails the execution at that node instead:
the step's writes run in a savepoint, so whatever refused them is rolled back and
the failure is written on its own. Otherwise the step would fail at commit on every
delivery, and the execution would stay `running` with no error, for ever.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db.models import (
    TERMINAL_EXECUTION_STATUSES,
    ActionDelivery,
    ExecutionMessage,
    ExitReason,
    StepOutcome,
    User,
    WorkflowExecution,
)
from workers.engine import executions, runner, state
from workers.engine.specs import SPECS, LoadedSpec
from workers.engine.values import Refused, check_storable
from workers.errors import is_transient
from workers.log import get_logger
from workers.settings import get_settings

log = get_logger(__name__)
R = TypeVar("R", bound="StepResult | None")
Outcome = Literal["noop", "busy", "completed", "waiting", "failed", "stalled", "exited"]
BUSY_RESEND = dt.timedelta(milliseconds=100)  # an execution another worker holds: try again then


@dataclass(frozen=True)
class StepResult:
    """What one step did and what the caller sends after commit."""

    outcome: Outcome
    node_id: str | None = None
    next_version: int | None = None  # send workflows.step(id, next_version)
    send_at: dt.datetime | None = None  # ... not before then (a timer due soon), else at once
    action_key: str | None = None  # send actions.run(action_key)
    reason: str | None = None  # why a step was a no-op, or why the execution stalled


def action_key(execution_id: uuid.UUID, task_id: uuid.UUID) -> str:
    """The idempotency key of one operator call: (execution, task instance of the node)."""
    return f"{execution_id}:{task_id}"


ExitCheck = Callable[[Session, Sequence[WorkflowExecution], dt.datetime], set[uuid.UUID]]
DropSends = Callable[[Session, Sequence[str], str, dt.datetime], None]


@dataclass
class ExitHooks:
    """What an exit needs that the engine may not import (layer rule: no rules, no sends).

    `exit_when`: which of these active executions' users meet their workflow's exit
    condition (workers/events/exits.py); `drop_sends`: record the sends of the operator
    calls an exit dropped as `dropped` (workers/sends/gateway.py). tasks/workflows.py
    installs both when it is imported, so every worker that steps has them; without
    them a step still applies the exits ingest requested.
    """

    exit_when: ExitCheck | None = None
    drop_sends: DropSends | None = None


HOOKS = ExitHooks()


@dataclass
class _Batch:
    """What a batch's steps read, fetched once for all of its executions.

    The users of executions about to start (their `user` variable), the messages
    waiting for any of them (`executions.pending_messages_of`) and the exits due for
    them (requested, or `exit_when` met): one query each per batch instead of one per step.
    """

    users: dict[uuid.UUID, dict[str, Any]]
    messages: dict[uuid.UUID, list[ExecutionMessage]]
    exits: dict[uuid.UUID, executions.ExitRequest]

    @classmethod
    def of(cls, session: Session, rows: Sequence[WorkflowExecution], now: dt.datetime) -> _Batch:
        """Lock the users whose messages are read (see `executions.lock_users`), then read."""
        executions.lock_users(session, [row.user_id for row in rows if _may_wait_for_events(
            session, row)])
        starting = [row.user_id for row in rows if row.engine_state is None]
        users = {user.id: {"id": str(user.id), "email": user.email,
                           "stage": user.current_lifecycle_stage,
                           "attributes": user.attributes or {}}
                 for user in (session.execute(select(User).where(User.id.in_(starting)))
                              .scalars() if starting else ())}
        live = [row for row in rows if row.status not in TERMINAL_EXECUTION_STATUSES]
        active = [row.id for row in live]
        exits = executions.exit_requests(session, active)
        if HOOKS.exit_when is not None:
            unasked = [row for row in live if row.id not in exits]
            exits |= {execution_id: executions.ExitRequest(execution_id, ExitReason.EXITED)
                      for execution_id in (HOOKS.exit_when(session, unasked, now)
                                           if unasked else ())}
        return cls(users, executions.pending_messages_of(session, active), exits)


def _may_wait_for_events(session: Session, row: WorkflowExecution) -> bool:
    """An active execution whose workflow has message waits.

    A spec that cannot be loaded says no: the step's own load then fails the execution
    at its node (`_cannot_run`), as it does for any definition that cannot run.
    """
    if row.status in TERMINAL_EXECUTION_STATUSES or row.paused_at is not None:
        return False
    if row.awaiting_events:
        return True
    try:
        return bool(SPECS.get(session, row.workflow_id, row.workflow_version or "").awaited_events)
    except Exception as exc:
        if _is_infrastructure(exc):
            raise
        return False


def _look_back(session: Session, batch: _Batch, execution: WorkflowExecution, workflow: Any,
               now: dt.datetime) -> None:
    """Give the waits this step began the user's earlier events they look back for.

    A wait for a message looks back when its catch event has the `lookback` property,
    or its workflow the program's `lookback`. The events come from the audit log,
    read with the user locked (`_Batch.of`): one recorded before this lookup is read
    here, one recorded after it commits after this step and is delivered by its
    ingest (`executions.wake_waiting`), so no event falls between the two.
    """
    begun = set(runner.waits(workflow).messages) - set(execution.awaiting_events or ())
    if not begun:
        return
    loaded = SPECS.get(session, execution.workflow_id, execution.workflow_version or "")
    default = (None if begun <= loaded.lookbacks.keys()
               else executions.workflow_lookback(session, execution.workflow_id))
    windows = {name: window for name in sorted(begun)
               if (window := loaded.lookbacks.get(name, default))}
    found = executions.look_back(session, execution.id, execution.user_id, windows, now)
    if found:
        batch.messages.setdefault(execution.id, []).extend(found)
        log.info("execution.looked_back", execution_id=str(execution.id),
                 event_types=sorted(windows), found=len(found))


def _deliver_messages(batch: _Batch, execution: WorkflowExecution, workflow: Any,
                      now: dt.datetime) -> None:
    """Hand the execution's pending events to the waits that catch them, oldest first.

    Only a message the workflow caught is consumed; one no wait caught (its
    correlation values differ, say) stays pending for a later wait.
    """
    waits = runner.waits(workflow)
    pending = batch.messages.get(execution.id)
    if not waits.messages or not pending:
        return
    # An event that occurred after a timer of the workflow came due waits for the next
    # step: the timer fires first (a boundary timer then ends the wait), as it would
    # have had the step run on time. One that occurred before it is caught first, even
    # by a late step (runner.next_node). When it occurred is its `occurred_at`, as for
    # an event-based gateway's race (runner._timer_came_first), else when it arrived.
    due = waits.wake_at
    for message in [m for m in pending if m.event_type in waits.messages
                    and (due is None or (runner.occurred_at(m.payload) or m.received_at) < due)]:
        caught = runner.deliver(workflow, message.event_type, message.payload)
        if caught:
            executions.consume(message, now)
            pending.remove(message)
        log.info("execution.message", execution_id=str(execution.id),
                 event_type=message.event_type, event_id=str(message.event_id), caught=caught)


@dataclass
class _Attempt:
    """The node a step is running, for the failure record if its writes cannot be saved."""

    node_id: str | None
    node_type: str = "Save"


def step(session: Session, execution_id: uuid.UUID, expected_version: int,
         now: dt.datetime | None = None) -> StepResult:
    """Run the execution's next node, if this step message is the current one.

    The step's writes run in a savepoint, flushed at once: a value PostgreSQL
    refuses fails the execution at its node (see the module docstring).
    """
    now = now or dt.datetime.now(dt.UTC)
    execution = executions.lock(session, execution_id)
    if execution is None:
        return StepResult("noop", reason="no such execution")
    return _step_locked(session, _Batch.of(session, [execution], now), execution,
                        expected_version, now, isolated=True)


def step_many(session: Session, requests: Sequence[tuple[uuid.UUID, int]],
              now: dt.datetime | None = None) -> list[StepResult]:
    """Run a batch of step messages in the caller's transaction; one result per request.

    The batch's executions are locked in one statement, in id order, skipping rows
    another transaction holds: such a message comes back `busy` (the caller sends it
    again shortly) instead of waiting, so two batches can never deadlock. Each
    execution's messages run one after the other in version order (a duplicate or
    stale one is a no-op). Nothing is flushed until every step has run; then one
    flush writes the batch. Any error raises and leaves the transaction to be
    rolled back: the caller then runs the messages one by one (`step`), where a
    value PostgreSQL refuses fails only its own execution.
    """
    now = now or dt.datetime.now(dt.UTC)
    results: dict[int, StepResult] = {}
    with session.no_autoflush:
        locked = executions.lock_many(session, [execution_id for execution_id, _ in requests])
        batch = _Batch.of(session, list(locked.values()), now)
        by_execution: dict[uuid.UUID, list[tuple[int, int]]] = defaultdict(list)
        for index, (execution_id, version) in enumerate(requests):
            by_execution[execution_id].append((version, index))
        missing = [execution_id for execution_id in by_execution if execution_id not in locked]
        held = executions.existing(session, missing)
        for execution_id in sorted(by_execution):
            execution = locked.get(execution_id)
            for version, index in sorted(by_execution[execution_id]):
                if execution is not None:
                    results[index] = _step_locked(session, batch, execution, version, now,
                                                  isolated=False)
                elif execution_id in held:
                    results[index] = StepResult("busy", next_version=version,
                                                send_at=now + BUSY_RESEND,
                                                reason="another worker holds the execution")
                else:
                    results[index] = StepResult("noop", reason="no such execution")
    session.flush()
    return [results[index] for index in range(len(requests))]


def _step_locked(session: Session, batch: _Batch, execution: WorkflowExecution,
                 expected_version: int, now: dt.datetime, *, isolated: bool) -> StepResult:
    """One step message of a locked execution (see `step` and `step_many`)."""
    if execution.status in TERMINAL_EXECUTION_STATUSES:
        return StepResult("noop", reason=f"execution is {execution.status}")
    request = batch.exits.get(execution.id)
    if request is not None:  # before the pause and version checks: any step message ends it
        return _exit(session, execution, request, _exit_node(session, batch, execution), now)
    if execution.paused_at is not None:
        return StepResult("noop", reason="execution is paused")
    if execution.state_version != expected_version:
        return StepResult("noop", reason=f"stale step {expected_version}, "
                                         f"execution is at {execution.state_version}")
    budget = get_settings().max_execution_steps
    if budget and execution.state_version >= budget:
        return _runaway(session, execution, budget, now)
    attempt = _Attempt(execution.current_node_id)
    if not isolated:
        return _advance(session, batch, execution, attempt, now)
    return _saved_or_failed(session, execution, attempt, now,
                            lambda: _advance(session, batch, execution, attempt, now))


def complete_task(session: Session, execution: WorkflowExecution, node_id: str,
                  data: dict[str, Any], now: dt.datetime) -> StepResult | None:
    """Run the waiting user or manual task `node_id` with `data` merged into its data.

    The caller has locked the execution and checked that it is active, unpaused and
    awaits `node_id`. Returns what a step would (a node that raises fails the
    execution), or None when the workflow has no such task ready (nothing written).
    """
    attempt = _Attempt(node_id)
    return _saved_or_failed(session, execution, attempt, now,
                            lambda: _complete(session, _Batch.of(session, [execution], now),
                                              execution, attempt, node_id, data, now))


def _saved_or_failed(
        session: Session, execution: WorkflowExecution, attempt: _Attempt, now: dt.datetime,
        work: Callable[[], R]) -> R | StepResult:
    """Run `work` in a savepoint; writes PostgreSQL refuses fail the execution at its node."""
    try:
        with session.begin_nested():  # the row lock taken by the caller outlives a rollback
            result = work()
            session.flush()
        return result
    except Exception as exc:
        if _is_infrastructure(exc) or (exc.__context__ is not None
                                       and _is_infrastructure(exc.__context__)):
            raise
        return _fail_unsaved(session, execution, attempt, exc, now)


def _fail_unsaved(session: Session, execution: WorkflowExecution, attempt: _Attempt,
                  exc: Exception, now: dt.datetime) -> StepResult:
    """The step's writes were refused and rolled back: fail the execution at its node."""
    node_id = attempt.node_id or "-"
    cause = getattr(exc, "orig", None) or exc  # the driver's error, not the statement text
    reason = str(exc) if isinstance(exc, state.Unstorable) else f"{type(cause).__name__}: {cause}"
    error = f"node {node_id}: the execution's state cannot be saved: {reason}"
    log.warning("execution.failed", execution_id=str(execution.id), node_id=node_id, error=error)
    session.refresh(execution)  # as it was before the step
    executions.fail(session, execution, node_id=node_id, node_type=attempt.node_type,
                    error=error, now=now)
    return StepResult("failed", node_id=node_id)


def _advance(session: Session, batch: _Batch, execution: WorkflowExecution, attempt: _Attempt,
             now: dt.datetime) -> StepResult:
    """Load, run one node and write the result (inside the step's savepoint)."""
    try:  # a definition or state that cannot be loaded fails the execution, not the worker
        workflow = _load(session, batch, execution)
        if execution.awaiting_events:
            _deliver_messages(batch, execution, workflow, now)
        task = runner.next_node(workflow)
    except Exception as exc:
        if _is_infrastructure(exc):
            raise
        return _cannot_run(session, execution, exc, now)

    result: StepResult
    if task is None:
        result = StepResult("waiting")
    else:
        node_id = task.task_spec.bpmn_id
        attempt.node_id, attempt.node_type = node_id, type(task.task_spec).__name__
        structured = _run(session, execution, workflow, task, node_id, now)
        if structured is not None:  # the node did not run to completion this step
            return structured
        result = StepResult("completed", node_id=node_id)

    return _persist(session, batch, execution, workflow, task, result, now)


def _complete(session: Session, batch: _Batch, execution: WorkflowExecution, attempt: _Attempt,
              node_id: str, data: dict[str, Any], now: dt.datetime) -> StepResult | None:
    """Load, run the human task with its data and write the result (inside a savepoint)."""
    try:
        workflow = _load(session, batch, execution)
        task = runner.human_task(workflow, node_id)
    except Exception as exc:
        if _is_infrastructure(exc):
            raise
        return _cannot_run(session, execution, exc, now)
    if task is None:
        return None
    attempt.node_type = _node_type(task)
    try:
        runner.complete_human_task(workflow, task, data)
    except Exception as exc:
        if _is_infrastructure(exc) or isinstance(exc, state.Unstorable):
            raise
        return _node_failed(session, execution, task, node_id, exc, now)
    return _persist(session, batch, execution, workflow, task,
                    StepResult("completed", node_id=node_id), now)


# An exit drops the execution's operator calls not yet run (a send deferred to the user's
# window, a call queued on the actions queue). One being run right now is skipped (SKIP
# LOCKED: its runner holds the row and may wait for this step's locks); the runner then
# finds the execution ended (workers/operators/deliveries.py).
DROP_CALLS = text(
    "UPDATE action_deliveries d SET status = 'failed', finished_at = :now, error_message = :why, "
    "send_outcome = CASE WHEN d.status = 'deferred' THEN 'dropped' ELSE d.send_outcome END "
    "FROM (SELECT key FROM action_deliveries WHERE execution_id = :e "
    "      AND status IN ('pending', 'deferred') ORDER BY key FOR UPDATE SKIP LOCKED) open "
    "WHERE d.key = open.key RETURNING d.key")


def _exit_node(session: Session, batch: _Batch, execution: WorkflowExecution) -> str | None:
    """Where the execution is when it exits: the human task or the wait it is at, else the
    node it last ran (a service task whose call is in flight or deferred is that node)."""
    if execution.awaiting_tasks:
        return str(execution.awaiting_tasks[0])
    if execution.engine_state is not None:
        try:
            waiting = runner.waiting_nodes(_load(session, batch, execution))
        except Exception:  # noqa: BLE001 - a spec that no longer loads: its last node will do
            waiting = []
        if waiting:
            return waiting[0]
    return execution.current_node_id


def _exit(session: Session, execution: WorkflowExecution, request: executions.ExitRequest,
          node_id: str | None, now: dt.datetime) -> StepResult:
    """End the execution at `node_id` (goal reached or exit_when met); drop its pending calls."""
    executions.exit_now(session, execution, request, node_id, now)
    node_id = execution.current_node_id
    why = f"dropped: the execution exited ({request.describe()})"
    dropped = list(session.execute(DROP_CALLS, {"e": execution.id, "now": now, "why": why})
                   .scalars())
    if dropped and HOOKS.drop_sends is not None:
        HOOKS.drop_sends(session, dropped, why, now)
    log.info("execution.exited", execution_id=str(execution.id), reason=str(request.reason),
             event_id=str(request.event_id) if request.event_id else None, node_id=node_id,
             dropped=len(dropped))
    return StepResult("exited", node_id=node_id, reason=request.describe())


def _runaway(session: Session, execution: WorkflowExecution, budget: int,
             now: dt.datetime) -> StepResult:
    """An execution that keeps stepping without end fails, visibly, instead of for ever."""
    node_id = execution.current_node_id or "-"
    error = (f"ran {execution.state_version} steps without ending: a loop or a call that never "
             f"ends? (FLEET_MAX_EXECUTION_STEPS={budget})")
    log.warning("execution.failed", execution_id=str(execution.id), error=error)
    executions.fail(session, execution, node_id=node_id, node_type="Budget", error=error, now=now)
    return StepResult("failed", node_id=node_id, reason=error)


def _cannot_run(session: Session, execution: WorkflowExecution, exc: Exception,
                now: dt.datetime) -> StepResult:
    """A definition or state that cannot be loaded fails the execution, not the worker."""
    node_id = execution.current_node_id or "-"
    error = f"cannot run the workflow: {exc}"
    log.warning("execution.failed", execution_id=str(execution.id), error=error)
    executions.fail(session, execution, node_id=node_id, node_type="Load", error=error, now=now)
    return StepResult("failed", node_id=node_id)


def _load(session: Session, batch: _Batch, execution: WorkflowExecution) -> Any:
    """The execution's workflow: restored from its state, or new with its start variables."""
    loaded: LoadedSpec = SPECS.get(session, execution.workflow_id,
                                   execution.workflow_version or "")
    if execution.engine_state is not None:
        return state.load(execution.engine_state, loaded)
    variables = dict(execution.variables or {})
    variables.setdefault("user", batch.users.get(execution.user_id, {}))
    return state.new_workflow(loaded, variables)


def _run(session: Session, execution: WorkflowExecution, workflow: Any, task: Any, node_id: str,
         now: dt.datetime) -> StepResult | None:
    """Run the node; returns a result when the step ends here (failure or action in flight)."""
    try:
        if runner.is_service_task(task):
            key = action_key(execution.id, task.id)
            delivery = session.get(ActionDelivery, key)
            if delivery is None:
                operator, params = runner.service_call(task)
                _check_params(params)
                session.add(ActionDelivery(key=key, execution_id=execution.id, node_id=node_id,
                                           operator=operator, params=params))
                engine_state, variables = _saved(workflow, task)
                executions.advance(session, execution, node_id=node_id,
                                   node_type=_node_type(task), outcome=StepOutcome.WAITING,
                                   engine_state=engine_state, variables=variables,
                                   wake_at=execution.wake_at,
                                   awaiting=execution.awaiting_events or (),
                                   tasks=execution.awaiting_tasks or (), completed=False,
                                   in_flight=True, now=now)
                return StepResult("waiting", node_id=node_id, action_key=key)
            if delivery.status == "deferred" and delivery.run_after is not None and (
                    delivery.run_after - now > executions.DEFERRED_GRACE):  # early: wait on
                waits = runner.waits(workflow)
                until = delivery.run_after
                executions.defer(execution, min(waits.wake_at, until) if waits.wake_at else until,
                                 now, keep_earlier=False)
                return _timer_step(StepResult("waiting", node_id=node_id),
                                   execution.state_version,
                                   runner.Waits(execution.wake_at, waits.messages), now)
            if delivery.status in ("pending", "deferred"):  # lost, slow or due: ask again
                executions.mark_enqueued(session, [execution.id], now)
                return StepResult("waiting", node_id=node_id, action_key=key)
            if delivery.status == "failed":
                raise _OperatorFailed(f"operator {delivery.operator} failed: "
                                      f"{delivery.error_message}")
            runner.complete_service_task(workflow, task, delivery.result or {})
        else:
            runner.run_node(workflow, task)
    except Exception as exc:
        if _is_infrastructure(exc) or isinstance(exc, state.Unstorable):
            raise  # retried by the task, or failed by `step` with the savepoint rolled back
        return _node_failed(session, execution, task, node_id, exc, now)
    return None


def _node_failed(session: Session, execution: WorkflowExecution, task: Any, node_id: str,
                 exc: Exception, now: dt.datetime) -> StepResult:
    """A node's failure fails the execution, not the worker."""
    error = f"node {node_id}: {exc}"
    log.warning("execution.failed", execution_id=str(execution.id), node_id=node_id, error=error)
    executions.fail(session, execution, node_id=node_id, node_type=_node_type(task), error=error,
                    now=now)
    return StepResult("failed", node_id=node_id)


class _OperatorFailed(Exception):
    pass


def _check_params(params: dict[str, Any]) -> None:
    """Operator parameters are stored as evaluated (jsonb): refuse what cannot be."""
    for name, value in params.items():
        try:
            check_storable(f"parameter {name!r}", value, extra=())
        except Refused as exc:
            raise state.Unstorable(str(exc)) from None


def _saved(workflow: Any, task: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Engine state and variables, refused (state.Unstorable) if PostgreSQL would refuse them."""
    engine_state = state.dump(workflow)
    try:
        variables = runner.variables(workflow, task)
    except (TypeError, ValueError, RecursionError) as exc:
        raise state.Unstorable(f"the variables cannot be stored: {exc}") from None
    state.check_json(variables, "the variables")
    return engine_state, variables


def _node_type(task: Any) -> str:
    return type(task.task_spec).__name__


def _is_infrastructure(exc: BaseException) -> bool:
    """Database and broker trouble is retried by the task, not blamed on the node."""
    return is_transient(exc)


def _persist(session: Session, batch: _Batch, execution: WorkflowExecution, workflow: Any,
             task: Any, result: StepResult, now: dt.datetime) -> StepResult:
    """Save state and waits after a node ran (or none was ready); decide the next step."""
    if result.node_id is not None:  # a wait the node began may catch a pending message
        _look_back(session, batch, execution, workflow, now)
        _deliver_messages(batch, execution, workflow, now)
    has_next = runner.next_node(workflow) is not None  # also runs control tasks left over
    completed = workflow.is_completed()
    waits = runner.waits(workflow) if not completed else runner.Waits(None, ())
    tasks = runner.human_tasks(workflow) if not completed else ()
    stalled = not (completed or has_next or tasks or waits.wake_at or waits.messages)
    if result.node_id is None:  # nothing ran: only the waits change, the version stays
        if stalled:
            return _stall(session, execution, workflow, None, now)
        executions.save_waits(execution, engine_state=state.dump(workflow),
                              wake_at=waits.wake_at, awaiting=waits.messages, tasks=tasks,
                              completed=completed, in_flight=has_next, now=now)
        if has_next:
            return StepResult("waiting", next_version=execution.state_version)
        return _timer_step(StepResult("waiting"), execution.state_version, waits, now)

    engine_state, variables = _saved(workflow, task)
    version = executions.advance(session, execution, node_id=result.node_id,
                                 node_type=_node_type(task), outcome=StepOutcome.COMPLETED,
                                 engine_state=engine_state, variables=variables,
                                 wake_at=waits.wake_at, awaiting=waits.messages, tasks=tasks,
                                 completed=completed, in_flight=has_next, now=now)
    if stalled:
        return _stall(session, execution, workflow, result.node_id, now)
    if has_next:
        return StepResult("completed", node_id=result.node_id, next_version=version)
    return _timer_step(StepResult("completed", node_id=result.node_id), version, waits, now)


def _timer_step(result: StepResult, version: int, waits: runner.Waits,
                now: dt.datetime) -> StepResult:
    """A timer due within the horizon is also sent as a step message delayed until then.

    `wake_at` stays the durable record and the beat's sweep the recovery path: a
    delayed message that is lost, early or a duplicate changes nothing (an early one
    finds no node ready and schedules itself again; the version check drops the rest).
    Timers further ahead live in PostgreSQL only (`FLEET_TIMER_MESSAGE_HORIZON`).
    """
    horizon = get_settings().timer_message_seconds
    if waits.wake_at is None or horizon <= 0:
        return result
    if waits.wake_at - now > dt.timedelta(seconds=horizon):
        return result
    return replace(result, next_version=version, send_at=waits.wake_at)


def _stall(session: Session, execution: WorkflowExecution, workflow: Any, node_id: str | None,
           now: dt.datetime) -> StepResult:
    """Nothing is ready, due, awaited or in flight: mark the execution stalled, send nothing."""
    node = execution.current_node_id or "-"
    reason = f"stalled at node {node}: {runner.stall_reason(workflow)}"
    log.warning("execution.stalled", execution_id=str(execution.id), reason=reason)
    executions.stall(session, execution, engine_state=state.dump(workflow), reason=reason,
                     now=now)
    return StepResult("stalled", node_id=node_id, reason=reason)
