"""The fleet's one declarative beat schedule.

Each entry names a task, a schedule (crontab or interval), the queue it runs on and
an `expires`, so a backlog of missed runs never piles up on a queue.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from workers.queues import MAINTENANCE, SEGMENTS, TaskNames
from workers.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The schedule; the reaper sweeps four times per FLEET_STUCK_STEP_SECONDS (at most every 60 s)."""
    reap_every = min(60.0, settings.stuck_step_seconds / 4)
    return {
        "relay-outbox": {
            "task": TaskNames.RELAY_OUTBOX,
            "schedule": 2.0,
            "options": {"queue": MAINTENANCE, "expires": 10},
        },
        "wake-due-timers": {  # durable timers: steps every execution whose wake_at has passed
            "task": TaskNames.WAKE_DUE_TIMERS,
            "schedule": 5.0,
            "options": {"queue": MAINTENANCE, "expires": 20},
        },
        "reap-stuck-steps": {  # re-sends steps lost with a killed worker or a dropped message
            "task": TaskNames.REAP_STUCK,
            "schedule": reap_every,
            "options": {"queue": MAINTENANCE, "expires": reap_every * 0.9},
        },
        "refresh-expiring-segments": {
            "task": TaskNames.REFRESH_EXPIRED_SEGMENTS,
            "schedule": 60.0,
            "options": {"queue": SEGMENTS, "expires": 55},
        },
        "start-due-schedules": {  # scheduled journeys due now, and runs whose worker died
            "task": TaskNames.START_DUE_SCHEDULES,
            "schedule": 30.0,
            "options": {"queue": SEGMENTS, "expires": 25},
        },
        "metrics-daily": {  # yesterday's figures, once the day is over everywhere in UTC
            "task": TaskNames.METRICS_DAILY,
            "schedule": crontab(minute=15, hour=0),
            "options": {"queue": MAINTENANCE, "expires": 20 * 3600},
        },
        "retention-nightly": {
            "task": TaskNames.RETENTION,
            "schedule": crontab(minute=30, hour=1),
            "options": {"queue": MAINTENANCE, "expires": 20 * 3600},
        },
        "ensure-partitions-daily": {
            "task": TaskNames.ENSURE_PARTITIONS,
            "schedule": crontab(minute=5, hour=0),
            "options": {"queue": MAINTENANCE, "expires": 6 * 3600},
        },
    }
