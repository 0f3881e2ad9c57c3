"""The one retry decision: try a failed unit of work again later, or give up on it.

Failures are sorted by `workers.errors`: transient ones are retried with
exponential backoff and full jitter up to a bound, a larger one while the database
or the broker is unreachable (`is_outage`), so an outage is waited out; permanent
ones, and transient ones past their bound, are given up on.

Each bound counts its own kind of retry: a message carries how many of its retries
waited out an outage (the `OUTAGE_RETRIES` header). Otherwise a message that rode out
a minute's outage (dozens of retries) would be given up on at the first deadlock
after it, its transient bound long spent on retries that were no fault of its own. Giving up is never
dropping: `FleetTask` commits a dead letter, the micro-batched ingest hands its
events to a task that does. Both ask this module, so a change of policy happens here.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from workers.errors import is_outage, is_transient
from workers.settings import Settings, get_settings

# Message header: how many of a message's retries (Celery's `retries`) were outages.
OUTAGE_RETRIES = "fleet_outage_retries"


def outage_retries(headers: object, retries: int) -> int:
    """The message's outage retries from its headers (any value the wire allows: 0 if it is
    not a count, at most `retries`)."""
    value = headers.get(OUTAGE_RETRIES) if isinstance(headers, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(0, min(value, retries))


def backoff_delay(retries: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**retries)]."""
    return random.uniform(0, min(cap, base * (2**retries)))


@dataclass(frozen=True)
class RetryLater:
    """Try again after `delay` seconds."""

    delay: float


@dataclass(frozen=True)
class GiveUp:
    """Stop retrying; `transient`: the error might have passed, but the bound is reached."""

    transient: bool


Decision = RetryLater | GiveUp


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int  # of a transient error
    outage_max_retries: int  # while a dependency is unreachable
    backoff_base: float
    backoff_max: float

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> RetryPolicy:
        settings = settings or get_settings()
        return cls(max_retries=settings.task_max_retries,
                   outage_max_retries=settings.outage_max_retries,
                   backoff_base=settings.retry_backoff_base,
                   backoff_max=settings.retry_backoff_max)

    def in_process(self, max_delay: float) -> RetryPolicy:
        """This policy for retries that wait in a worker process rather than in the broker.

        Delays are capped at `max_delay`, and outages are given up on at once: waiting
        one out in-process would hold the work (and everything buffered with it) for
        as long as it lasts, so it is handed to a task that waits in the broker.
        """
        return dataclasses.replace(self, outage_max_retries=0,
                                   backoff_max=min(self.backoff_max, max_delay))

    def backoff(self, retries: int) -> float:
        """The delay before retry number `retries + 1` (of the same kind)."""
        return backoff_delay(retries, self.backoff_base, self.backoff_max)

    def decide(self, exc: BaseException, retries: int, outages: int = 0) -> Decision:
        """Retry `exc` later, or give up on it, after `retries` retries so far of which
        `outages` waited out an outage; each kind has its own bound and backoff."""
        transient = is_transient(exc)
        if is_outage(exc):
            done, limit = outages, self.outage_max_retries
        else:
            done, limit = retries - outages, self.max_retries
        if transient and done < limit:
            return RetryLater(self.backoff(done))
        return GiveUp(transient)
