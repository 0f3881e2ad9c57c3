"""`fleet workflow ...` (definitions) and `fleet execution ...` (running instances)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import (
    WORKFLOW_STATUSES,
    ExecutionStatus,
    ExecutionStep,
    User,
    Workflow,
    WorkflowExecution,
)
from db.session import session_scope
from workers.cli.context import console, ensure_servers
from workers.cli.definitions import print_report
from workers.engine import control, executions
from workers.events.envelope import normalise_email

workflow_app = typer.Typer(help="BPMN workflow definitions.", no_args_is_help=True)
execution_app = typer.Typer(help="Workflow executions.", no_args_is_help=True)


@workflow_app.command("deploy")
def deploy(
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False,
                                       help="the main .bpmn file, then the files of the "
                                            "processes its call activities call"),
    name: str = typer.Option(..., help="workflow name (a new BPMN for a name is a new version)"),
    process: str | None = typer.Option(
        None, help="the process to run (default: the main file's one executable process "
                   "that no call activity calls)"),
    stages: str = typer.Option("", help="comma-separated lifecycle stages, e.g. Activation"),
    activate: bool = typer.Option(False, help="make it active (triggers start it)"),
    description: str | None = typer.Option(None),
) -> None:
    """Validate BPMN files and store them as one workflow; running executions keep their version."""
    ensure_servers()
    # Here, not at the top: parsing BPMN loads SpiffWorkflow and lxml (~0.2 s), which
    # the other commands do without.
    from workers.definitions import DefinitionError, deploy_workflow, read_source

    try:
        source = read_source(files, process)
        with session_scope() as session:
            report = deploy_workflow(session, name, source.xml, others=source.others,
                                     process_id=source.process_id, description=description,
                                     stages=[s.strip() for s in stages.split(",") if s.strip()],
                                     activate=activate)
    except DefinitionError as exc:
        console.print(f"[red]not deployed:[/] {exc}")
        raise typer.Exit(2) from None
    print_report(report)


@workflow_app.command("status")
def set_status(name: str, status: str = typer.Argument(..., help="/".join(WORKFLOW_STATUSES))) -> None:
    """Set a workflow's status (only active workflows are started by triggers)."""
    if status not in WORKFLOW_STATUSES:
        console.print(f"[red]status must be one of {', '.join(WORKFLOW_STATUSES)}[/]")
        raise typer.Exit(2)
    ensure_servers()
    with session_scope() as session:
        changed = session.execute(update(Workflow).where(Workflow.name == name)
                                  .values(status=status, updated_at=func.now())).rowcount  # type: ignore[attr-defined]
    if not changed:
        console.print(f"[red]no workflow named {name!r}[/]")
        raise typer.Exit(1)
    console.print(f"{name}: {status}")


@workflow_app.command("list")
def workflow_list() -> None:
    """Workflows with version, status and executions by status."""
    ensure_servers()
    table = Table("name", "version", "status", "stages", "executions")
    with session_scope() as session:
        counts: dict[uuid.UUID, dict[str, int]] = {}
        for wid, status, n in session.execute(
                select(WorkflowExecution.workflow_id, WorkflowExecution.status, func.count())
                .group_by(WorkflowExecution.workflow_id, WorkflowExecution.status)):
            counts.setdefault(wid, {})[status] = n
        for wf in session.execute(select(Workflow).order_by(Workflow.name)).scalars():
            by_status = ", ".join(f"{k} {v}" for k, v in sorted(counts.get(wf.id, {}).items()))
            table.add_row(wf.name, wf.version, wf.status, ",".join(wf.lifecycle_stages or []),
                          by_status or "-")
    console.print(table)


@execution_app.command("show")
def show(execution_id: uuid.UUID, steps: int = typer.Option(50, help="history rows to show")) -> None:
    """Status, current node, waits, variables and step history of one execution."""
    ensure_servers()
    with session_scope() as session:
        row = session.get(WorkflowExecution, execution_id)
        if row is None:
            console.print(f"[red]no execution {execution_id}[/]")
            raise typer.Exit(1)
        wf = session.get(Workflow, row.workflow_id)
        status = row.status + (" (paused)" if row.paused_at else "")
        console.print(f"execution {row.id}\n  workflow  {wf.name if wf else row.workflow_id} "
                      f"v{row.workflow_version}\n  status    {status}\n"
                      f"  node      {row.current_node_id or '-'}\n  version   {row.state_version}\n"
                      f"  started   {row.started_at}\n  finished  {row.completed_at or '-'}")
        if row.wake_at:
            console.print(f"  wakes at  {row.wake_at}")
        if row.awaiting_events:
            console.print(f"  waits for {', '.join(row.awaiting_events)}")
        for message in executions.pending_messages(session, row.id):  # not caught (yet)
            console.print(f"  pending   {message.event_type} {message.event_id} "
                          f"(received {message.received_at}, not caught)")
        if row.awaiting_tasks:
            console.print(f"  awaits    {', '.join(row.awaiting_tasks)} "
                          f"(fleet execution complete {row.id} NODE [--data JSON])")
        if row.stalled_at:
            console.print(f"  [red]stalled   since {row.stalled_at}: {row.error_message}[/]\n"
                          f"  (fleet execution retry {row.id} once fixed, or cancel it)")
        elif row.error_message:
            console.print(f"  [red]error     {row.error_message}[/]")
        console.print("variables:")
        console.print_json(json.dumps(row.variables or {}, default=str))
        table = Table("seq", "node", "type", "outcome", "attempt", "started", "ms", "error")
        history = session.execute(select(ExecutionStep).where(ExecutionStep.execution_id == row.id)
                                  .order_by(ExecutionStep.seq.desc()).limit(steps)).scalars().all()
        for s in reversed(history):
            ms = ((s.finished_at - s.started_at).total_seconds() * 1000) if s.finished_at else None
            table.add_row(str(s.seq), s.node_id, s.node_type, s.outcome, str(s.attempt),
                          s.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                          f"{ms:.1f}" if ms is not None else "-", s.error_message or "")
        console.print(table)


@execution_app.command("list")
def execution_list(
    workflow: str | None = typer.Option(None, help="workflow name"),
    status: str | None = typer.Option(None, help="/".join(ExecutionStatus)),
    limit: int = typer.Option(20),
) -> None:
    """The latest executions, optionally of one workflow or status."""
    ensure_servers()
    table = Table("id", "workflow", "status", "node", "started", "error")
    with session_scope() as session:
        query = (select(WorkflowExecution, Workflow.name)
                 .join(Workflow, Workflow.id == WorkflowExecution.workflow_id)
                 .order_by(WorkflowExecution.started_at.desc()).limit(limit))
        if workflow:
            query = query.where(Workflow.name == workflow)
        if status:
            query = query.where(WorkflowExecution.status == status)
        for row, name in session.execute(query):
            marks = (" (paused)" if row.paused_at else "") + (" (stalled)" if row.stalled_at else "")
            table.add_row(str(row.id), name, row.status + marks,
                          row.current_node_id or "-", str(row.started_at)[:19],
                          (row.error_message or "")[:60])
    console.print(table)


def _control(execution_id: uuid.UUID, action: Callable[[Session, uuid.UUID], int | None],
             done: str) -> None:
    ensure_servers()
    # After ensure_servers(): the Celery app reads the broker's URL from the settings when
    # first imported, and an embedded broker's URL is known only now.
    from workers.engine.dispatch import send_step

    try:
        with session_scope() as session:
            version = action(session, execution_id)
    except control.ControlError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    if version is not None:
        send_step(execution_id, version)
    console.print(f"{execution_id}: {done}")


@execution_app.command("cancel")
def cancel(execution_id: uuid.UUID) -> None:
    """Stop an execution for good; pending timers and waits are dropped."""
    _control(execution_id, control.cancel, "cancelled")


@execution_app.command("pause")
def pause(execution_id: uuid.UUID) -> None:
    """Hold an execution: no step runs and no timer wakes it until it is resumed."""
    _control(execution_id, control.pause, "paused")


@execution_app.command("resume")
def resume(execution_id: uuid.UUID) -> None:
    """Continue a paused execution where it stopped."""
    _control(execution_id, control.resume, "resumed")


@execution_app.command("retry")
def retry(execution_id: uuid.UUID) -> None:
    """Run a failed execution again from the node that failed, or a stalled one where it stopped."""
    _control(execution_id, control.retry, "retrying where it stopped")


@execution_app.command("complete")
def complete(
    execution_id: uuid.UUID,
    node: str = typer.Argument(..., help="the user or manual task's node id (see `show`)"),
    data: str = typer.Option("{}", help="a JSON object merged into the task's data"),
) -> None:
    """Complete a user or manual task the execution waits for; the workflow goes on."""
    values = _data_object(data)
    _control(execution_id, lambda session, eid: control.complete(session, eid, node, values),
             f"{node} completed")
    with session_scope() as session:
        row = session.get(WorkflowExecution, execution_id)
        if row is not None and row.status == ExecutionStatus.FAILED:
            console.print(f"[red]the execution failed: {row.error_message}[/]")
            raise typer.Exit(1)


def _data_object(data: str) -> dict[str, Any]:
    """The `--data` option's JSON object; anything else exits 2 with one line."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        console.print(f"[red]--data is not JSON: {exc}[/]")
        raise typer.Exit(2) from None
    if not isinstance(value, dict):
        console.print(f"[red]--data must be a JSON object, not {type(value).__name__}[/]")
        raise typer.Exit(2)
    return value


def _user_id(session: Session, user: str) -> uuid.UUID:
    """The id of the user named by email (in the form ingest stores) or id; exits 1 if none."""
    try:
        by_id: uuid.UUID | None = uuid.UUID(user)
    except ValueError:
        by_id = None
    found = session.execute(select(User.id).where(
        User.id == by_id if by_id is not None else User.email == normalise_email(user))
    ).scalar_one_or_none()
    if found is None:
        console.print(f"[red]no user with email or id {user!r}[/]")
        raise typer.Exit(1)
    return found


@execution_app.command("start")
def start(
    workflow: str = typer.Argument(..., help="workflow name (its current, active version runs)"),
    user: str = typer.Option(..., help="the user's email or id"),
    data: str = typer.Option("{}", help="a JSON object: the execution's start variables"),
    key: str | None = typer.Option(None, help="idempotency key: a repeat with the same key "
                                   "starts nothing and prints the first execution's id"),
) -> None:
    """Start one execution by hand; prints its id. Its variables: those of --data, and `user`
    (added by the first step, as for a trigger's start)."""
    variables = _data_object(data)
    ensure_servers()
    # After ensure_servers(): the Celery app reads the broker's URL from the settings when
    # first imported, and an embedded broker's URL is known only now.
    from workers.engine.dispatch import send_step

    try:
        with session_scope() as session:
            execution_id = control.start(session, workflow, _user_id(session, user),
                                         variables, key=key)
    except control.ControlError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    send_step(execution_id, 0)
    typer.echo(execution_id)
