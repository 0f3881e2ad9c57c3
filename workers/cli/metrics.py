"""`fleet metrics`: backfill and read the nightly metrics."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.table import Table
from sqlalchemy import text

from db.models import LIFECYCLE_STAGES
from db.session import get_engine, session_scope
from workers.cli.context import console, ensure_servers
from workers.reports.funnel import funnel_counts, write_funnel
from workers.reports.metrics import aggregate_day
from workers.retention import run_retention

app = typer.Typer(help="Daily lifecycle metrics.", no_args_is_help=True)


@app.command()
def backfill(
    from_: dt.datetime = typer.Option(..., "--from", formats=["%Y-%m-%d"], help="first day"),
    to: dt.datetime = typer.Option(..., "--to", formats=["%Y-%m-%d"], help="last day"),
) -> None:
    """Recompute every day of a range (one transaction per day; safe to rerun)."""
    ensure_servers()
    day = from_.date()
    while day <= to.date():
        with session_scope() as session:
            result = aggregate_day(session, day)
        console.print(f"{day}  {result.rows} figures, {result.written} written, "
                      f"{result.removed} removed")
        day += dt.timedelta(days=1)


@app.command()
def show(days: int = typer.Option(30, help="how many days back"),
         chart: Path = typer.Option(None, help="also write the AARRR funnel to this HTML file"),
         ) -> None:
    """Users per stage at the end of each day, and stage entries."""
    ensure_servers()
    since = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days)
    with session_scope() as session:
        rows = session.execute(text(
            "SELECT metric_date, lifecycle_stage, metric_name, metric_value FROM metrics_daily "
            "WHERE metric_date >= :since AND metric_name IN ('users_in_stage', 'stage_entries') "
            "AND dimensions = '{}'::jsonb ORDER BY metric_date"), {"since": since}).all()
    table = Table("date", *(f"{s} users/+in" for s in LIFECYCLE_STAGES))
    by_day: dict[dt.date, dict[tuple[str, str], float]] = {}
    for row in rows:
        by_day.setdefault(row.metric_date, {})[(row.lifecycle_stage, row.metric_name)] = \
            float(row.metric_value)
    for day, figures in by_day.items():
        table.add_row(str(day), *(
            f"{figures.get((s, 'users_in_stage'), 0):.0f}/+{figures.get((s, 'stage_entries'), 0):.0f}"
            for s in LIFECYCLE_STAGES))
    console.print(table)
    if chart is not None:
        with session_scope() as session:
            write_funnel(chart, *funnel_counts(session))
        console.print(f"funnel written to {chart}")


retention_app = typer.Typer(help="Retention of old data (the seed's policy).",
                            no_args_is_help=True)


@retention_app.command("run")
def retention_run(dry_run: bool = typer.Option(False, "--dry-run",
                                               help="report what would go, change nothing")) -> None:
    """Archive and drop expired partitions, delete expired rows."""
    settings = ensure_servers()
    report = run_retention(get_engine(), settings.archive_dir or settings.home / "archive",
                           dry_run=dry_run)
    verb = "would" if dry_run else "did"
    console.print(f"{verb} archive: {', '.join(report.archived) or 'nothing'}")
    console.print(f"{verb} drop: {', '.join(report.dropped) or 'nothing'}")
    for table, count in report.deleted.items():
        console.print(f"{verb} delete {count} rows of {table}")
