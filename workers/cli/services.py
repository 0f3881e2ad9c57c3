"""`fleet services`: the embedded PostgreSQL and Valkey servers on their own (the dev extra)."""

from __future__ import annotations

import shlex

import typer
from rich.table import Table

from workers.cli.context import embedded_services, ensure_servers, err, out

app = typer.Typer(help="Manage the embedded PostgreSQL and Redis-compatible servers.",
                  no_args_is_help=True)


@app.command()
def start() -> None:
    """Start the embedded servers (or reuse running ones) and print their URLs."""
    services = embedded_services()
    if note := services.outside_note():
        err.print(note, markup=False, highlight=False)
    state = services.start()
    out.print(f"PostgreSQL  {state.database_url}")
    out.print(f"Redis       {state.broker_url}")


@app.command()
def stop() -> None:
    """Stop the embedded servers; their data stays for the next start."""
    embedded_services().stop()
    err.print("embedded servers stopped")


@app.command()
def status() -> None:
    """Show whether each embedded server runs, its pid, URL and data folder."""
    table = Table("server", "running", "pid", "url", "data")
    report = embedded_services().status()
    for name, info in report.items():
        table.add_row(name, "yes" if info["running"] else "no", str(info["pid"] or "-"),
                      str(info["url"] or "-"), str(info["data"]))
    out.print(table)
    if not all(info["running"] for info in report.values()):
        raise typer.Exit(1)


@app.command()
def env() -> None:
    """Print `export DATABASE_URL=... CELERY_BROKER_URL=...` (eval it in another shell),
    starting the embedded servers for the URLs that are unset if they are not running."""
    settings = ensure_servers(start=True)
    print(f"export DATABASE_URL={shlex.quote(str(settings.database_url))} "
          f"CELERY_BROKER_URL={shlex.quote(str(settings.broker_url))}")
