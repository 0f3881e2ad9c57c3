"""`fleet schedule ...`: scheduled audience journeys (defined in the program's `schedules:`)."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import typer
from rich.markup import escape
from rich.table import Table

from db.session import session_scope
from workers.cli.context import ensure_servers, err, out
from workers.cli.output import duration, print_json, utc
from workers.schedules import runs

schedule_app = typer.Typer(help="Scheduled audience journeys.", no_args_is_help=True)


def _when(when: runs.When) -> str:
    if when.trigger_type == "cron":
        return f"cron {when.cron_expression} {when.timezone}"
    if when.trigger_type == "interval":
        return f"every {duration(when.interval_seconds)}"
    return "manual"


def _progress(run: runs.RunView | None) -> str:
    if run is None:
        return "-"
    text = f"{run.status}: {run.started} started, {run.skipped} skipped, {run.batches} batches"
    return f"{text} ({run.error})" if run.error else text


def _time(value: dt.datetime | None) -> str:
    stamp = utc(value)
    return stamp[:19].replace("T", " ") if stamp else "-"


def _fail(exc: runs.ScheduleError) -> typer.Exit:
    err.print(f"[red]{escape(str(exc))}[/]")
    return typer.Exit(1)


def _send(messages: list[runs.RunMessage]) -> None:
    # Lazy: the task module loads the Celery app, which `list` does without.
    from tasks.schedules import send_run

    for message in messages:
        send_run(message)


@schedule_app.command("list")
def schedule_list(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Every schedule: workflow, audience, when, next run, and its last run's progress."""
    ensure_servers(broker=False)
    with session_scope() as session:
        found = runs.schedules(session)
    if as_json:
        print_json([s.to_json() for s in found])
        return
    table = Table("name", "workflow", "audience", "when", "state", "next run (UTC)",
                  "last run (UTC)", "last run's progress")
    for s in found:
        table.add_row(escape(s.name), escape(s.workflow), escape(s.segment or "everyone"),
                      escape(_when(s.when)), "paused" if s.paused else "active",
                      _time(s.next_run_at), _time(s.last_run_at), escape(_progress(s.last_run)))
    out.print(table)


@schedule_app.command("run")
def schedule_run(
    name: str,
    wait: bool = typer.Option(False, "--wait", help="wait for the run to end, showing progress"),
    timeout: float = typer.Option(600.0, help="seconds to wait with --wait"),
) -> None:
    """Run a schedule now (any kind, `manual` ones included); prints the run's id."""
    ensure_servers()
    try:
        with session_scope() as session:
            message = runs.start_manual(session, name, dt.datetime.now(dt.UTC))
    except runs.ScheduleError as exc:
        raise _fail(exc) from None
    _send([message])
    out.print(str(message.run_id), markup=False, highlight=False)
    if wait:
        _wait(message.run_id, timeout)


def _wait(run_id: uuid.UUID, timeout: float) -> None:
    """Progress on stderr until the run ends; exit 1 if it failed or the time ran out."""
    deadline = time.monotonic() + timeout
    shown = ""
    while True:
        with session_scope() as session:
            run = runs.run_view(session, run_id)
        line = _progress(run)
        if line != shown:
            err.print(line, markup=False, highlight=False)
            shown = line
        if run is not None and run.status != "running":
            if run.status == "failed":
                raise typer.Exit(1)
            return
        if time.monotonic() > deadline:
            err.print(f"[red]still running after {timeout:g}s[/]")
            raise typer.Exit(1)
        time.sleep(0.5)


@schedule_app.command("pause")
def schedule_pause(name: str) -> None:
    """Start no run of the schedule; a running run stops at its next batch."""
    ensure_servers(broker=False)
    try:
        with session_scope() as session:
            changed = runs.pause(session, name, dt.datetime.now(dt.UTC))
    except runs.ScheduleError as exc:
        raise _fail(exc) from None
    out.print(f"schedule {name} {'paused' if changed else 'was already paused'}",
              markup=False, highlight=False)


@schedule_app.command("resume")
def schedule_resume(name: str) -> None:
    """Resume a paused schedule: its running run goes on; run times missed meanwhile are skipped."""
    ensure_servers()
    try:
        with session_scope() as session:
            messages = runs.resume(session, name, dt.datetime.now(dt.UTC))
    except runs.ScheduleError as exc:
        raise _fail(exc) from None
    if messages is None:
        out.print(f"schedule {name} was not paused", markup=False, highlight=False)
        return
    _send(messages)
    out.print(f"schedule {name} resumed" + (f" ({len(messages)} run going on)" if messages else ""),
              markup=False, highlight=False)
