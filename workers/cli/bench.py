"""`fleet bench`: benchmarks that print figures and ratios measured in one run."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from workers.cli.context import dev_extra, ensure_servers, err, out

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
    with dev_extra("fleet bench events"):
        from workers.tools.bench.events import as_dict, run
    ensure_servers()

    _report(as_dict(run(noops=noops, single=single, batched=batched, concurrency=concurrency)),
            as_json)


@app.command()
def workflows(
    executions: int = typer.Option(1000, help="concurrent executions of the 10-node workflow "
                                   "(and concurrent hop chains of 10 tasks)"),
    loop_iterations: int = typer.Option(200, help="iterations of the loop workflow"),
    timer_executions: int = typer.Option(1000, help="executions started at once, each waiting "
                                         "on a PT1S timer"),
    inprocess_workflows: int = typer.Option(1000, help="workflows run in this process by plain "
                                            "SpiffWorkflow and node by node"),
    concurrency: int = typer.Option(2, help="worker pool processes"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """Raw Celery chain hops/s, persisted steps/s and batch sizes, step and first-node latency,
    loop step time and state size, timer lateness, plain SpiffWorkflow in-process nodes/s."""
    with dev_extra("fleet bench workflows"):
        from workers.tools.bench.workflows import as_dict, run
    ensure_servers()

    result = as_dict(run(executions=executions, loop_iterations=loop_iterations,
                         concurrency=concurrency, timer_executions=timer_executions,
                         inprocess_workflows=inprocess_workflows))
    _report(result, as_json)


@app.command()
def workspaces(
    users: int = typer.Option(2000, help="users, split evenly over the workspaces"),
    single: int = typer.Option(2000, help="events sent one per message (per configuration "
                               "and round)"),
    batched: int = typer.Option(20_000, help="events sent in batches of 100 (per "
                                "configuration and round)"),
    executions: int = typer.Option(500, help="concurrent executions of the 10-node workflow "
                                   "(per configuration and round)"),
    rounds: int = typer.Option(3, help="rounds, each measuring every configuration in turn "
                               "(the order rotated every round)"),
    spread: int = typer.Option(10, "--workspaces", help="workspaces of the third "
                               "configuration"),
    concurrency: int = typer.Option(2, help="worker pool processes"),
    mixed_batches: bool = typer.Option(False, help="every batch of 100 mixes all workspaces' "
                                       "events (default: each batch is one workspace's)"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """Row-level security's cost: events/s one per message and in batches of 100, persisted
    workflow steps/s, with RLS off, on with 1 workspace and on with 10 (same run, same sizes)."""
    with dev_extra("fleet bench workspaces"):
        from workers.tools.bench.workspaces import as_dict, run
    ensure_servers()

    result = as_dict(run(users=users, single=single, batched=batched, executions=executions,
                         rounds=rounds, spread=spread, concurrency=concurrency,
                         mixed_batches=mixed_batches))
    table = Table("configuration", "events/s single", "cost %", "events/s batch100", "cost %",
                  "steps/s", "cost %")
    for row in result["configurations"]:
        table.add_row(row["name"], *(str(row[key]) for key in (
            "events_per_s_single", "cost_pct_events_single", "events_per_s_batch100",
            "cost_pct_events_batch100", "steps_per_s", "cost_pct_steps")))
    out.print(table)
    out.print(f"rls_off: {result['rls_off_means']} ({result['rls_off_tables_disabled']} tables)."
              f"\n{result['figure']}; rounds {result['order']}.\nHighest cost "
              f"{result['max_cost_pct']}% (target: under {result['target_cost_pct']}%).",
              soft_wrap=True)
    if as_json:
        print(json.dumps(result))


@app.command()
def sends(
    sends: int = typer.Option(2000, help="operator calls with the gateway, and as many without"),
    worker_sends: int | None = typer.Option(None, help="deliveries drained by a real actions "
                                            "worker with the gateway (default: --sends; 0 skips)"),
    concurrency: int = typer.Option(2, help="that worker's pool processes"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """The send gateway's cost: send_message operator calls/s with and without it (same run),
    the gateway's own ms p50/p99 and its share of a call, a real worker's drain rate."""
    with dev_extra("fleet bench sends"):
        from workers.tools.bench.sends import as_dict, run
    ensure_servers()

    _report(as_dict(run(sends=sends, worker_sends=worker_sends, worker_concurrency=concurrency)),
            as_json)


@app.command()
def soak(
    minutes: float = typer.Option(10.0, help="how long to stream"),
    rate: float | None = typer.Option(None, help="events/s (default: 70% of the measured maximum)"),
    sample_seconds: float = typer.Option(15.0, help="seconds between samples"),
    concurrency: int = typer.Option(2, help="pool processes per worker"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """A sustained stream through a whole fleet: throughput, backlog, p99 and worker RSS over
    time, then the invariants; exit 1 if memory grows, the backlog grows or one is broken."""
    with dev_extra("fleet bench soak"):
        from workers.tools.bench.soak import SoakSample, run
    ensure_servers()

    def show(s: SoakSample) -> None:
        workers = sum(v for k, v in s.rss_mb.items() if k.startswith("worker-"))
        err.print(f"{s.second:>6.0f}s sent {s.sent:>7} · {s.accepted_per_s:>6.1f}/s · queued "
                      f"{sum(s.queued.values()):>5} · p99 {s.p99_latency_ms or 0:>6.1f} ms · "
                      f"RSS {workers:>6.1f} MiB", soft_wrap=True)

    result = run(minutes=minutes, rate=rate, sample_seconds=sample_seconds,
                 concurrency=concurrency, on_sample=show)
    summary = result.as_dict()
    summary.pop("samples")
    inv = summary.pop("invariants")
    summary.update({f"events_{k}": inv[k] for k in ("sent", "accepted", "rejected", "lost",
                                                    "duplicated")})
    summary["violations"] = "; ".join(inv["violations"]) or "none"
    _report(summary, False)
    if as_json:
        print(json.dumps(result.as_dict(), default=str))
    if not (result.memory_flat and not result.backlog_growing and result.invariants.ok):
        raise typer.Exit(1)


def _report(result: dict[str, object], as_json: bool) -> None:
    table = Table("figure", "value")
    for key, value in result.items():
        table.add_row(key, str(value))
    out.print(table)
    if as_json:
        print(json.dumps(result))


@app.command()
def segments(
    users: int = typer.Option(1_000_000, help="generated users"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """Refresh of one segment over generated users, and the bare INSERT … SELECT ratio; then a
    refresh moving a tenth of them into a watched segment, until each entry's journey started."""
    with dev_extra("fleet bench segments"):
        from workers.tools.bench.scheduled import bench_segments
        from workers.tools.bench.segment_entries import bench_segment_entries
    ensure_servers()

    refresh = bench_segments(users)
    entries = bench_segment_entries(users)
    _report({**refresh, **{f"entries_{k}": v for k, v in entries.items() if k != "users"}},
            as_json)


@app.command()
def metrics(
    events: int = typer.Option(5_000_000, help="generated audit events in the day"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """The nightly aggregation of one day of generated events."""
    with dev_extra("fleet bench metrics"):
        from workers.tools.bench.scheduled import bench_metrics
    ensure_servers()

    _report(bench_metrics(events), as_json)
