"""The conformance suite: every file in tests/bpmn/conformance/ run by plain SpiffWorkflow
and by the real fleet, compared with each other and with the result recorded beside it.

The SpiffWorkflow half runs in-process and needs no servers; the fleet half deploys
every file, starts them all at once through one worker set and waits for each to end.
"""

from __future__ import annotations

import functools

import pytest

from tests.conformance_helpers import (
    Outcome,
    Scenario,
    differences,
    expected,
    fleet_skip_reason,
    load_scenarios,
    run_fleet,
    run_spiff,
)
from tests.helpers import WorkerProcess

SCENARIOS = load_scenarios()
IDS = [s.name for s in SCENARIOS]


@functools.cache
def spiff_outcome(name: str) -> Outcome:
    return run_spiff(next(s for s in SCENARIOS if s.name == name))


def _report(scenario: Scenario, diffs: list[str], what: str) -> str:
    lines = "\n  ".join(diffs)
    return f"{scenario.name} ({scenario.covers}): {what}\n  {lines}"


def test_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 40


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_spiff_matches_expected(scenario: Scenario) -> None:
    diffs = differences(scenario, "expected", expected(scenario), "spiff",
                        spiff_outcome(scenario.name))
    if scenario.spiff_differs is not None:
        assert diffs, f"{scenario.name}: SpiffWorkflow now gives the expected result: drop " \
                      "spiff_differs from its file"
        pytest.xfail(f"{scenario.spiff_differs}: " + "; ".join(diffs))
    assert not diffs, _report(scenario, diffs, "plain SpiffWorkflow differs from the expected file")


@pytest.fixture(scope="module")
def fleet_outcomes(celery_worker: WorkerProcess) -> dict[str, Outcome]:
    runnable = [s for s in SCENARIOS if fleet_skip_reason(s) is None]
    return run_fleet(runnable)


@pytest.mark.servers
@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_fleet_matches_spiff(scenario: Scenario, fleet_outcomes: dict[str, Outcome]) -> None:
    reason = fleet_skip_reason(scenario)
    if reason is not None:
        pytest.skip(reason)
    fleet = fleet_outcomes[scenario.name]
    diffs = differences(scenario, "spiff", spiff_outcome(scenario.name), "fleet", fleet)
    if not diffs and scenario.spiff_differs is None:
        diffs = differences(scenario, "expected", expected(scenario), "fleet", fleet)
    assert not diffs, _report(scenario, diffs, "the fleet differs from plain SpiffWorkflow")
