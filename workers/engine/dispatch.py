"""Send engine work to the broker: steps (workflows queue) and operator calls (actions queue).

Called only after the transaction that decided the work has committed (send after
commit: docs/architecture.md); a send lost after the commit is re-sent by the reaper.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Protocol

from workers.celery_app import app
from workers.queues import TaskNames


class StartsAndWakes(Protocol):
    """What an ingest decided for the engine (`workers.events.ingest.IngestResult`)."""

    @property
    def started(self) -> Sequence[uuid.UUID]: ...  # executions to step at version 0

    @property
    def woken(self) -> Sequence[tuple[uuid.UUID, int]]: ...  # (execution, version) to step


def send_step(execution_id: uuid.UUID, version: int) -> None:
    app.send_task(TaskNames.STEP, args=[str(execution_id), version])


def send_steps(due: Iterable[tuple[uuid.UUID, int]]) -> None:
    for execution_id, version in due:
        send_step(execution_id, version)


def send_action(key: str) -> None:
    app.send_task(TaskNames.RUN_ACTION, args=[key])


def send_ingest_followups(results: Iterable[StartsAndWakes]) -> None:
    """First steps of executions an ingest started, and steps of executions it woke."""
    for result in results:
        send_steps((execution_id, 0) for execution_id in result.started)
        send_steps(result.woken)
