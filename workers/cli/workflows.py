"""`fleet workflow ...` (definitions) and `fleet execution ...` (running instances)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import typer
from rich.table import Table
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import WORKFLOW_STATUSES, ExecutionStatus, ExecutionStep, Workflow, WorkflowExecution
from db.session import session_scope
from workers.cli.context import console, ensure_servers
from workers.cli.definitions import print_report
from workers.engine import control

workflow_app = typer.Typer(help="BPMN workflow definitions.", no_args_is_help=True)
execution_app = typer.Typer(help="Workflow executions.", no_args_is_help=True)


@workflow_app.command("deploy")
def deploy(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="a .bpmn file"),
    name: str = typer.Option(..., help="workflow name (a new BPMN for a name is a new version)"),
    stages: str = typer.Option("", help="comma-separated lifecycle stages, e.g. Activation"),
    activate: bool = typer.Option(False, help="make it active (triggers start it)"),
    description: str | None = typer.Option(None),
) -> None:
    """Validate a BPMN file and store it; running executions keep their version."""
    ensure_servers()
    # Here, not at the top: parsing BPMN loads SpiffWorkflow and lxml (~0.2 s), which
    # the other commands do without.
    from workers.definitions import DefinitionError, deploy_workflow

    try:
        with session_scope() as session:
            report = deploy_workflow(session, name, file.read_text(), description=description,
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
        if row.error_message:
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
            table.add_row(str(row.id), name, row.status + (" (paused)" if row.paused_at else ""),
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
    """Run a failed execution again from the node that failed."""
    _control(execution_id, control.retry, "retrying from its failed node")
