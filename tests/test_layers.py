"""Layers import one way, checked from the source (no servers needed).

The import graph is built from the AST of every module under workers/, tasks/ and db/
(and beat_schedule.py). Layer rules count every import, wherever it is written; the
cycle check counts the imports that run when a module is loaded (module level, not
inside functions or `if TYPE_CHECKING:`).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from db.config import DatabaseConfig
from workers.queues import TaskNames
from workers.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("workers", "tasks", "db")

# importer, what it must not import, why.
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    ("db", "workers", "the database layer knows nothing of the fleet above it"),
    ("db", "tasks", "the database layer knows nothing of the fleet above it"),
    ("workers.engine", "workers.events", "the engine knows BPMN, not events"),
    ("workers.engine", "workers.rules", "the engine knows BPMN, not triggers or segments"),
    ("workers.engine", "workers.operators", "operators sit beside the engine, not in it"),
    ("workers.engine", "workers.schedules", "the engine knows BPMN, not schedules"),
    ("workers.rules", "workers.schedules", "schedules read segments, not the other way"),
    ("workers.schedules", "workers.events", "a schedule starts executions, it ingests nothing"),
    ("workers.schedules", "workers.operators", "a schedule starts executions, it runs no node"),
)

# `import workers.producer` (a producer's process) must not load these.
PRODUCER_MUST_NOT_LOAD = ("sqlalchemy", "prometheus_client", "db")


@dataclass(frozen=True)
class Import:
    target: str
    line: int
    at_load: bool  # runs when the module is imported (not in a function or TYPE_CHECKING)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    paths = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    paths.append(ROOT / "beat_schedule.py")
    return {_module_name(p): p for p in paths}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: set[str]) -> Iterator[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def resolve(base: str, names: list[str]) -> Iterator[str]:
        for name in names:  # `from a import b` imports module a.b when there is one
            yield f"{base}.{name}" if f"{base}.{name}" in known else base

    def visit(node: ast.AST, at_load: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(alias.name, child.lineno, at_load)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for target in resolve(base, [a.name for a in child.names]):
                    yield Import(target, child.lineno, at_load)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                yield from visit(child, False)
            else:
                yield from visit(child, at_load)

    yield from visit(ast.parse(path.read_text(), str(path)), True)


def _graph() -> dict[str, list[Import]]:
    sources = _sources()
    known = set(sources)
    return {module: list(_imports(module, path, known)) for module, path in sources.items()}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_layer_rules() -> None:
    broken = [f"{module}:{imp.line} imports {imp.target} ({why})"
              for module, imports in sorted(_graph().items())
              for imp in imports
              for importer, forbidden, why in FORBIDDEN
              if _within(module, importer) and _within(imp.target, forbidden)]
    assert not broken, "\n".join(broken)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def test_no_import_cycles() -> None:
    graph = _graph()
    edges = {module: {imp.target for imp in imports if imp.at_load and imp.target in graph}
             for module, imports in graph.items()}
    cycles = _cycles(edges)
    assert not cycles, "import cycles (module level):\n" + "\n".join(" <-> ".join(c)
                                                                        for c in cycles)


def test_the_checker_tells_load_time_imports_from_the_others(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text("import a\nif TYPE_CHECKING:\n    import b\n"
                      "def f():\n    from c import d\n")
    assert [(i.target, i.at_load) for i in _imports("pkg.example", source, {"c.d"})] == [
        ("a", True), ("b", False), ("c.d", False)]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_producer_loads_neither_the_database_nor_metrics() -> None:
    code = "import json, sys, workers.producer; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout)
    heavy = [m for m in loaded if any(_within(m, name) for name in PRODUCER_MUST_NOT_LOAD)]
    assert not heavy, f"import workers.producer loads {heavy}"


def test_a_starting_worker_loads_the_signal_handlers_and_every_task() -> None:
    """What the producer does not load, a worker (beat, Flower) loads when it starts."""
    code = ("import json, sys; from workers.celery_app import app; "
            "app.loader.import_default_modules(); "
            "print(json.dumps(['workers.signals' in sys.modules, sorted(app.tasks)]))")
    signals, tasks = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                                               check=True, capture_output=True,
                                               text=True).stdout)
    fleet = {name for key, name in vars(TaskNames).items()
             if not key.startswith("_") and not name.startswith("bench.")}
    assert signals and fleet <= set(tasks), sorted(fleet - set(tasks))


def test_database_configuration_agrees_with_the_settings(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """db/ reads DATABASE_URL and FLEET_DB_* itself: the same variables and defaults as the
    fleet's settings, which only add the embedded-server fallback."""
    for name, value in (("DATABASE_URL", "postgresql://u@h/d"), ("FLEET_DB_POOL_SIZE", "7"),
                        ("FLEET_DB_MAX_OVERFLOW", "2"), ("FLEET_DB_STATEMENT_TIMEOUT_MS", "1000")):
        monkeypatch.setenv(name, value)
    assert DatabaseConfig.from_environment() == Settings(home=tmp_path).database
    defaults = DatabaseConfig(url=None)
    fields = Settings.model_fields
    assert (fields["db_pool_size"].default, fields["db_max_overflow"].default,
            fields["db_statement_timeout_ms"].default) == (
        defaults.pool_size, defaults.max_overflow, defaults.statement_timeout_ms)


def test_the_readme_layout_and_the_architecture_name_every_package() -> None:
    """A new package is placed in the README's layout and in docs/architecture.md."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)]
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    packages = sorted(p.parent.relative_to(ROOT) for p in ROOT.glob("workers/*/__init__.py"))
    for package in packages:
        assert f"{package.name}/" in layout, f"README layout does not list {package}"
        assert f"`{package}/`" in architecture, f"docs/architecture.md does not list {package}"
