"""SpiffWorkflow's script engine, with every expression and script run by the sandbox."""

from __future__ import annotations

import json
from typing import Any

from SpiffWorkflow.bpmn.script_engine import PythonScriptEngine
from SpiffWorkflow.bpmn.script_engine.python_environment import BasePythonScriptEngineEnvironment

from workers.engine import sandbox
from workers.engine.sandbox import SandboxError

# Internal data key under which the stepper hands a service task its operator's result.
ACTION_RESULT = "fleet_action_result"


class SandboxEnvironment(BasePythonScriptEngineEnvironment):
    """Evaluates gateway conditions, timers and scripts with `workers.engine.sandbox`."""

    def __init__(self) -> None:
        super().__init__(environment_globals={})

    def evaluate(self, expression: str, context: dict[str, Any],
                 external_context: dict[str, Any] | None = None) -> Any:
        return sandbox.evaluate(expression, {**(external_context or {}), **context})

    def execute(self, script: str, context: dict[str, Any],
                external_context: dict[str, Any] | None = None) -> bool:
        external = external_context or {}
        result = sandbox.execute(script, {**external, **context})
        context.update({k: v for k, v in result.items() if k not in external or k in context})
        return True


class SandboxScriptEngine(PythonScriptEngine):
    """The script engine every BpmnWorkflow of the fleet is built with."""

    def __init__(self) -> None:
        super().__init__(environment=SandboxEnvironment())

    def validate(self, expression: str) -> None:
        sandbox.check(expression, "eval")

    def call_service(self, task: Any, operation_name: str, operation_params: dict[str, Any]) -> str:
        """A service task's result: its operator already ran on the actions queue."""
        if ACTION_RESULT not in task.internal_data:
            raise SandboxError(f"operator {operation_name!r} has not run for this task")
        return json.dumps(task.internal_data.pop(ACTION_RESULT))
