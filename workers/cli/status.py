"""`fleet status`: a one-screen view of what the database says about the fleet."""

from __future__ import annotations

import datetime as dt

import typer
from rich.table import Table
from sqlalchemy import text

from db.partitions import coverage
from db.session import session_scope
from workers.cli.context import console, ensure_servers


def status() -> None:
    """Executions by status, dead letters, outbox backlog and partition coverage."""
    ensure_servers()
    healthy = True
    with session_scope() as session:
        executions = dict(session.execute(text(
            "SELECT status, count(*) FROM workflow_executions GROUP BY status")).all())
        dead = session.execute(text(
            "SELECT count(*) FROM dead_letters WHERE status = 'pending'")).scalar_one()
        outbox = session.execute(text(
            "SELECT count(*), min(created_at) FROM event_outbox WHERE status = 'PENDING'")).one()
        parts = coverage(session.connection(), dt.datetime.now(dt.UTC).date())
    console.print("executions: " + (", ".join(f"{k} {v}" for k, v in sorted(executions.items()))
                                    or "none"))
    console.print(f"dead letters pending: {dead}")
    console.print(f"outbox backlog: {outbox[0]}" + (f" (oldest {outbox[1]:%Y-%m-%d %H:%M:%S})"
                                                    if outbox[1] else ""))
    table = Table("partitioned table", "missing", "unexpected", "rows in default")
    for part in parts:
        healthy &= not part.missing
        table.add_row(part.table, ", ".join(part.missing) or "-",
                      ", ".join(part.unexpected) or "-", str(part.default_rows))
    console.print(table)
    if not healthy:
        raise typer.Exit(1)
