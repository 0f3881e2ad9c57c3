"""Send engine work to the broker: steps (workflows queue) and operator calls (actions queue).

Called only after the transaction that decided the work has committed (DESIGN
decision 3); a send lost after the commit is re-sent by the reaper.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from workers.queues import TaskNames


def send_step(execution_id: uuid.UUID, version: int) -> None:
    from workers.celery_app import app

    app.send_task(TaskNames.STEP, args=[str(execution_id), version])


def send_steps(due: Iterable[tuple[uuid.UUID, int]]) -> None:
    for execution_id, version in due:
        send_step(execution_id, version)


def send_action(key: str) -> None:
    from workers.celery_app import app

    app.send_task(TaskNames.RUN_ACTION, args=[key])


def send_ingest_followups(results: Iterable[Any]) -> None:
    """First steps of executions an ingest started, and steps of executions it woke."""
    for result in results:
        send_steps((execution_id, 0) for execution_id in result.started)
        send_steps(result.woken)
