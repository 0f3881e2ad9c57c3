"""Tasks that exist only for tests, loaded by the test worker with `--include`."""

from __future__ import annotations

from sqlalchemy import text

from workers.base_task import FleetTask
from workers.celery_app import app
from workers.errors import PermanentError, TransientError


def _record(task: FleetTask, key: str) -> None:
    task.session.execute(
        text("INSERT INTO test_support.task_runs (key, attempt) VALUES (:key, :attempt)"),
        {"key": key, "attempt": task.request.retries},
    )


@app.task(base=FleetTask, bind=True, name="maintenance.test_flaky")
def flaky(self: FleetTask, key: str, fail_times: int) -> None:
    """Fails transiently `fail_times` times (after writing a row that must roll back)."""
    _record(self, key)
    if self.request.retries < fail_times:
        raise TransientError(f"attempt {self.request.retries} fails on purpose")


@app.task(base=FleetTask, bind=True, name="maintenance.test_outage_then_flaky")
def outage_then_flaky(self: FleetTask, key: str, outages: int, fail_times: int) -> None:
    """Meets an outage (ConnectionError) `outages` times, then fails transiently
    `fail_times` times: the outage's retries must not spend the transient bound."""
    _record(self, key)
    if self.request.retries < outages:
        raise ConnectionError(f"attempt {self.request.retries}: the database is down on purpose")
    if self.request.retries < outages + fail_times:
        raise TransientError(f"attempt {self.request.retries}: a deadlock on purpose")


@app.task(base=FleetTask, bind=True, name="maintenance.test_broken")
def broken(self: FleetTask, key: str) -> None:
    """Writes a row, then fails permanently: the row must roll back, a dead letter appear."""
    _record(self, key)
    raise PermanentError(f"broken on purpose: {key}")


@app.task(base=FleetTask, bind=True, name="maintenance.test_then_send")
def write_then_send(self: FleetTask, key: str) -> None:
    """Writes a row and sends a follow-up only after commit; the follow-up sees the row."""
    _record(self, key)
    self.after_commit(lambda: check_visible.delay(key))


@app.task(base=FleetTask, bind=True, name="maintenance.test_check_visible")
def check_visible(self: FleetTask, key: str) -> None:
    seen = self.session.execute(
        text("SELECT count(*) FROM test_support.task_runs WHERE key = :key"), {"key": key}
    ).scalar_one()
    _record(self, f"{key}:seen={seen}")


@app.task(base=FleetTask, bind=True, name="maintenance.test_kills_its_worker")
def kills_its_worker(self: FleetTask, key: str) -> None:
    """Records the attempt (committed), then dies like an out-of-memory kill, every time."""
    import os
    import signal

    from db.session import session_scope

    with session_scope() as session:
        session.execute(text("INSERT INTO test_support.task_runs (key, attempt) "
                             "VALUES (:key, 0)"), {"key": key})
    os.kill(os.getpid(), signal.SIGKILL)
