"""`fleet workspace create|list`, and the global `--workspace` every command works in.

The root callback (`enter`) puts the rest of the command inside `tenancy.workspace(id)`
of the named workspace, so each of its transactions is that tenant's (db/tenancy.py).
A name is looked up only when the command needs the database anyway: the default
workspace's id is a constant, and neither `--help` nor the commands that run before a
database exists or span every workspace (`NO_WORKSPACE`) look another name up (nor
enter a workspace).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError
from typer.core import TyperGroup

from db import tenancy
from db.models import DEFAULT_WORKSPACE, DEFAULT_WORKSPACE_ID
from db.session import session_scope
from workers import workspaces
from workers.cli.context import ensure_servers, err, out
from workers.cli.output import id_column, print_json
from workers.settings import get_settings

app = typer.Typer(help="Workspaces: the tenants whose data the fleet keeps apart.",
                  no_args_is_help=True)

# The subcommand's own arguments, kept by FleetGroup (`meta` is shared by all contexts).
META_ARGS = "fleet.args"
# Commands that run before the database exists or is migrated, or span every workspace:
# a name other than the default's is not looked up for them.
NO_WORKSPACE = frozenset({"services", "migrate", "dev", "demo", "chaos", "bench", "workspace"})


# The global --workspace of the command running (None: outside a command, or before its
# callback); set for the command's life, like its tenancy.workspace.
_name: ContextVar[str | None] = ContextVar("fleet_cli_workspace", default=None)


class FleetGroup(TyperGroup):
    """The root group: keeps the subcommand's own arguments, so that the callback can tell
    `fleet X --help` (which needs no database) from a run."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        # Any: typer's vendored click types, which it does not export.
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta[META_ARGS] = list(rest)
        return name, command, rest


def _say(message: str) -> None:
    err.print(message, markup=False, highlight=False, soft_wrap=True)


def current_name() -> str:
    """The workspace this command works in: the global `--workspace`, else FLEET_WORKSPACE."""
    return _name.get() or get_settings().workspace


@contextmanager
def _named(name: str) -> Iterator[str]:
    token = _name.set(name)
    try:
        yield name
    finally:
        _name.reset(token)


def _asks_for_help(ctx: typer.Context) -> bool:
    rest: Sequence[str] = ctx.meta.get(META_ARGS, ())
    return any(arg in ctx.help_option_names for arg in rest)


def resolve(name: str) -> uuid.UUID:
    """The id of the workspace `name`; UnknownWorkspace. The default's needs no database."""
    if name == DEFAULT_WORKSPACE:
        return DEFAULT_WORKSPACE_ID
    ensure_servers(broker=False)
    with tenancy.all_workspaces(), session_scope() as session:
        return workspaces.resolve(session, name)


def scope(name: str) -> AbstractContextManager[uuid.UUID]:
    """Run a block's transactions in the workspace `name` (a command's own `--workspace`)."""
    return tenancy.workspace(resolve(name))


def enter(ctx: typer.Context, option: str | None) -> None:
    """The root callback's part: check the name, keep it, enter its workspace."""
    name = option or get_settings().workspace
    try:
        workspaces.check_name(name)
    except ValueError as exc:
        _say(f"invalid --workspace: {exc}")
        raise typer.Exit(2) from None
    ctx.with_resource(_named(name))
    if ctx.resilient_parsing:  # shell completion: nothing runs
        return
    if name != DEFAULT_WORKSPACE and (ctx.invoked_subcommand in NO_WORKSPACE
                                      or _asks_for_help(ctx)):
        return
    try:
        workspace_id = resolve(name)
    except workspaces.UnknownWorkspace:
        _say(f"no workspace named {name!r} (fleet workspace create {name})")
        raise typer.Exit(2) from None
    except SQLAlchemyError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _say(f"cannot look up workspace {name!r}: {first}")
        raise typer.Exit(1) from None
    ctx.with_resource(tenancy.workspace(workspace_id))


@app.command()
def create(name: str = typer.Argument(..., help="lowercase letters, digits, '-' and '_'")
           ) -> None:
    """Create a workspace (prints its id); one that exists already is left as it is."""
    try:
        workspaces.check_name(name)
    except ValueError as exc:
        _say(f"invalid input: {exc}")
        raise typer.Exit(2) from None
    ensure_servers(broker=False)
    with tenancy.all_workspaces(), session_scope() as session:
        workspace_id, created = workspaces.create(session, name)
    out.print(str(workspace_id), markup=False, highlight=False)
    if not created:
        _say(f"workspace {name} exists already")


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Every workspace: name, id, when it was created."""
    ensure_servers(broker=False)
    with tenancy.all_workspaces(), session_scope() as session:
        found = workspaces.list_(session)
    rows: list[dict[str, Any]] = [{"name": w.name, "id": str(w.id), "created_at": w.created_at}
                                  for w in found]
    if as_json:
        print_json(rows)
        return
    table = Table("name", id_column(), "created")
    for row in rows:
        table.add_row(escape(row["name"]), row["id"], row["created_at"])
    out.print(table)
