"""Each table has one owner module that writes it; the others call that module.

Every module under workers/ and tasks/ is parsed (no import, no database) and each
write of an owned table outside its owner fails the test: an insert, update or
delete statement built on the model or its table, a new model object (as for
`session.add`), SQL text that inserts into, updates or deletes from the table, a
COPY into it, or an assignment to a column only that table has (unless a class of
the module declares an attribute of that name: then it is most likely its own).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from db.models import (
    Base,
    ErasureKey,
    ErasureTombstone,
    ExecutionExit,
    ExecutionGoal,
    ExecutionMessage,
    ExecutionStep,
    ProgramSetting,
    Send,
    SplitExposure,
    Suppression,
    UserConsent,
    WorkflowExecution,
    WorkflowSchedule,
    WorkflowScheduleRun,
    WorkspaceSecret,
)

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("workers", "tasks")

# {model: owner module}. Add a table here when it gets its owner.
OWNERS: dict[type[Base], str] = {
    WorkflowExecution: "workers.engine.executions",
    ExecutionStep: "workers.engine.executions",
    ExecutionMessage: "workers.engine.executions",
    ExecutionExit: "workers.engine.executions",
    ExecutionGoal: "workers.events.goals",
    UserConsent: "workers.events.consent",
    Suppression: "workers.sends.suppressions",
    Send: "workers.sends.gateway",
    SplitExposure: "workers.operators.split",
    ProgramSetting: "workers.definitions",
    WorkflowSchedule: "workers.schedules.runs",
    WorkflowScheduleRun: "workers.schedules.runs",
    WorkspaceSecret: "workers.secrets.store",
    ErasureTombstone: "workers.privacy.tombstones",
    ErasureKey: "workers.privacy.tombstones",
}
# Packages that may write any table: tools that make test data for benchmarks and drills.
TOOLS = ("workers.tools",)
# (module, table): why that module writes the table without its owner.
EXCEPTIONS: dict[tuple[str, str], str] = {
    # `fleet user forget`: a user's data leaves every table in one transaction, which no
    # owner offers; executions are cancelled through workers.engine.control first.
    ("workers.privacy.erasure", "workflow_executions"): "erasure deletes the user's executions",
    ("workers.privacy.erasure", "workflow_schedule_runs"): "erasure moves a cursor off the user",
    ("workers.privacy.erasure", "suppressions"): "erasure deletes the address's entries",
}
STATEMENTS = {"insert", "update", "delete"}


@dataclass(frozen=True)
class Write:
    module: str
    table: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.what} ({self.table})"


def _tables() -> dict[str, str]:
    """{model class name: table name} of the owned models."""
    return {model.__name__: model.__tablename__ for model in OWNERS}


def _own_columns() -> dict[str, str]:
    """{column: table} of columns only one owned table has (no other table of the schema)."""
    seen: dict[str, set[str]] = {}
    for table in Base.metadata.tables.values():
        for column in table.columns:
            seen.setdefault(column.name, set()).add(table.name)
    owned = {model.__tablename__ for model in OWNERS}
    return {name: next(iter(tables)) for name, tables in seen.items()
            if len(tables) == 1 and tables <= owned and name != "id"}


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _model(node: ast.AST, tables: dict[str, str]) -> str | None:
    """The owned table a statement is built on: `Model` or `Model.__table__`."""
    if isinstance(node, ast.Attribute) and node.attr == "__table__":
        node = node.value
    name = _name(node)
    return tables.get(name) if name else None


def _strings(node: ast.AST) -> Iterator[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.JoinedStr):  # an f-string: its literal parts, joined
        yield "".join(v.value for v in node.values
                      if isinstance(v, ast.Constant) and isinstance(v.value, str))


def _declared(tree: ast.AST) -> set[str]:
    """Attribute names the module's own classes declare (class-level fields, `self.x = `)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names |= {t.id for t in item.targets if isinstance(t, ast.Name)}
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id == "self"):
            names.add(node.attr)
    return names


def writes(module: str, source: str) -> Iterator[Write]:
    """The writes of owned tables in one module's source."""
    tables = _tables()
    tree = ast.parse(source)
    columns = {c: t for c, t in _own_columns().items() if c not in _declared(tree)}
    names = "|".join(sorted(set(tables.values())))
    sql = re.compile(rf"\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM|COPY)\s+({names})\b", re.I)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = _name(node.func)
            if func in STATEMENTS and node.args and (table := _model(node.args[0], tables)):
                yield Write(module, table, node.lineno, f"{func}({_name(node.args[0])})")
            elif (func in STATEMENTS and isinstance(node.func, ast.Attribute)
                  and (table := _model(node.func.value, tables))):
                yield Write(module, table, node.lineno, f"__table__.{func}()")
            elif func in tables:
                yield Write(module, tables[func], node.lineno, f"new {func}(...)")
            elif func == "insert_rows":
                for arg in node.args:
                    for text in _strings(arg):
                        if text in tables.values():
                            yield Write(module, text, node.lineno, "insert_rows")
        elif isinstance(node, ast.Constant | ast.JoinedStr):
            for text in _strings(node):
                for match in sql.finditer(text):
                    yield Write(module, match.group(2).lower(), node.lineno,
                                f"SQL {' '.join(match.group(0).split())!r}")
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.ctx, ast.Store) \
                            and leaf.attr in columns:
                        yield Write(module, columns[leaf.attr], node.lineno,
                                    f"assigns .{leaf.attr}")


def _modules() -> Iterator[tuple[str, Path]]:
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _allowed(write: Write) -> bool:
    owners = {model.__tablename__: owner for model, owner in OWNERS.items()}
    return (write.module == owners[write.table]
            or any(write.module == tool or write.module.startswith(tool + ".") for tool in TOOLS)
            or (write.module, write.table) in EXCEPTIONS)


def test_only_the_owner_writes_its_tables() -> None:
    found = [w for module, path in _modules() for w in writes(module, path.read_text())]
    assert [w for w in found if w.module in set(OWNERS.values())], "the scan finds no writes"
    strays = [str(w) for w in found if not _allowed(w)]
    assert not strays, "writes outside the owner module:\n" + "\n".join(strays)


def test_every_exception_is_still_needed() -> None:
    found = {(w.module, w.table) for module, path in _modules()
             for w in writes(module, path.read_text())}
    assert set(EXCEPTIONS) <= found, set(EXCEPTIONS) - found


def test_the_scan_sees_each_kind_of_write() -> None:
    source = '''
from sqlalchemy import insert, update, delete, text
session.execute(update(WorkflowExecution).values(status="x"))
session.execute(insert(ExecutionStep))
session.execute(WorkflowExecution.__table__.delete())
session.add(ExecutionStep(seq=1))
session.execute(text("UPDATE workflow_executions SET wake_at = NULL"))
session.execute(text(f"DELETE FROM execution_messages WHERE id = {x}"))
row.state_version += 1
row.wake_at, row.awaiting_events = None, None
session.execute(select(WorkflowExecution).where(WorkflowExecution.id == i))
session.execute(text("SELECT 1 FROM workflow_executions"))
row.status = "failed"
'''
    found = sorted({(w.line, w.table, w.what) for w in writes("workers.somewhere", source)})
    assert [(line, table) for line, table, _ in found] == [(3, "workflow_executions"), (4, "execution_steps"),
                     (5, "workflow_executions"), (6, "execution_steps"),
                     (7, "workflow_executions"), (8, "execution_messages"),
                     (9, "workflow_executions"), (10, "workflow_executions"),
                     (10, "workflow_executions")]
