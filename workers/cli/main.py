"""`fleet`: run, migrate and inspect the lifecycle fleet."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import typer

from db.migrate import upgrade
from workers.cli import dlq, metrics, monitor, secrets, services, suppress, workspaces
from workers.cli.context import (
    dev_extra,
    embedded_services,
    ensure_servers,
    err,
    starts_embedded,
)
from workers.cli.definitions import apply, segment_app, trigger_app
from workers.cli.events import emit
from workers.cli.schedules import schedule_app
from workers.cli.status import status
from workers.cli.users import app as user_app
from workers.cli.users import scrub_archives_command
from workers.cli.workflows import execution_app, workflow_app
from workers.queues import QUEUE_NAMES

app = typer.Typer(help="Lifecycle fleet: Celery workers for customer-lifecycle operations.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False,
                  cls=workspaces.FleetGroup)
app.add_typer(services.app, name="services")
app.add_typer(workspaces.app, name="workspace")
app.add_typer(dlq.app, name="dlq")
app.add_typer(suppress.app, name="suppress")
app.add_typer(secrets.app, name="secret")
app.add_typer(metrics.app, name="metrics")
app.add_typer(metrics.retention_app, name="retention")
metrics.retention_app.command("scrub-archives")(scrub_archives_command)
app.add_typer(user_app, name="user")
app.add_typer(trigger_app, name="trigger")
app.add_typer(segment_app, name="segment")
app.add_typer(workflow_app, name="workflow")
app.add_typer(execution_app, name="execution")
app.add_typer(schedule_app, name="schedule")
app.command()(emit)
app.command()(apply)
app.command()(status)
app.command()(monitor.health)
app.command()(monitor.flower)
app.command()(monitor.exporter)

PACKAGE = "lifecycle-fleet"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fleet {importlib.metadata.version(PACKAGE)}")
        raise typer.Exit()


@app.callback()
def main(ctx: typer.Context,
         version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the installed version and exit."),
         workspace: str | None = typer.Option(
             None, "--workspace", envvar="FLEET_WORKSPACE", metavar="NAME",
             show_default=False,
             help="The workspace every command works in (`fleet workspace list`); "
                  "default: the one named default.")) -> None:
    """Lifecycle fleet: Celery workers for customer-lifecycle operations."""
    workspaces.enter(ctx, workspace)


@app.command()
def migrate() -> None:
    """Apply the Alembic migrations to DATABASE_DIRECT_URL, else DATABASE_URL (or to the running
    embedded database)."""
    settings = ensure_servers(broker=False)
    upgrade(settings.database.direct_sqlalchemy_url)  # DATABASE_DIRECT_URL: never via a pooler
    err.print("database migrated to head")


@app.command()
def dev(
    concurrency: int = typer.Option(1, help="Pool processes per queue worker."),
    ready_timeout: float = typer.Option(120.0, help="Seconds to wait for every process."),
) -> None:
    """Run the whole fleet in the foreground: a worker per queue, beat and Flower.

    Uses DATABASE_URL / CELERY_BROKER_URL when set, else the embedded servers under
    FLEET_HOME, started if they are not running. Ctrl-C stops every process with a
    warm shutdown, and the embedded servers if this command started them.
    """
    import time

    with dev_extra("fleet dev"):
        from workers.dev.supervisor import start_fleet

    t0 = time.monotonic()
    urls_set = bool(os.environ.get("DATABASE_URL") and os.environ.get("CELERY_BROKER_URL"))
    own_servers = starts_embedded()
    supervisor = None
    try:
        settings = ensure_servers(start=True)
        err.print("migrating the database…")
        upgrade(settings.database.direct_sqlalchemy_url)
        err.print(f"starting a worker per queue ({', '.join(QUEUE_NAMES)}), the beat and "
                  "Flower…", markup=False, highlight=False)
        supervisor = start_fleet(settings, concurrency, ready_timeout)
        elapsed = time.monotonic() - t0
        err.print(f"[bold green]fleet ready[/] in {elapsed:.1f}s")
        err.print(f"  database  {settings.database_url}")
        err.print(f"  broker    {settings.broker_url}")
        err.print(f"  flower    http://127.0.0.1:{settings.flower_port}/")
        err.print(f"  workers   {', '.join(QUEUE_NAMES)} (+ beat)")
        err.print(f"  logs      {supervisor.log_dir}/")
        err.print("Ctrl-C stops the fleet" + (" and the embedded servers." if own_servers else "."))
        reason = supervisor.run_until_signal()
        err.print(f"stopping ({reason})…")
    finally:
        if supervisor is not None:
            supervisor.stop()
        if own_servers:
            embedded_services().stop()
    if own_servers:
        err.print("fleet stopped (embedded servers too; their data stays for the next start)")
    elif urls_set:
        err.print("fleet stopped")
    else:
        err.print("fleet stopped; the embedded servers it found running keep running "
                  "(fleet services stop stops them)")


def _add_tool_commands() -> None:
    """`fleet bench`, `fleet chaos` and `fleet demo`, where `workers.tools` is installed.

    Registered only then, rather than always with a message when run: the production
    image leaves the tools out, and its `fleet --help` lists only what runs there.
    """
    if importlib.util.find_spec("workers.tools") is None:
        return
    from workers.cli import bench
    from workers.cli.chaos import chaos
    from workers.cli.demo import demo

    app.add_typer(bench.app, name="bench")
    app.command()(chaos)
    app.command()(demo)


_add_tool_commands()

if __name__ == "__main__":
    app()
