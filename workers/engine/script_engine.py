"""SpiffWorkflow's script engine, with every expression and script run by the sandbox."""

from __future__ import annotations

from typing import Any

from SpiffWorkflow.bpmn.script_engine import PythonScriptEngine
from SpiffWorkflow.bpmn.script_engine.python_environment import BasePythonScriptEngineEnvironment

from workers.engine import sandbox


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


class SandboxScriptEngine(PythonScriptEngine):  # type: ignore[misc]
    """The script engine every BpmnWorkflow of the fleet is built with."""

    def __init__(self) -> None:
        super().__init__(environment=SandboxEnvironment())

    def validate(self, expression: str) -> None:
        sandbox.check(expression, "eval")
