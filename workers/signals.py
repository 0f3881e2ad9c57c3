"""Celery signal handlers: logging setup and fork safety of the database pool."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging, worker_process_init, worker_process_shutdown

from db.session import dispose_engine, reset_engine
from workers.log import configure_logging
from workers.settings import get_settings


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    """Connected, so Celery leaves logging to us: JSON lines with bound context."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


@worker_process_init.connect
def _fresh_pool_after_fork(**_: Any) -> None:
    """A pool must not cross fork: each pool child builds its own engine."""
    dispose_engine()


@worker_process_shutdown.connect
def _close_pool(**_: Any) -> None:
    reset_engine()
