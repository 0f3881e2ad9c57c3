"""`fleet demo`: the whole fleet on a sample lifecycle program and a synthetic month of users."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from workers.cli.context import (
    dev_extra,
    embedded_services,
    ensure_servers,
    err,
    out,
    starts_embedded,
)
from workers.tools.demo.run import PROGRAM


class RichReporter:
    """Two bars (events sent, simulated days) and a status line read from the database."""

    def __init__(self, events: int, phases: int) -> None:
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description:<22}"), BarColumn(bar_width=36),
            MofNCompleteColumn(), TaskProgressColumn(), TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(), console=err)
        self.events = self.progress.add_task("events sent", total=events, note="")
        self.days = self.progress.add_task("phases", total=phases, note="")
        self.line = Text("", style="dim")
        self.live = Live(Group(self.progress, self.line), console=err,
                         refresh_per_second=8, transient=False)
        self.started = time.monotonic()
        self.count = 0

    def __enter__(self) -> RichReporter:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)  # type: ignore[arg-type]
        if not err.is_terminal:
            err.print()  # the last status line has no newline of its own

    def phase(self, name: str, index: int, total: int) -> None:
        self.progress.update(self.days, completed=index, description=name)

    def sent(self, count: int) -> None:
        self.count += count
        rate = self.count / max(0.001, time.monotonic() - self.started)
        self.progress.update(self.events, advance=count, note=f"{rate:,.0f} events/s")

    def status(self, line: str) -> None:
        self.line.plain = f"  {line}"

    def finish(self) -> None:
        self.progress.update(self.days, completed=self.progress.tasks[self.days].total,
                             description="done")


def _flower_port(preferred: int) -> int:
    from workers.dev.ports import free_port, port_is_free

    return preferred if port_is_free(preferred) else free_port()


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def demo(
    users: int = typer.Option(
        1000, help="Users who sign up over the simulated period (about 22 workflow steps "
        "each: 1,000 take ~10 min on 2 busy cores, a few minutes on a laptop)."),
    days: int = typer.Option(30, help="Simulated days, sent one at a time."),
    seed: int = typer.Option(7, help="Seed of the synthetic stream (same seed, same behaviour)."),
    keep_running: bool = typer.Option(False, "--keep-running",
                                      help="Leave the fleet up after the summary, until Ctrl-C."),
    concurrency: int | None = typer.Option(
        None, help="Pool processes per queue worker (default: half the CPUs, 1 to 4)."),
    day_seconds: float = typer.Option(2.0, help="Shortest wall-clock time of a simulated day."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the run to drain at the end."),
    program: Path = typer.Option(PROGRAM, exists=True, dir_okay=False,
                                 help="The lifecycle program to apply."),
    report: Path | None = typer.Option(None, help="HTML report (default FLEET_HOME/demo-report.html)."),
) -> None:
    """Run the fleet on a sample lifecycle program and a synthetic stream of users.

    Starts (or uses) PostgreSQL and Redis, migrates, starts a worker per queue, the
    beat and Flower; applies the sample program (workers/tools/demo/program/); streams
    a seeded month of users through the producer API (with a few bad inputs); waits
    until the pipeline drains; prints a summary and writes an HTML report. Everything
    it started is stopped at the end, unless --keep-running.
    """
    from db.migrate import upgrade
    from db.session import session_scope
    from workers.reports.diagram import workflow_section_html
    from workers.tools.demo import run
    from workers.tools.demo.generator import generate
    from workers.tools.demo.report import write_report
    from workers.tools.demo.summary import summarize

    with dev_extra("fleet demo"):
        from workers.dev.supervisor import start_fleet

    t0 = time.monotonic()
    # A SIGTERM (`timeout`, a CI runner) stops the fleet it started, as Ctrl-C does;
    # Python's default would end this process and leave every worker running.
    signal.signal(signal.SIGTERM, _raise_exit)
    own_servers = starts_embedded()
    settings = ensure_servers(start=True)
    supervisor = None
    try:
        upgrade(settings.sqlalchemy_url)
        flower_port = _flower_port(settings.flower_port)
        concurrency = concurrency or max(1, min(4, (os.cpu_count() or 2) // 2))
        with err.status("starting a worker per queue, the beat and Flower…"):
            supervisor = start_fleet(settings, concurrency, 120.0, flower_port)
        flower = f"http://127.0.0.1:{flower_port}/"
        err.print(f"[bold green]fleet ready[/] in {time.monotonic() - t0:.1f}s · "
                      f"flower {flower} · logs {supervisor.log_dir}/")

        applied = run.apply_program(program)
        err.print(f"applied {program.name}: {len(applied.created)} created, "
                      f"{len(applied.updated)} updated, {len(applied.unchanged)} unchanged")

        now = dt.datetime.now(dt.UTC)
        tag = f"demo-{now:%y%m%d-%H%M%S}"
        with err.status("generating the synthetic stream…"):
            stream = generate(users, days, seed, end=now.replace(second=0, microsecond=0),
                              tag=tag)
        err.print(
            f"stream: {stream.users:,} users ({stream.referred} referred by others) over "
            f"{days} simulated days, {stream.good:,} events + {stream.bad} bad inputs, seed {seed}; "
            + ", ".join(f"{n} {p}" for p, n in stream.personas.items()))
        run.wait_for_trigger_caches()

        total = sum(len(p.events) + len(p.bad) for p in stream.phases)
        with RichReporter(total, len(stream.phases)) as reporter:
            result = run.send(stream, day_seconds=day_seconds, drain_timeout=timeout,
                              reporter=reporter)
            reporter.finish()
        day_times = sorted(v for k, v in result.phase_seconds.items() if k.startswith("day "))
        if day_times:
            err.print(f"a simulated day took {day_times[0]:.1f}–{day_times[-1]:.1f}s "
                          f"(median {day_times[len(day_times) // 2]:.1f}s) until the fleet "
                          "caught up")
        if result.unsettled:
            err.print(f"[yellow]did not settle within the time limit:[/] "
                          f"{', '.join(result.unsettled)}")
        if not result.drained:
            err.print(f"[yellow]not drained after {timeout:.0f}s:[/] the summary shows "
                          "executions still active")

        with session_scope() as session:
            summary = summarize(session, stream.domain)
            pictures = [workflow_section_html(session, wf.name, days=1)
                        for wf in summary.workflows]
        elapsed = time.monotonic() - t0
        print_summary(summary, result, flower if keep_running else
                      f"{flower} (up until the demo ends; --keep-running leaves it up)")
        meta = {"seed": seed, "users": f"{stream.users:,}", "simulated days": days,
                "run": tag, "streamed in": f"{result.seconds:.0f}s",
                "whole demo": f"{elapsed:.0f}s"}
        if day_times:
            meta["a simulated day"] = f"{day_times[len(day_times) // 2]:.1f}s (median)"
        path = write_report(report or settings.home.resolve() / "demo-report.html", summary, meta,
                            pictures)
        err.print(f"report    {path}")
        err.print(f"[bold]demo finished[/] in {elapsed:.1f}s "
                      f"(streaming and draining {result.seconds:.1f}s)")

        if keep_running:
            err.print(f"the fleet keeps running: flower {flower} · Ctrl-C stops it")
            reason = supervisor.run_until_signal()
            err.print(f"stopping ({reason})…")
    finally:
        if supervisor is not None:
            supervisor.stop()
        if own_servers:
            embedded_services().stop()
    err.print("fleet stopped" + (" (embedded servers too)" if own_servers else ""))


def print_sends(summary: Any) -> None:
    """The send gateway's decisions, deferred sends released, conversion treated vs held out."""
    from workers.cli.metrics import conversion_table
    from workers.tools.demo.summary import SEND_OUTCOMES

    sends = summary.sends
    totals = sends.by_outcome
    out.print(f"sends     {sum(totals.values()):,} decided by the send gateway: "
              + ", ".join(f"{outcome} {totals[outcome]:,}" for outcome in SEND_OUTCOMES))
    table = Table("workflow", *SEND_OUTCOMES, box=None)
    for workflow, counts in sends.by_workflow.items():
        table.add_row(workflow, *(f"{counts[o]:,}" for o in SEND_OUTCOMES))
    out.print(table)
    out.print(f"deferred  {sends.deferred:,} sends waited for the send window; "
              f"{sends.deferred_sent:,} went out when it opened "
              f"({sends.deferred_sent_in_window:,} inside the user's window"
              + (f", the first at {sends.first_release} UTC)" if sends.first_release else ")")
              + ", the others were re-checked and capped, suppressed or are still waiting")
    if summary.conversions:
        out.print(conversion_table(summary.conversions))
    if summary.splits:
        from workers.cli.metrics import split_table  # the same table as `fleet metrics show`

        out.print(split_table(summary.splits, dt.date.today() - dt.timedelta(days=1)))
    out.print(f"nudges    {summary.early_projects:,} users created their first project before "
              f"the activation nudge began waiting (its wait looks back); "
              f"{summary.needless_nudges:,} nudges went to a user whose project came before the "
              f"nudge's timeout; {summary.late_nudges:,} went out after waiting for the send "
              f"window with the project created meanwhile (the nudge exits on its goal: such a "
              f"send is dropped)")
    if summary.early_exits:
        out.print("exits     " + "; ".join(
            f"{workflow}: {n:,} ended early ({'goal reached' if outcome == 'goal' else outcome})"
            for (workflow, outcome), n in summary.early_exits.items())
            + f"; {summary.sends.by_outcome.get('dropped', 0):,} deferred sends dropped")


def print_summary(summary: Any, result: Any, flower: str) -> None:
    from db.models import ACTIVE_EXECUTION_STATUSES, LIFECYCLE_STAGES

    out.rule("summary")
    out.print(
        f"events    {result.sent:,} sent by the producer ({result.good:,} good, {result.bad} bad); "
        f"{summary.events:,} recorded for the run's users (workflows' own events included)")
    out.print(f"triggers  {summary.evaluated:,} evaluated, {summary.matched:,} matched")
    triggers = Table("trigger", "event", "evaluated", "matched", "started", box=None)
    for t in summary.triggers:
        triggers.add_row(t.name, t.event_type, f"{t.evaluated:,}", f"{t.matched:,}",
                         f"{t.started:,}")
    out.print(triggers)
    for (schedule, workflow), n in summary.scheduled.items():
        out.print(f"schedules {schedule} started {workflow} for {n:,} of the run's users "
                  "(every member of its segment, once per run)")
    if summary.segment_moves:
        out.print("segments  " + "; ".join(
            f"{segment} {kind} by {n:,} users" for (segment, kind), n in
            summary.segment_moves.items()) + " (segment.entered/exited events, from the outbox)")

    executions = Table("workflow", "completed", "failed", "active", "outcomes", box=None)
    for wf in summary.workflows:
        active = sum(wf.statuses.get(status, 0) for status in ACTIVE_EXECUTION_STATUSES)
        outcomes = ", ".join(f"{k} {v:,}" for k, v in
                             sorted(wf.outcomes.items(), key=lambda kv: -kv[1]))
        executions.add_row(wf.name, f"{wf.statuses.get('completed', 0):,}",
                           f"{wf.statuses.get('failed', 0):,}", f"{active:,}", outcomes)
    out.print(executions)
    for wf in summary.workflows:
        for reason, n in wf.failures.items():
            out.print(f"  [red]{wf.name}: {n} failed[/] {reason}")

    reached = summary.reached
    stages = Table("stage", "users now", "reached", box=None)
    for stage in LIFECYCLE_STAGES:
        stages.add_row(stage, f"{summary.stages[stage]:,}", f"{reached[stage]:,}")
    out.print(stages)
    out.print(f"users     {summary.users:,}; {summary.stage_moves:,} stage moves")
    by_template = ", ".join(f"{template} {n:,}" for (_, template), n in
                            summary.messages_by_template.items())
    out.print(f"messages  {summary.messages:,} written to message_log ({by_template})")
    print_sends(summary)
    out.print(f"dead      {summary.dead_letters} inputs dead-lettered "
                  f"(fleet dlq list shows them)")
    for reason in summary.dead_letter_reasons:
        out.print(f"          · {reason[:110]}")
    if summary.waiting_timers or summary.waiting_messages or summary.in_flight:
        out.print(f"[yellow]still active[/]: {summary.in_flight} stepping, "
                      f"{summary.waiting_timers} on timers, {summary.waiting_messages} on events")
    out.print(f"flower    {flower}")
