"""`fleet bench sends`, run small against the session's servers as a script runs it: every
figure is printed and the figures agree with each other (speed is never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from tests.helpers import ROOT
from workers.tools.bench.sends import SendsBenchResult

pytestmark = pytest.mark.servers


def test_the_sends_benchmark_prints_figures_that_hang_together() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "bench", "sends", "--sends", "50",
         "--worker-sends", "20", "--json"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])

    assert set(figures) == {f.name for f in fields(SendsBenchResult)}
    assert (figures["sends"], figures["worker_sends"], figures["concurrency"]) == (50, 20, 1)
    with_rate, without_rate = (figures["sends_per_s_with_gateway"],
                               figures["sends_per_s_without_gateway"])
    assert with_rate > 0 and without_rate > 0 and figures["worker_sends_per_s_with_gateway"] > 0
    # The share is defined from the two rates (rounded to 0.1/s, hence the tolerance).
    assert figures["gateway_share_of_operator_call"] == pytest.approx(
        1 - with_rate / without_rate, abs=0.01)
    # Each call contains its gate() call: the gateway's time is a part of the call's.
    assert 0 < figures["gateway_ms_p50"] <= figures["gateway_ms_p99"]
    assert figures["gateway_ms_p50"] < figures["operator_call_ms_p50"]
    assert figures["operator_call_ms_p50"] <= figures["operator_call_ms_p99"]
    assert 0 < figures["gateway_share_timed_inside"] < 1
    # The bypass only removes queries: the gateway's own.
    assert (figures["statements_per_call_with_gateway"]
            > figures["statements_per_call_without_gateway"] > 0)
    assert json.loads(figures["policy"])["messaging"]["send_window"] == {"hours": "00:00-24:00"}
