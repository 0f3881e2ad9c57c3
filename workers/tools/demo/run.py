"""Drive a demo run against a running fleet: apply the program, stream, wait, summarize.

The fleet (workers for every queue and a beat) must be running; `fleet demo`
starts it, the tests use their own. Nothing here talks to a worker directly:
events go through the producer API, and progress is read from PostgreSQL.

Simulated time. The stream is sent one phase (a simulated day) at a time, and the
next day starts only when this one has *settled*: every event of the day is in the
inbox (ingested or a duplicate) and no execution of the run has a step or an
operator call on its way, i.e. every workflow the day started or woke is resting
on a timer or a message, or has ended. So a user's project of day 5 finds the
activation nudge of day 4 already waiting for it, and a stage move of day 5 is made
before the triggers of day 6 read the user's stage. A day also lasts at least
`day_seconds` of wall-clock time. Timers run on the wall clock, so a simulated day
is as long as the fleet needs for it: the sample program's answer windows are sized
for a busy machine (see program/program.yaml).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import text

from db.session import session_scope
from workers.definitions import ApplyReport, apply, load
from workers.queues import ACTIONS, EVENTS, WORKFLOWS
from workers.schedules import runs
from workers.sends.config import MessagingDef, SendWindowDef
from workers.settings import get_settings
from workers.tools.demo.generator import DemoStream, Phase
from workers.tools.demo.summary import progress


def _sample_program() -> Path:
    """program.yaml of the sample program, package data of this package (program/)."""
    resource = files("workers.tools.demo") / "program" / "program.yaml"
    # Installed as files (setuptools does not zip packages): `load` follows the paths of
    # the BPMN files beside it.
    if not isinstance(resource, Path):
        raise RuntimeError(f"the sample program is not on the file system: {resource}")
    return resource


PROGRAM = _sample_program()
BATCH = 100  # events per producer message (send_events)
POLL = 0.2


class Reporter(Protocol):
    """Where progress goes (the CLI draws bars; tests ignore it)."""

    def phase(self, name: str, index: int, total: int) -> None: ...

    def sent(self, count: int) -> None: ...

    def status(self, line: str) -> None: ...


class QuietReporter:
    def phase(self, name: str, index: int, total: int) -> None:
        pass

    def sent(self, count: int) -> None:
        pass

    def status(self, line: str) -> None:
        pass


@dataclass
class StreamResult:
    sent: int = 0  # envelopes handed to the broker (good and bad)
    good: int = 0
    bad: int = 0
    unsettled: list[str] = field(default_factory=list)  # phases that did not settle in time
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall-clock time per phase
    schedule_runs: dict[str, uuid.UUID] = field(default_factory=dict)  # schedule -> its run
    drained: bool = False
    seconds: float = 0.0


# The demo's send window opens this long after the program is applied (see demo_window).
WINDOW_OPENS_IN = 45.0


def apply_program(path: Path = PROGRAM, window_opens_in: float | None = WINDOW_OPENS_IN
                  ) -> ApplyReport:
    """`fleet apply` on the sample program: validated first, then one transaction.

    With `window_opens_in`, the program's send window is replaced by `demo_window`.
    """
    doc, xml = load(path)
    if window_opens_in is not None and doc.messaging is not None \
            and doc.messaging.send_window is not None:
        messaging = demo_window(doc.messaging, window_opens_in, dt.datetime.now(dt.UTC))
        doc = doc.model_copy(update={"messaging": messaging})
    with session_scope() as session:
        return apply(session, doc, xml)


def demo_window(messaging: MessagingDef, opens_in: float, now: dt.datetime) -> MessagingDef:
    """The send window moved to open at the first whole minute `opens_in` seconds from
    `now` (in the program's zone) and to stay open for 23 hours, every day.

    The demo's month lasts minutes, so the program's real hours would either never
    close or hold every send for hours; this way the first simulated days' sends wait
    for the window, then go out when it opens, re-checked by the gateway.
    """
    opens = (now + dt.timedelta(seconds=opens_in)).astimezone(messaging.zone)
    opens = opens.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    closes = opens - dt.timedelta(hours=1)
    window = SendWindowDef(hours=f"{opens:%H:%M}-{closes:%H:%M}", days=None)
    return messaging.model_copy(update={"send_window": window})


def wait_for_trigger_caches() -> None:
    """Workers re-read trigger definitions every FLEET_TRIGGER_CACHE_SECONDS."""
    time.sleep(get_settings().trigger_cache_seconds + 0.5)


def batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


class QueueProbe:
    """Messages waiting in the fleet's busy queues (a passive declare; 0 when none exist)."""

    QUEUES = (EVENTS, WORKFLOWS, ACTIONS)

    def __init__(self) -> None:
        from workers.celery_app import app

        self._connection = app.connection_for_write()
        self._channel: Any = None

    def depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for queue in self.QUEUES:
            try:
                if self._channel is None:
                    self._channel = self._connection.channel()
                if hasattr(self._channel, "_size"):  # Redis: the list's length, no declare
                    out[queue] = int(self._channel._size(queue))
                else:
                    out[queue] = int(self._channel.queue_declare(queue=queue, passive=True)
                                     .message_count)
            except Exception:  # no such queue yet (RabbitMQ), or the broker blinked
                out[queue] = 0
                self._drop_channel()
        return out

    def _drop_channel(self) -> None:
        """Close a channel a failed declare left behind (on Redis each holds a connection)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.close()
            except Exception:  # noqa: S110 - it is being dropped because it failed
                pass

    def close(self) -> None:
        self._drop_channel()
        try:
            self._connection.release()
        except Exception:  # noqa: S110 - closing a broker connection at exit
            pass


def _inbox_count(event_ids: list[str]) -> int:
    with session_scope() as session:
        return int(session.execute(text(
            "SELECT count(*) FROM event_inbox WHERE event_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": event_ids}).scalar_one())


def _describe(figures: dict[str, int], depths: dict[str, int] | None) -> str:
    line = (f"executions: {figures['in_flight']} stepping, {figures['timers']} on timers, "
            f"{figures['messages']} waiting for events, {figures['finished']} finished")
    if depths:
        line += " · queued " + ", ".join(f"{q} {n}" for q, n in depths.items())
    return line


def run_schedule(name: str) -> uuid.UUID:
    """Start a run of the named schedule now, as `fleet schedule run NAME` does."""
    # Lazy: the task module loads the Celery app, which the rest of this module does without.
    from tasks.schedules import send_run

    with session_scope() as session:
        message = runs.start_manual(session, name, dt.datetime.now(dt.UTC))
    send_run(message)
    return message.run_id


def _run_over(run_id: uuid.UUID | None) -> bool:
    if run_id is None:
        return True
    with session_scope() as session:
        run = runs.run_view(session, run_id)
    return run is not None and run.status != "running"


def settle(stream: DemoStream, phase: Phase, timeout: float, reporter: Reporter,
           probe: QueueProbe | None = None, run_id: uuid.UUID | None = None) -> bool:
    """Until the phase's events are in the inbox, its schedule's run (if any) is over, and
    no execution of the run is stepping."""
    ids = [e["event_id"] for e in phase.events]
    deadline = time.monotonic() + timeout
    while True:
        ingested = _inbox_count(ids) if ids else 0
        with session_scope() as session:
            figures = progress(session, stream.domain)
        depths = probe.depths() if probe else None
        reporter.status(f"ingested {ingested}/{len(ids)} · {_describe(figures, depths)}")
        if ingested >= len(ids) and figures["in_flight"] == 0 and _run_over(run_id):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)


def drain(stream: DemoStream, timeout: float, reporter: Reporter,
          probe: QueueProbe | None = None) -> bool:
    """Until every execution of the run has ended and the busy queues are empty."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            figures = progress(session, stream.domain)
        depths = probe.depths() if probe else {}
        reporter.status(f"draining · {_describe(figures, depths or None)}")
        if figures["active"] == 0 and not any(depths.values()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL * 2)


def send(stream: DemoStream, *, day_seconds: float = 1.0, settle_timeout: float = 120.0,
         drain_timeout: float = 300.0, reporter: Reporter | None = None,
         publish: Callable[[list[Any]], int] | None = None) -> StreamResult:
    """Send every phase (settling after each), then wait for the run to drain."""
    from workers.producer import send_events

    reporter = reporter or QuietReporter()
    publish = publish or (lambda batch: send_events(batch, validate=False))
    result = StreamResult()
    started = time.monotonic()
    probe = QueueProbe()
    try:
        for index, phase in enumerate(stream.phases):
            phase_started = time.monotonic()
            reporter.phase(phase.name, index, len(stream.phases))
            for batch in batches(phase.to_send(), BATCH):
                result.sent += publish(batch)
                reporter.sent(len(batch))
            result.good += len(phase.events)
            result.bad += len(phase.bad)
            run_id = run_schedule(phase.schedule) if phase.schedule else None
            if run_id is not None:
                result.schedule_runs[phase.schedule or ""] = run_id
            if not settle(stream, phase, settle_timeout, reporter, probe, run_id):
                result.unsettled.append(phase.name)
            rest = day_seconds - (time.monotonic() - phase_started)
            if rest > 0 and phase.name.startswith("day "):
                time.sleep(rest)
            result.phase_seconds[phase.name] = time.monotonic() - phase_started
        reporter.phase("draining", len(stream.phases), len(stream.phases))
        result.drained = drain(stream, drain_timeout, reporter, probe)
    finally:
        probe.close()
    result.seconds = time.monotonic() - started
    return result
