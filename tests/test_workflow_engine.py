"""The workflow engine with a real worker: one node per step, state in PostgreSQL."""

from __future__ import annotations

import pytest

from tests.helpers import WorkerProcess
from tests.workflow_helpers import deploy, history, nodes, start, wait_status

pytestmark = pytest.mark.servers


def test_script_and_exclusive_gateway_run_node_by_node(celery_worker: WorkerProcess) -> None:
    name = deploy("score_gateway.bpmn")
    high, low = start(name, {"base": 7}), start(name, {"base": 2})
    done_high = wait_status(high, "completed", "failed")
    done_low = wait_status(low, "completed", "failed")
    assert done_high.status == "completed", done_high.error_message
    assert done_high.variables["route"] == "high" and done_high.variables["score"] == 14
    assert done_low.variables["route"] == "low"
    assert nodes(high) == ["start", "compute", "decide", "high", "end_high"]
    assert [seq for seq, _, _ in history(high)] == [1, 2, 3, 4, 5]
    assert done_high.state_version == 5 and done_high.current_node_id == "end_high"
