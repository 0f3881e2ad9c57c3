"""The one retry decision: try a failed unit of work again later, or give up on it.

Failures are sorted by `workers.errors`: transient ones are retried with
exponential backoff and full jitter up to a bound, a larger one while the database
or the broker is unreachable (`is_outage`), so an outage is waited out; permanent
ones, and transient ones past their bound, are given up on. Giving up is never
dropping: `FleetTask` commits a dead letter, the micro-batched ingest hands its
events to a task that does. Both ask this module, so a change of policy happens here.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from workers.errors import is_outage, is_transient
from workers.settings import Settings, get_settings


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
        """The delay before retry number `retries + 1`."""
        return backoff_delay(retries, self.backoff_base, self.backoff_max)

    def decide(self, exc: BaseException, retries: int) -> Decision:
        """Retry `exc` (after `retries` retries so far) later, or give up on it."""
        transient = is_transient(exc)
        limit = self.outage_max_retries if is_outage(exc) else self.max_retries
        if transient and retries < limit:
            return RetryLater(self.backoff(retries))
        return GiveUp(transient)
