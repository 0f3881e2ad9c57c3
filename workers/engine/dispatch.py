"""Send engine work to the broker: steps (workflows queue) and operator calls (actions queue).

Called only after the transaction that decided the work has committed (send after
commit: docs/architecture.md); a send lost after the commit is re-sent by the reaper.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Protocol

from db import tenancy
from workers.celery_app import app
from workers.queues import TaskNames


class StartsAndWakes(Protocol):
    """What an ingest decided for the engine (`workers.events.ingest.IngestResult`)."""

    @property
    def started(self) -> Sequence[uuid.UUID]: ...  # executions to step at version 0

    @property
    def woken(self) -> Sequence[tuple[uuid.UUID, int]]: ...  # (execution, version) to step

    @property  # the same steps, each with its workspace (empty: the current workspace's)
    def steps_in(self) -> Sequence[tuple[uuid.UUID, tuple[uuid.UUID, int]]]: ...


def send_step(execution_id: uuid.UUID, version: int, eta: dt.datetime | None = None) -> None:
    send_steps([(execution_id, version)], eta)


def send_steps(due: Iterable[tuple[uuid.UUID, int]], eta: dt.datetime | None = None) -> None:
    """Publish many steps through one producer (one connection, no pool round per message)."""
    steps = list(due)
    if not steps:
        return
    with app.producer_or_acquire() as producer:
        for execution_id, version in steps:
            app.send_task(TaskNames.STEP, args=[str(execution_id), version], eta=eta,
                          producer=producer)


def send_action(key: str) -> None:
    send_actions([key])


def send_actions(keys: Sequence[str]) -> None:
    if not keys:
        return
    with app.producer_or_acquire() as producer:
        for key in keys:
            app.send_task(TaskNames.RUN_ACTION, args=[key], producer=producer)


def send_ingest_followups(results: Iterable[StartsAndWakes]) -> None:
    """First steps of executions an ingest started, and steps of executions it woke, each
    published in its execution's workspace (the `fleet_workspace` header)."""
    by_workspace: dict[uuid.UUID | None, list[tuple[uuid.UUID, int]]] = {}
    for result in results:
        if result.steps_in:
            for workspace_id, step in result.steps_in:
                by_workspace.setdefault(workspace_id, []).append(step)
        else:
            by_workspace.setdefault(None, []).extend(
                [*((execution_id, 0) for execution_id in result.started), *result.woken])
    for owner, steps in by_workspace.items():
        with nullcontext() if owner is None else tenancy.workspace(owner):
            send_steps(steps)
