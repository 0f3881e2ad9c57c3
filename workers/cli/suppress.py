"""`fleet suppress`: the global suppression list (nothing is sent to these addresses)."""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.markup import escape
from rich.table import Table

from db.session import session_scope
from workers.cli.context import ensure_servers, err, out
from workers.cli.output import print_json, utc
from workers.sends import suppressions
from workers.sends.suppressions import ANY_CHANNEL, InvalidSuppression

app = typer.Typer(help="The suppression list: addresses that get nothing, from any workflow.",
                  no_args_is_help=True)

EMAIL = typer.Argument(..., help="the address: an email (for sms or push, that channel's address)")
CHANNEL_HELP = "email, sms, push, webhook, or * for every channel"


def _valid(check: Callable[[str], str], value: str) -> str:
    """`check(value)`, or one line saying what is wrong and exit 2 (before any server is needed)."""
    try:
        return check(value)
    except InvalidSuppression as exc:
        err.print(f"invalid input: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _where(channel: str) -> str:
    return "every channel" if channel == ANY_CHANNEL else channel


@app.command()
def add(email: str = EMAIL,
        channel: str = typer.Option(ANY_CHANNEL, "--channel", help=CHANNEL_HELP),
        reason: str = typer.Option(None, "--reason", help="why (shown by `fleet suppress list`)"),
        ) -> None:
    """Suppress an address on a channel (default: every channel), transactional sends included."""
    address = _valid(suppressions.normalise_address, email)
    channel = _valid(suppressions.check_channel, channel)
    if reason is not None:
        reason = _valid(suppressions.check_reason, reason)
    ensure_servers()
    with session_scope() as session:
        added = suppressions.add(session, address, channel, reason)
    out.print(f"suppressed {address} on {_where(channel)}" if added
              else f"{address} was already suppressed on {_where(channel)} (reason kept)",
              markup=False, highlight=False)


@app.command()
def remove(email: str = EMAIL,
           channel: str = typer.Option(ANY_CHANNEL, "--channel", help=CHANNEL_HELP)) -> None:
    """Lift the suppression of an address on exactly that channel (default: the * entry)."""
    address = _valid(suppressions.normalise_address, email)
    channel = _valid(suppressions.check_channel, channel)
    ensure_servers()
    with session_scope() as session:
        removed = suppressions.remove(session, address, channel)
    if not removed:
        err.print(f"{address} is not suppressed on {_where(channel)}", markup=False,
                  highlight=False)
        raise typer.Exit(1)
    out.print(f"unsuppressed {address} on {_where(channel)}", markup=False, highlight=False)


@app.command("list")
def list_(channel: str = typer.Option(None, "--channel",
                                      help="only what applies to this channel (* : only the "
                                           "every-channel entries)"),
          limit: int = typer.Option(suppressions.DEFAULT_LIMIT, min=1),
          as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Suppressed addresses, newest first."""
    if channel is not None:
        channel = _valid(suppressions.check_channel, channel)
    ensure_servers()
    with session_scope() as session:
        rows = suppressions.list_(session, channel, limit)
    if as_json:
        print_json([{"address": row.address, "channel": row.channel, "reason": row.reason,
                     "created_at": utc(row.created_at)} for row in rows])
        return
    table = Table("address", "channel", "reason", "created")
    for row in rows:
        table.add_row(escape(row.address), row.channel, escape(row.reason or "-"),
                      f"{row.created_at:%Y-%m-%d %H:%M:%S}")
    out.print(table)
    if not rows:
        err.print("no suppressions")
