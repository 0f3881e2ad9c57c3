"""`fleet status`: a one-screen view of the fleet: workers, queues, and what the database says."""

from __future__ import annotations

import typer
from rich.table import Table

from db.session import session_scope
from workers.broker import queue_depths
from workers.cli.context import console, ensure_servers
from workers.health import database_figures, workers_by_queue
from workers.queues import QUEUE_NAMES


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def status(timeout: float = typer.Option(1.0, help="Seconds to wait for workers to answer."),
           ) -> None:
    """Workers and queue depths, executions by status (and stalled), timers, dead letters,
    outbox backlog and partition coverage (exit 1 if partitions are missing)."""
    settings = ensure_servers()
    # After ensure_servers(): the Celery app reads the broker's URL from the settings when
    # first imported, and an embedded broker's URL is known only now.
    from workers.celery_app import app

    queues = Table("queue", "waiting", "workers")
    try:
        depths: dict[str, int] | None = queue_depths(settings.broker_url or "",
                                                     settings.broker_key_prefix)
        seen = workers_by_queue(app, timeout)
    except Exception as exc:  # the database part is still worth showing
        console.print(f"[red]broker unreachable[/]: {_first_line(exc)}")
        depths, seen = None, {}
    if depths is not None:
        for queue in QUEUE_NAMES:
            queues.add_row(queue, str(depths[queue]), ", ".join(seen.get(queue, [])) or "-")
        console.print(queues)
        hosts = {host for hosts in seen.values() for host in hosts}
        console.print(f"workers answering: {len(hosts)}")
    try:
        with session_scope() as session:
            figures = database_figures(session)
    except Exception as exc:
        console.print(f"[red]database unreachable[/]: {_first_line(exc)}")
        raise typer.Exit(1) from None
    console.print("executions: " + (", ".join(f"{k} {v}" for k, v in
                                              sorted(figures.executions.items()) if v) or "none"))
    console.print(f"stalled executions: {figures.stalled}"
                  + (" (running, and can never go on by themselves)" if figures.stalled else ""))
    if figures.oldest_due_timer is not None:
        console.print(f"oldest due timer: {figures.oldest_due_timer:%Y-%m-%d %H:%M:%S} "
                      f"({figures.timer_lag:.0f}s late)")
    else:
        console.print("oldest due timer: none due")
    console.print(f"dead letters pending: {figures.dead_letters_pending}")
    console.print(f"outbox backlog: {figures.outbox_backlog}" + (
        f" (oldest {figures.outbox_oldest:%Y-%m-%d %H:%M:%S})" if figures.outbox_oldest else ""))
    table = Table("partitioned table", "missing", "unexpected", "rows in default")
    for part in figures.partitions:
        table.add_row(part.table, ", ".join(part.missing) or "-",
                      ", ".join(part.unexpected) or "-", str(part.default_rows))
    console.print(table)
    if figures.partitions_missing:
        raise typer.Exit(1)
