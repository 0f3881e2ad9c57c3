"""`fleet workflow ...` (definitions) and `fleet execution ...` (running instances)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
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
from db.session import read_session, session_scope
from workers.cli.context import ensure_servers, err, json_object_option, out
from workers.cli.definitions import print_report
from workers.cli.ids import resolve_id
from workers.cli.output import id_column, print_json, utc
from workers.engine import control, executions
from workers.events.envelope import normalise_email
from workers.sends.gateway import sends_of

workflow_app = typer.Typer(help="BPMN workflow definitions.", no_args_is_help=True)
execution_app = typer.Typer(help="Workflow executions.", no_args_is_help=True)
ID_ARGUMENT = typer.Argument(..., help="the execution's id or a unique prefix of it (4+ hex)")


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
        err.print(f"[red]not deployed:[/] {exc}")
        raise typer.Exit(2) from None
    print_report(report)


@workflow_app.command("status")
def set_status(name: str, status: str = typer.Argument(..., help="/".join(WORKFLOW_STATUSES))) -> None:
    """Set a workflow's status (only active workflows are started by triggers)."""
    if status not in WORKFLOW_STATUSES:
        err.print(f"[red]status must be one of {', '.join(WORKFLOW_STATUSES)}[/]")
        raise typer.Exit(2)
    ensure_servers()
    with session_scope() as session:
        changed = session.execute(update(Workflow).where(Workflow.name == name)
                                  .values(status=status, updated_at=func.now())).rowcount  # type: ignore[attr-defined]
    if not changed:
        err.print(f"[red]no workflow named {name!r}[/]")
        raise typer.Exit(1)
    out.print(f"{name}: {status}", markup=False, highlight=False)


@workflow_app.command("list")
def workflow_list(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Workflows with version, status and executions by status."""
    ensure_servers()
    with session_scope() as session:
        counts: dict[uuid.UUID, dict[str, int]] = {}
        for wid, status, n in session.execute(
                select(WorkflowExecution.workflow_id, WorkflowExecution.status, func.count())
                .group_by(WorkflowExecution.workflow_id, WorkflowExecution.status)):
            counts.setdefault(wid, {})[status] = n
        rows: list[dict[str, Any]] = [{"id": wf.id, "name": wf.name, "version": wf.version, "status": wf.status,
                 "stages": list(wf.lifecycle_stages or []),
                 "executions": dict(sorted(counts.get(wf.id, {}).items()))}
                for wf in session.execute(select(Workflow).order_by(Workflow.name)).scalars()]
    if as_json:
        print_json(rows)
        return
    table = Table("name", "version", "status", "stages", "executions")
    for row in rows:
        by_status = ", ".join(f"{k} {v}" for k, v in row["executions"].items())
        table.add_row(row["name"], row["version"], row["status"], ",".join(row["stages"]),
                      by_status or "-")
    out.print(table)


@workflow_app.command("report")
def report(
    name: str = typer.Argument(..., help="workflow name"),
    version: str | None = typer.Option(None, help="the version (default: the current one)"),
    days: int = typer.Option(30, help="executions started in this many days back (0: all)"),
    svg: Path | None = typer.Option(None, dir_okay=False,
                                    help="also write the workflow drawn with its counts (SVG)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Per node: executions that reached it, completed it, failed or wait there, and the median
    time spent; executions between nodes; outcomes; goal conversion, treated vs held out."""
    ensure_servers(broker=False)
    from workers.cli.metrics import conversion_table
    from workers.reports.diagram import workflow_svg
    from workers.reports.nodes import ReportError, workflow_report

    try:
        with read_session() as session:  # the replica when DATABASE_READ_URL is set
            found = workflow_report(session, name, version, days or None)
    except ReportError as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from None
    if svg is not None:
        svg.write_text(workflow_svg(found), encoding="utf-8")
        err.print(f"diagram written to {svg}")
    if as_json:
        print_json(found.to_json())
        return
    period = f"started in the last {days} days" if days else "all"
    outcomes = ", ".join(f"{k} {v}" for k, v in found.outcomes.items() if v) or "none"
    out.print(f"{found.workflow} v{found.version}: {found.executions} executions ({period}): "
              f"{outcomes}", markup=False, highlight=False, soft_wrap=True)
    nodes = Table("node", "name", "kind", "reached", "completed", "waiting", "failed", "stalled",
                  "exited", "median", title="executions at each node")
    for n in found.nodes:
        median = "-" if n.median_seconds is None else f"{n.median_seconds:.1f}s"
        nodes.add_row(n.node_id, escape(n.name or ""), n.kind, str(n.reached), str(n.completed),
                      str(n.waiting), str(n.failed), str(n.stalled), str(n.exited), median)
    out.print(nodes)
    edges = Table("from", "to", "executions", "of from", "drop-off", "drawn",
                  title="executions from node to node")
    for e in found.edges:
        edges.add_row(e.source, e.target, str(e.executions),
                      "-" if e.share is None else f"{e.share:.0%}",
                      "-" if e.drop_off is None else f"{e.drop_off:.0%}",
                      "yes" if e.drawn else "no")
    out.print(edges)
    if found.conversion is not None:
        out.print(conversion_table([found.conversion]))


def _execution_json(session: Session, row: WorkflowExecution, steps: int) -> dict[str, Any]:
    wf = session.get(Workflow, row.workflow_id)
    history = session.execute(select(ExecutionStep).where(ExecutionStep.execution_id == row.id)
                              .order_by(ExecutionStep.seq.desc()).limit(steps)).scalars().all()
    return {
        "id": row.id, "workflow": wf.name if wf else None, "workflow_id": row.workflow_id,
        "workflow_version": row.workflow_version, "user_id": row.user_id,
        "status": row.status, "paused_at": utc(row.paused_at), "stalled_at": utc(row.stalled_at),
        "node": row.current_node_id, "state_version": row.state_version,
        "started_at": utc(row.started_at), "completed_at": utc(row.completed_at),
        "wake_at": utc(row.wake_at), "awaiting_events": list(row.awaiting_events or []),
        "awaiting_tasks": list(row.awaiting_tasks or []),
        "pending_messages": [{"event_type": m.event_type, "event_id": m.event_id,
                              "received_at": utc(m.received_at)}
                             for m in executions.pending_messages(session, row.id)],
        "error": row.error_message, "variables": row.variables or {},
        "sends": [{**send, **{k: utc(send[k]) for k in ("created_at", "decided_at", "sent_at",
                                                        "deferred_until")}}
                  for send in sends_of(session, row.id)],
        "steps": [{"seq": s.seq, "node_id": s.node_id, "node_type": s.node_type,
                   "outcome": s.outcome, "attempt": s.attempt,
                   "started_at": utc(s.started_at), "finished_at": utc(s.finished_at),
                   "duration_seconds": ((s.finished_at - s.started_at).total_seconds()
                                        if s.finished_at else None),
                   "error": s.error_message} for s in reversed(history)],
    }


@execution_app.command("show")
def show(execution_id: str = ID_ARGUMENT,
         steps: int = typer.Option(50, help="history rows to show"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Status, current node, waits, variables and step history of one execution."""
    ensure_servers()
    with session_scope() as session:
        row = session.get(WorkflowExecution, resolve_id(session, WorkflowExecution, execution_id))
        assert row is not None
        data = _execution_json(session, row, steps)
    if as_json:
        print_json(data)
        return
    status = data["status"] + (" (paused)" if data["paused_at"] else "")
    lines = [f"execution {data['id']}",
             f"  workflow  {data['workflow'] or data['workflow_id']} v{data['workflow_version']}",
             f"  user      {data['user_id'] or '-'}", f"  status    {status}",
             f"  node      {data['node'] or '-'}", f"  version   {data['state_version']}",
             f"  started   {data['started_at']}", f"  finished  {data['completed_at'] or '-'}"]
    if data["wake_at"]:
        lines.append(f"  wakes at  {data['wake_at']}")
    if data["awaiting_events"]:
        lines.append(f"  waits for {', '.join(data['awaiting_events'])}")
    for message in data["pending_messages"]:  # not caught (yet)
        lines.append(f"  pending   {message['event_type']} {message['event_id']} "
                     f"(received {message['received_at']}, not caught)")
    if data["awaiting_tasks"]:
        lines.append(f"  awaits    {', '.join(data['awaiting_tasks'])} "
                     f"(fleet execution complete {data['id']} NODE [--data JSON])")
    out.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
    if data["stalled_at"]:
        out.print(f"  [red]stalled   since {data['stalled_at']}: {escape(data['error'] or '')}[/]\n"
                  f"  (fleet execution retry {data['id']} once fixed, or cancel it)",
                  soft_wrap=True)
    elif data["error"]:
        out.print(f"  [red]error     {escape(data['error'])}[/]", soft_wrap=True)
    out.print("variables:")
    out.print_json(json.dumps(data["variables"], default=str))
    if data["sends"]:
        sends = Table("node", "channel", "outcome", "reason", "decided", "sent", "deferrals",
                      title="sends (the send gateway's latest decision per operator call)")
        for send in data["sends"]:
            outcome = send["outcome"] + (" (transactional)" if send["transactional"] else "")
            if send["outcome"] == "deferred":
                outcome += f" until {send['deferred_until'][:19].replace('T', ' ')}"
            sends.add_row(send["node_id"] or "-", send["channel"], outcome,
                          escape(send["reason"] or ""),
                          send["decided_at"][:19].replace("T", " "),
                          (send["sent_at"] or "-")[:19].replace("T", " "), str(send["deferrals"]))
        out.print(sends)
    table = Table("seq", "node", "type", "outcome", "attempt", "started", "s", "error")
    for s in data["steps"]:
        seconds = s["duration_seconds"]
        table.add_row(str(s["seq"]), s["node_id"], s["node_type"], s["outcome"], str(s["attempt"]),
                      s["started_at"][:19].replace("T", " "),
                      f"{seconds:.3f}" if seconds is not None else "-", escape(s["error"] or ""))
    out.print(table)


@execution_app.command("list")
def execution_list(
    workflow: str | None = typer.Option(None, help="workflow name"),
    status: str | None = typer.Option(None, help="/".join(ExecutionStatus)),
    user: str | None = typer.Option(None, help="only this user's (email or id)"),
    limit: int = typer.Option(20),
    as_json: bool = typer.Option(False, "--json", help="print JSON (whole error messages)"),
) -> None:
    """The latest executions, optionally of one workflow, status or user."""
    ensure_servers()
    with session_scope() as session:
        query = (select(WorkflowExecution, Workflow.name, User.email)
                 .join(Workflow, Workflow.id == WorkflowExecution.workflow_id)
                 .outerjoin(User, User.id == WorkflowExecution.user_id)
                 .order_by(WorkflowExecution.started_at.desc()).limit(limit))
        if workflow:
            query = query.where(Workflow.name == workflow)
        if status:
            query = query.where(WorkflowExecution.status == status)
        if user:
            query = query.where(WorkflowExecution.user_id == _user_id(session, user))
        rows: list[dict[str, Any]] = [{"id": row.id, "workflow": name, "workflow_version": row.workflow_version,
                 "user_id": row.user_id, "user_email": email, "status": row.status,
                 "paused": row.paused_at is not None, "stalled": row.stalled_at is not None,
                 "node": row.current_node_id, "started_at": utc(row.started_at),
                 "completed_at": utc(row.completed_at), "error": row.error_message}
                for row, name, email in session.execute(query)]
    if as_json:
        print_json(rows)
        return
    table = Table(id_column(), "workflow", "user", "status", "node", "started", "error")
    for row in rows:
        marks = (" (paused)" if row["paused"] else "") + (" (stalled)" if row["stalled"] else "")
        error = row["error"] or ""
        table.add_row(str(row["id"]), row["workflow"], row["user_email"] or str(row["user_id"] or "-"),
                      row["status"] + marks, row["node"] or "-",
                      row["started_at"][:19].replace("T", " "),
                      escape(error[:60] + ("…" if len(error) > 60 else "")))
    out.print(table)


def _control(execution_id: str, action: Callable[[Session, uuid.UUID], int | None],
             done: str) -> uuid.UUID:
    """Run a control action on the execution an id (or prefix) names; returns its whole id."""
    ensure_servers()
    # After ensure_servers(): the Celery app reads the broker's URL from the settings when
    # first imported, and an embedded broker's URL is known only now.
    from workers.engine.dispatch import send_step

    try:
        with session_scope() as session:
            whole = resolve_id(session, WorkflowExecution, execution_id)
            version = action(session, whole)
    except control.ControlError as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from None
    if version is not None:
        send_step(whole, version)
    out.print(f"{whole}: {done}", markup=False, highlight=False)
    return whole


@execution_app.command("cancel")
def cancel(execution_id: str = ID_ARGUMENT) -> None:
    """Stop an execution for good; pending timers and waits are dropped."""
    _control(execution_id, control.cancel, "cancelled")


@execution_app.command("pause")
def pause(execution_id: str = ID_ARGUMENT) -> None:
    """Hold an execution: no step runs and no timer wakes it until it is resumed."""
    _control(execution_id, control.pause, "paused")


@execution_app.command("resume")
def resume(execution_id: str = ID_ARGUMENT) -> None:
    """Continue a paused execution where it stopped."""
    _control(execution_id, control.resume, "resumed")


@execution_app.command("retry")
def retry(execution_id: str = ID_ARGUMENT) -> None:
    """Run a failed execution again from the node that failed, or a stalled one where it stopped."""
    _control(execution_id, control.retry, "retrying where it stopped")


@execution_app.command("complete")
def complete(
    execution_id: str = ID_ARGUMENT,
    node: str = typer.Argument(..., help="the user or manual task's node id (see `show`)"),
    data: str = typer.Option("{}", help="a JSON object merged into the task's data"),
) -> None:
    """Complete a user or manual task the execution waits for; the workflow goes on."""
    values = json_object_option(data)
    whole = _control(execution_id,
                     lambda session, eid: control.complete(session, eid, node, values),
                     f"{node} completed")
    with session_scope() as session:
        row = session.get(WorkflowExecution, whole)
        if row is not None and row.status == ExecutionStatus.FAILED:
            err.print(f"[red]the execution failed: {row.error_message}[/]")
            raise typer.Exit(1)


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
        err.print(f"[red]no user with email or id {user!r}[/]")
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
    variables = json_object_option(data)
    ensure_servers()
    # After ensure_servers(): the Celery app reads the broker's URL from the settings when
    # first imported, and an embedded broker's URL is known only now.
    from workers.engine.dispatch import send_step

    try:
        with session_scope() as session:
            execution_id = control.start(session, workflow, _user_id(session, user),
                                         variables, key=key)
    except control.ControlError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    send_step(execution_id, 0)
    typer.echo(execution_id)
