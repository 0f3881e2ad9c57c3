"""The one retry decision shared by FleetTask and the micro-batched ingest."""

from __future__ import annotations

import psycopg.errors
import sqlalchemy.exc

from workers.errors import PermanentError
from workers.retry_policy import OUTAGE_RETRIES, GiveUp, RetryLater, RetryPolicy, outage_retries

POLICY = RetryPolicy(max_retries=3, outage_max_retries=100, backoff_base=1.0, backoff_max=300.0)


def _db_error(error: Exception) -> sqlalchemy.exc.DBAPIError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, error)


DEADLOCK = _db_error(psycopg.errors.DeadlockDetected("deadlock"))
OUTAGE = _db_error(psycopg.errors.AdminShutdown("terminating connection"))


def test_permanent_errors_are_given_up_at_once() -> None:
    assert POLICY.decide(PermanentError("bad input"), 0) == GiveUp(transient=False)
    assert POLICY.decide(ValueError("bad input"), 0) == GiveUp(transient=False)


def test_transient_errors_back_off_within_their_bound() -> None:
    for retries in range(3):
        decision = POLICY.decide(DEADLOCK, retries)
        assert isinstance(decision, RetryLater)
        assert 0 <= decision.delay <= 2**retries
    assert POLICY.decide(DEADLOCK, 3) == GiveUp(transient=True)


def test_outages_are_retried_for_their_own_longer_bound() -> None:
    decision = POLICY.decide(OUTAGE, 50, outages=50)
    assert isinstance(decision, RetryLater) and decision.delay <= POLICY.backoff_max
    assert POLICY.decide(OUTAGE, 100, outages=100) == GiveUp(transient=True)


def test_each_bound_counts_its_own_retries() -> None:
    """A message that rode out 39 outage retries still gets its 3 transient ones (and a
    backoff from their count), and transient retries do not spend the outage bound."""
    decision = POLICY.decide(DEADLOCK, 39, outages=39)
    assert isinstance(decision, RetryLater) and decision.delay <= 1
    assert isinstance(POLICY.decide(DEADLOCK, 41, outages=39), RetryLater)
    assert POLICY.decide(DEADLOCK, 42, outages=39) == GiveUp(transient=True)
    assert isinstance(POLICY.decide(OUTAGE, 102, outages=99), RetryLater)


def test_the_outage_count_is_read_from_any_header_value() -> None:
    for value, expected in ((3, 3), (99, 10), (-1, 0), ("3", 0), (True, 0), (None, 0),
                            (2.5, 0), ([1], 0)):
        assert outage_retries({OUTAGE_RETRIES: value}, 10) == expected, value
    assert outage_retries(None, 10) == 0 and outage_retries({}, 10) == 0


def test_a_read_only_database_is_an_outage_and_retried() -> None:
    """A failover that left the pool on a standby (SQLSTATE 25006) passes: it is not bad input."""
    read_only = sqlalchemy.exc.InternalError(
        "INSERT", {}, psycopg.errors.ReadOnlySqlTransaction("read-only transaction"))
    assert isinstance(POLICY.decide(read_only, 10), RetryLater)


def test_in_process_retries_hand_outages_off_and_wait_briefly() -> None:
    local = POLICY.in_process(max_delay=30.0)
    assert local.decide(OUTAGE, 0) == GiveUp(transient=True)
    decision = local.decide(DEADLOCK, 2)
    assert isinstance(decision, RetryLater) and decision.delay <= 4
    assert local.backoff_max == 30.0 and local.max_retries == POLICY.max_retries
    assert local.decide(DEADLOCK, 3) == GiveUp(transient=True)
