"""`fleet bench soak`: a sustained event stream through a whole fleet, watched over time.

A scratch fleet (a worker per busy queue, maintenance and a beat; see
`workers.tools.chaos.fleet`) runs the chaos program: page views, signups that start the
journey workflow (a message, a message wait with a timer, a stage change, a
webhook to a local receiver) and a few bad envelopes. First the fleet's maximum is
measured (a burst of events sent as fast as possible, timed until every one is
accounted for and every journey it started has ended); then events are sent at
`rate` (default 70% of that maximum) for the given minutes. Every `sample_seconds` a sample is taken: events/s accepted,
queue depths, p99 enqueue-to-commit latency of the window's page views, and each
worker's resident memory (main process plus pool). At the end the stream stops,
the fleet settles and the invariants are checked.

Verdicts: memory is flat when the least-squares growth of the workers' total RSS
over the run (after the first fifth, the warm-up) is under 5% of its start; the
backlog is not growing when its least-squares slope over the run, times the run's
length, stays under one second's worth of events (at least 50 messages).
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text

from workers.tools.chaos.fleet import ChaosFleet
from workers.tools.chaos.invariants import InvariantReport, check
from workers.tools.chaos.program import VIEWED, EventStream, apply_program
from workers.tools.chaos.receiver import webhook_server
from workers.tools.chaos.scenarios import Publisher, accounted, journeys_done

SIGNUP_SHARE = 0.05  # of the stream's events: each starts a journey (≈ 8 steps, 2 operator calls)


@dataclass
class SoakSample:
    second: float
    sent: int
    accepted: int
    accepted_per_s: float
    queued: dict[str, int]
    p99_latency_ms: float | None
    rss_mb: dict[str, float]


@dataclass
class SoakResult:
    measured_max_per_s: float
    rate_per_s: float
    minutes: float
    sent: int
    accepted_per_s_mean: float
    p99_latency_ms_worst: float | None
    rss_mb_start: float
    rss_mb_end: float
    rss_growth_mb: float
    memory_flat: bool
    backlog_start: int
    backlog_end: int
    backlog_slope_per_min: float
    backlog_growing: bool
    settle_seconds: float
    invariants: InvariantReport
    samples: list[SoakSample] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["invariants"] = self.invariants.as_dict()
        return out


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return 0.0
    return statistics.linear_regression(xs, ys).slope


def measure_max(fleet: ChaosFleet, publisher: Publisher, events: int, timeout: float) -> float:
    """Events/s of a burst sent as fast as possible, until every one is accounted for and
    every journey it started has ended.

    Conservative on purpose: the journeys' timer waits (6 s, woken by a 5 s sweep)
    are counted too. Stopping at "no step in flight" instead measured a rate whose
    70% grew the workflow backlog by ~600 messages a minute: half of each journey
    runs after its timer, outside such a window.
    """
    started = time.monotonic()
    publisher.run(events, rate=1e9)
    fleet.wait_until(lambda: accounted(fleet, publisher.sent) and journeys_done(fleet), timeout,
                     "the calibration burst")
    return events / (time.monotonic() - started)


def _p99_ms(fleet: ChaosFleet, run: str, since: float) -> float | None:
    value = fleet.scalar(text(
        "SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM created_at) "
        "- (event_data->>'sent_at')::float8) FROM lifecycle_events WHERE event_type = :t "
        "AND event_data->>'run' = :r AND created_at >= to_timestamp(:since)"),
        {"t": VIEWED, "r": run, "since": since})
    return None if value is None else round(float(value) * 1000, 1)


def _accepted(fleet: ChaosFleet, run: str) -> int:
    return int(fleet.scalar(text(
        "SELECT count(*) FROM lifecycle_events WHERE event_data->>'run' = :r"), {"r": run}))


def run(minutes: float = 10.0, rate: float | None = None, sample_seconds: float = 15.0,
        calibration_events: int = 6000, concurrency: int = 2,
        on_sample: Any = None) -> SoakResult:
    """Soak a scratch fleet; `on_sample(sample)` is called as each sample is taken."""
    with webhook_server() as receiver, ChaosFleet(kind="soak", concurrency=concurrency) as fleet:
        apply_program(fleet.engine, receiver.url)
        fleet.start()
        time.sleep(1)  # trigger caches
        run_id = uuid.uuid4().hex[:8]
        publisher = Publisher(fleet, EventStream(run_id, users=10**9,
                                                 signup_share=SIGNUP_SHARE))
        measured = measure_max(fleet, publisher, calibration_events, timeout=600)
        rate = rate or round(0.7 * measured, 1)
        events = int(minutes * 60 * rate)
        sender = threading.Thread(target=publisher.run, args=(events, rate), daemon=True)
        started = time.monotonic()
        sender.start()
        samples: list[SoakSample] = []
        last_accepted, last_at = _accepted(fleet, run_id), time.monotonic()
        while sender.is_alive():
            window_start = time.time()
            sender.join(sample_seconds)
            now = time.monotonic()
            accepted = _accepted(fleet, run_id)
            sample = SoakSample(
                second=round(now - started, 1), sent=publisher.sent.sent, accepted=accepted,
                accepted_per_s=round((accepted - last_accepted) / (now - last_at), 1),
                queued=fleet.depths(), p99_latency_ms=_p99_ms(fleet, run_id, window_start),
                rss_mb=fleet.rss_mb())
            last_accepted, last_at = accepted, now
            samples.append(sample)
            if on_sample is not None:
                on_sample(sample)
        settle_started = time.monotonic()
        fleet.wait_until(lambda: accounted(fleet, publisher.sent), 600, "every event accounted for")
        fleet.wait_until(lambda: journeys_done(fleet), 600, "every execution ended")
        settle = time.monotonic() - settle_started
        invariants = check(fleet.engine, publisher.sent, receiver)
    return _summarize(samples, measured, rate, minutes, publisher.sent.sent, settle, invariants)


def _summarize(samples: list[SoakSample], measured: float, rate: float, minutes: float,
               sent: int, settle: float, invariants: InvariantReport) -> SoakResult:
    xs = [s.second / 60 for s in samples]
    rss = [sum(v for k, v in s.rss_mb.items() if k.startswith("worker-")) for s in samples]
    backlog = [float(sum(s.queued.values())) for s in samples]
    warm = max(1, len(samples) // 5)
    rss_slope = _slope(xs[warm:], rss[warm:])
    rss_growth = rss_slope * (xs[-1] - xs[warm]) if len(xs) > warm else 0.0
    backlog_slope = _slope(xs, backlog)
    latencies = [s.p99_latency_ms for s in samples if s.p99_latency_ms is not None]
    return SoakResult(
        measured_max_per_s=round(measured, 1), rate_per_s=rate, minutes=minutes, sent=sent,
        accepted_per_s_mean=round(statistics.fmean(s.accepted_per_s for s in samples), 1)
        if samples else 0.0,
        p99_latency_ms_worst=max(latencies) if latencies else None,
        rss_mb_start=round(rss[warm] if len(rss) > warm else rss[0], 1) if rss else 0.0,
        rss_mb_end=round(rss[-1], 1) if rss else 0.0,
        rss_growth_mb=round(rss_growth, 1),
        memory_flat=not rss or rss_growth < 0.05 * rss[min(warm, len(rss) - 1)],
        backlog_start=int(backlog[0]) if backlog else 0,
        backlog_end=int(backlog[-1]) if backlog else 0,
        backlog_slope_per_min=round(backlog_slope, 1),
        backlog_growing=backlog_slope * minutes > max(50.0, rate),
        settle_seconds=round(settle, 1), invariants=invariants, samples=samples,
    )
