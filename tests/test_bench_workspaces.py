"""`fleet bench workspaces`, run small against the session's servers as a script runs it:
every configuration's figures are printed, positive, and agree with each other (speed,
and so the cost of row-level security, is never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from tests.helpers import ROOT
from workers.tools.bench.workspaces import ConfigurationResult, WorkspacesBenchResult

pytestmark = pytest.mark.servers

FIGURES = {"events_single": "events_per_s_single", "events_batch100": "events_per_s_batch100",
           "steps": "steps_per_s"}


def test_the_workspaces_benchmark_prints_each_configurations_figures() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "bench", "workspaces", "--users", "30",
         "--single", "30", "--batched", "300", "--executions", "12", "--rounds", "2",
         "--workspaces", "3", "--json"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])

    assert set(figures) == {f.name for f in fields(WorkspacesBenchResult)}
    assert (figures["users"], figures["single_events"], figures["batch_events"],
            figures["executions"], figures["rounds"]) == (30, 30, 300, 12, 2)
    configs = figures["configurations"]
    assert [(c["name"], c["row_level_security"], c["workspaces"]) for c in configs] == [
        ("rls_off", False, 1), ("rls_on_1_workspace", True, 1),
        ("rls_on_3_workspaces", True, 3)]
    for config in configs:
        assert set(config) == {f.name for f in fields(ConfigurationResult)}
        for short, figure in FIGURES.items():
            assert len(config[f"rounds_{figure}"]) == 2
            assert config[figure] > 0 and all(v > 0 for v in config[f"rounds_{figure}"])
            # The cost is defined from the ratio to rls_off (both rounded, hence the tolerance).
            assert config[f"ratio_{short}"] == pytest.approx(
                config[figure] / configs[0][figure], abs=0.002)
            assert config[f"cost_pct_{short}"] == pytest.approx(
                100 * (1 - config[f"ratio_{short}"]), abs=0.2)
    assert all(configs[0][f"ratio_{short}"] == 1 for short in FIGURES)
    # rls_off turned the policies off on the tables and the partitions (migration 0021).
    assert figures["rls_off_tables_disabled"] > 30
    assert figures["max_cost_pct"] == max(c[f"cost_pct_{short}"] for c in configs[1:]
                                          for short in FIGURES)
    assert figures["order"].startswith("ABC BCA")  # rotated: each configuration in each place
    assert "rls_off" in result.stdout and "fleet_app" in result.stdout
