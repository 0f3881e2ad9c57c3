"""`fleet chaos SCENARIO`: inject a fault into a scratch fleet and check the invariants."""

from __future__ import annotations

import json
from enum import StrEnum

import typer
from rich.table import Table

from workers.cli.context import dev_extra, ensure_servers, out


class Scenario(StrEnum):
    kill_workers = "kill-workers"
    redis_restart = "redis-restart"
    pg_terminate = "pg-terminate"
    pg_stop = "pg-stop"
    pg_slots = "pg-slots"
    redis_full = "redis-full"
    poison = "poison"
    retention = "retention"
    version_deploy = "version-deploy"


def chaos(
    scenario: Scenario = typer.Argument(..., help="what to inject (RELIABILITY.md describes each)"),
    events: int = typer.Option(3000, help="events to stream"),
    rate: float = typer.Option(100.0, help="events per second"),
    users: int = typer.Option(300, help="users who sign up (each starts one journey)"),
    executions: int = typer.Option(1000, help="version-deploy: executions waiting on timers"),
    as_json: bool = typer.Option(False, "--json", help="also print one JSON object last"),
) -> None:
    """Run a fault scenario on a scratch fleet (own database and broker prefix); exit 1 on a
    broken invariant."""
    with dev_extra("fleet chaos"):
        from workers.tools.chaos.scenarios import SCENARIOS
    ensure_servers()

    if scenario is Scenario.version_deploy:
        result = SCENARIOS[scenario.value](executions=executions)
    else:
        result = SCENARIOS[scenario.value](events=events, rate=rate, users=users)
    inv = result.invariants
    table = Table("figure", "value", title=f"fleet chaos {result.scenario}")
    for line in result.injected:
        table.add_row("injected", line)
    for key in ("sent", "accepted", "rejected", "lost", "duplicated", "steps", "messages_sent",
                "webhook_deliveries", "webhook_effects", "stage_changes"):
        table.add_row(key, str(getattr(inv, key)))
    table.add_row("executions", ", ".join(f"{k} {v}" for k, v in sorted(inv.executions.items())))
    for key, value in result.figures.items():
        table.add_row(key, str(value))
    table.add_row("seconds", str(result.seconds))
    out.print(table)
    for violation in inv.violations:
        out.print(f"[red]violated:[/red] {violation}")
    if inv.ok:
        out.print("[green]every invariant holds[/green]")
    if as_json:
        print(json.dumps(result.as_dict(), default=str))
    if not inv.ok:
        raise typer.Exit(1)
