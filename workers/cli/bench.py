"""`fleet bench`: benchmarks that print figures and ratios measured in one run."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from workers.cli.context import console, ensure_servers

app = typer.Typer(help="Benchmarks (figures, not pass/fail).", no_args_is_help=True)


@app.command()
def events(
    noops: int = typer.Option(5000, help="no-op tasks for the raw Celery baseline"),
    single: int = typer.Option(5000, help="events sent one per message"),
    batched: int = typer.Option(50_000, help="events sent in batches of 100"),
    concurrency: int = typer.Option(2, help="worker pool processes"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """Raw no-op tasks/s, events/s one per message and in batches of 100, latency."""
    ensure_servers()
    from workers.bench.events import as_dict, run

    _report(as_dict(run(noops=noops, single=single, batched=batched, concurrency=concurrency)),
            as_json)


@app.command()
def workflows(
    executions: int = typer.Option(1000, help="concurrent executions of the 10-node workflow "
                                   "(and concurrent hop chains of 10 tasks)"),
    loop_iterations: int = typer.Option(200, help="iterations of the loop workflow"),
    concurrency: int = typer.Option(2, help="worker pool processes"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """Raw Celery chain hops/s, persisted steps/s, step latency, loop step time and state size."""
    ensure_servers()
    from workers.bench.workflows import as_dict, run

    result = as_dict(run(executions=executions, loop_iterations=loop_iterations,
                         concurrency=concurrency))
    _report(result, as_json)


def _report(result: dict[str, object], as_json: bool) -> None:
    table = Table("figure", "value")
    for key, value in result.items():
        table.add_row(key, str(value))
    console.print(table)
    if as_json:
        print(json.dumps(result))


@app.command()
def segments(
    users: int = typer.Option(1_000_000, help="generated users"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """Refresh of one segment over generated users, and the bare INSERT … SELECT ratio."""
    ensure_servers()
    from workers.bench.scheduled import bench_segments

    _report(bench_segments(users), as_json)


@app.command()
def metrics(
    events: int = typer.Option(5_000_000, help="generated audit events in the day"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """The nightly aggregation of one day of generated events."""
    ensure_servers()
    from workers.bench.scheduled import bench_metrics

    _report(bench_metrics(events), as_json)
