"""`fleet metrics`: backfill and read the nightly metrics."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.table import Table
from sqlalchemy import text

from db import tenancy
from db.models import LIFECYCLE_STAGES, SEND_OUTCOMES
from db.session import get_engine, read_session, session_scope
from workers.cli.context import ensure_servers, err, out
from workers.cli.output import print_json
from workers.reports.funnel import funnel_counts, write_funnel
from workers.reports.metrics import Conversion, aggregate_day, conversions, sends_by_outcome
from workers.reports.splits import Split, split_conversions
from workers.retention import run_retention

app = typer.Typer(help="Daily lifecycle metrics.", no_args_is_help=True)


DAY_HELP = "a date: YYYY-MM-DD, today, yesterday or -Nd (N days ago, UTC)"


def parse_day(value: str, today: dt.date | None = None) -> dt.date:
    """`2026-11-22`, `today`, `yesterday` or `-7d`, as a UTC date."""
    today = today or dt.datetime.now(dt.UTC).date()
    word = value.strip().lower()
    if word in ("today", "yesterday"):
        return today - dt.timedelta(days=word == "yesterday")
    if word.startswith("-") and word.endswith("d") and word[1:-1].isdigit():
        return today - dt.timedelta(days=int(word[1:-1]))
    try:
        return dt.date.fromisoformat(word)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not {DAY_HELP}") from None


@app.command()
def backfill(
    from_: str = typer.Option(..., "--from", help=f"first day: {DAY_HELP}"),
    to: str = typer.Option(..., "--to", help=f"last day: {DAY_HELP}"),
) -> None:
    """Recompute every day of a range (one transaction per day; safe to rerun)."""
    day, last = parse_day(from_), parse_day(to)
    ensure_servers()
    while day <= last:
        with session_scope() as session:
            result = aggregate_day(session, day)
        out.print(f"{day}  {result.rows} figures, {result.written} written, "
                      f"{result.removed} removed")
        day += dt.timedelta(days=1)


@app.command()
def show(days: int = typer.Option(30, help="how many days back"),
         chart: Path = typer.Option(None, help="also write the AARRR funnel to this HTML file"),
         as_json: bool = typer.Option(False, "--json",
                                      help="print JSON: days, conversions, splits, sends"),
         ) -> None:
    """Users per stage and stage entries each day; goal conversion per workflow, treated vs
    held out, with the lift and its 95% CI; A/B splits by branch; sends by outcome."""
    ensure_servers()
    since = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days)
    with read_session() as session:  # the replica when DATABASE_READ_URL is set
        rows = session.execute(text(
            "SELECT metric_date, lifecycle_stage, metric_name, metric_value FROM metrics_daily "
            "WHERE metric_date >= :since AND metric_name IN ('users_in_stage', 'stage_entries') "
            "AND dimensions = '{}'::jsonb ORDER BY metric_date"), {"since": since}).all()
        converted = conversions(session, since)
        splits = split_conversions(session, since)
        sends = sends_by_outcome(session, since)
    by_day: dict[dt.date, dict[tuple[str, str], float]] = {}
    for row in rows:
        by_day.setdefault(row.metric_date, {})[(row.lifecycle_stage, row.metric_name)] = \
            float(row.metric_value)
    if not by_day:
        err.print(f"no metrics since {since} yet: the beat computes each day after midnight "
                  "UTC; compute past days now with "
                  f"`fleet metrics backfill --from {since} --to today`")
    if as_json:
        print_json({
            "days": [{"date": day, "stages": {
                s: {"users_in_stage": figures.get((s, "users_in_stage"), 0),
                    "stage_entries": figures.get((s, "stage_entries"), 0)}
                for s in LIFECYCLE_STAGES}} for day, figures in by_day.items()],
            "conversions": [c.to_json() for c in converted],
            "splits": [_split_json(s) for s in splits],
            "sends": [{"workflow": workflow, "channel": channel, **counts}
                      for (workflow, channel), counts in sends.items()]})
    else:
        if by_day:
            table = Table("date", *(f"{s} users/+in" for s in LIFECYCLE_STAGES))
            for day, figures in by_day.items():
                table.add_row(str(day), *(
                    f"{figures.get((s, 'users_in_stage'), 0):.0f}/+"
                    f"{figures.get((s, 'stage_entries'), 0):.0f}" for s in LIFECYCLE_STAGES))
            out.print(table)
        if converted:
            out.print(conversion_table(converted))
        if splits:
            out.print(split_table(splits, since))
        if sends:
            table = Table("workflow", "channel", *SEND_OUTCOMES,
                          title=f"sends by outcome, decided since {since}")
            for (workflow, channel), counts in sends.items():
                table.add_row(workflow, channel, *(str(counts[o]) for o in SEND_OUTCOMES))
            out.print(table)
    if chart is not None:
        with read_session() as session:
            write_funnel(chart, *funnel_counts(session))
        err.print(f"funnel written to {chart}")


def _share(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def conversion_table(converted: list[Conversion]) -> Table:
    table = Table("workflow", "treated n", "conv", "rate", "held-out n", "conv", "rate",
                  "lift (pp) [95% CI]", "relative",
                  title="goal conversion of the executions started in the period "
                        "(95% CI: Newcombe's hybrid score interval)")
    for c in converted:
        lifted = c.lift
        difference = lifted.in_points()
        relative = "-" if lifted.relative is None else f"{lifted.relative:+.0%}"
        table.add_row(c.workflow, str(c.treated), str(c.treated_converted),
                      _share(lifted.treated_rate), str(c.held_out), str(c.held_out_converted),
                      _share(lifted.control_rate), difference, relative)
    return table


def split_table(splits: list[Split], since: dt.date) -> Table:
    """A/B splits: each branch's exposures and goal conversion, and its lift over the first."""
    table = Table("workflow", "split", "variant", "exposed", "conv", "rate",
                  "lift vs first (pp) [95% CI]", "relative",
                  title=f"A/B splits: goal conversion by branch, exposed since {since} "
                        "(95% CI: Newcombe's hybrid score interval)")
    for split in splits:
        for i, branch in enumerate(split.branches):
            lifted = branch.lift
            table.add_row(split.workflow if i == 0 else "", split.node_id if i == 0 else "",
                          branch.variant, str(branch.exposures),
                          "-" if branch.converted is None else str(branch.converted),
                          _share(branch.rate),
                          "baseline" if i == 0 else ("-" if lifted is None
                                                     else lifted.in_points()),
                          "-" if lifted is None or lifted.relative is None
                          else f"{lifted.relative:+.0%}")
    return table


def _split_json(split: Split) -> dict[str, object]:
    return {"workflow": split.workflow, "node": split.node_id, "exposures": split.exposures,
            "branches": [{
                "variant": b.variant, "exposures": b.exposures, "converted": b.converted,
                "rate": b.rate, "baseline": i == 0,
                "lift": None if b.lift is None or b.lift.difference is None else {
                    "difference": b.lift.difference, "low": b.lift.low, "high": b.lift.high,
                    "relative": b.lift.relative, "interval": "newcombe-hybrid-score-95"}}
                for i, b in enumerate(split.branches)]}


retention_app = typer.Typer(help="Retention of old data (the seed's policy).",
                            no_args_is_help=True)


@retention_app.command("run")
def retention_run(dry_run: bool = typer.Option(False, "--dry-run",
                                               help="report what would go, change nothing")) -> None:
    """Archive and drop expired partitions, delete expired rows."""
    settings = ensure_servers()
    with tenancy.all_workspaces():  # every workspace's partitions and rows: the owner's job
        report = run_retention(get_engine(), settings.archive_dir or settings.home / "archive",
                               dry_run=dry_run)
    verb = "would" if dry_run else "did"
    out.print(f"{verb} archive: {', '.join(report.archived) or 'nothing'}")
    out.print(f"{verb} drop: {', '.join(report.dropped) or 'nothing'}")
    for table, count in report.deleted.items():
        out.print(f"{verb} delete {count} rows of {table}")
