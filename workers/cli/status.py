"""`fleet status`: a one-screen view of the fleet: workers, queues, and what the database says."""

from __future__ import annotations

import dataclasses

import typer
from rich.markup import escape
from rich.table import Table

from db.session import read_session
from workers.broker import queue_depths
from workers.cli.context import ensure_servers, err, out
from workers.cli.output import print_json, utc
from workers.health import DatabaseFigures, database_figures, workers_by_queue
from workers.queues import QUEUE_NAMES


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def status(timeout: float = typer.Option(1.0, help="Seconds to wait for workers to answer."),
           as_json: bool = typer.Option(False, "--json", help="print JSON"),
           ) -> None:
    """Workers and queue depths, executions by status (and stalled), timers, dead letters,
    outbox backlog and partition coverage (exit 1 if partitions are missing or the database
    is unreachable)."""
    settings = ensure_servers()
    # After ensure_servers(): the Celery app reads the broker's URL from the settings when
    # first imported, and an embedded broker's URL is known only now.
    from workers.celery_app import app

    broker_error: str | None = None
    try:
        depths: dict[str, int] | None = queue_depths(settings.broker_url or "",
                                                     settings.broker_key_prefix)
        seen = workers_by_queue(app, timeout)
    except Exception as exc:  # the database part is still worth showing
        broker_error = _first_line(exc)
        err.print(f"[red]broker unreachable[/]: {escape(broker_error)}")
        depths, seen = None, {}
    try:
        with read_session() as session:  # the replica when DATABASE_READ_URL is set
            figures = database_figures(session)
    except Exception as exc:
        err.print(f"[red]database unreachable[/]: {escape(_first_line(exc))}")
        raise typer.Exit(1) from None
    if as_json:
        print_json({
            "broker_error": broker_error,
            "queues": None if depths is None else [
                {"queue": queue, "waiting": depths[queue], "workers": seen.get(queue, [])}
                for queue in QUEUE_NAMES],
            "workers_answering": len({host for hosts in seen.values() for host in hosts}),
            "executions": figures.executions, "stalled_executions": figures.stalled,
            "oldest_due_timer": utc(figures.oldest_due_timer),
            "timer_lag_seconds": figures.timer_lag,
            "dead_letters_pending": figures.dead_letters_pending,
            "outbox_backlog": figures.outbox_backlog, "outbox_oldest": utc(figures.outbox_oldest),
            "partitions": [dataclasses.asdict(part) for part in figures.partitions],
            "partitions_missing": figures.partitions_missing,
        })
    else:
        _print(figures, depths, seen)
    if figures.partitions_missing:
        raise typer.Exit(1)


def _print(figures: DatabaseFigures, depths: dict[str, int] | None,
           seen: dict[str, list[str]]) -> None:
    if depths is not None:
        queues = Table("queue", "waiting", "workers")
        for queue in QUEUE_NAMES:
            queues.add_row(queue, str(depths[queue]), ", ".join(seen.get(queue, [])) or "-")
        out.print(queues)
        hosts = {host for hosts in seen.values() for host in hosts}
        out.print(f"workers answering: {len(hosts)}")
    lines = ["executions: " + (", ".join(f"{k} {v}" for k, v in
                                         sorted(figures.executions.items()) if v) or "none"),
             f"stalled executions: {figures.stalled}"
             + (" (running, and can never go on by themselves)" if figures.stalled else "")]
    if figures.oldest_due_timer is not None:
        lines.append(f"oldest due timer: {figures.oldest_due_timer:%Y-%m-%d %H:%M:%S} "
                     f"({figures.timer_lag:.0f}s late)")
    else:
        lines.append("oldest due timer: none due")
    lines.append(f"dead letters pending: {figures.dead_letters_pending}")
    lines.append(f"outbox backlog: {figures.outbox_backlog}" + (
        f" (oldest {figures.outbox_oldest:%Y-%m-%d %H:%M:%S})" if figures.outbox_oldest else ""))
    out.print("\n".join(lines), markup=False, highlight=False)
    table = Table("partitioned table", "missing", "unexpected", "rows in default")
    for part in figures.partitions:
        table.add_row(part.table, ", ".join(part.missing) or "-",
                      ", ".join(part.unexpected) or "-", str(part.default_rows))
    out.print(table)
