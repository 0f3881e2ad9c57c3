"""What every command needs first: URLs of real servers, or embedded ones started for it."""

from __future__ import annotations

import os

from rich.console import Console

from db.session import reset_engine
from workers.embedded import EmbeddedServices
from workers.settings import Settings, get_settings

console = Console(stderr=True)


def embedded_services() -> EmbeddedServices:
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
