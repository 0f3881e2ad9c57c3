"""Which workspace a transaction works in: the tenant that row-level security keys on.

Every workspace table has a `workspace_isolation` policy (migration 0021): a role that
is not the owner sees and writes only rows whose `workspace_id` equals the
transaction-local setting `app.current_tenant_id`, and new rows get it by default.
This module is the one place the fleet sets it: each transaction begins with
`set_config('role', 'fleet_app', true), set_config('app.current_tenant_id', <id>, true)`
(SET LOCAL ROLE and SET LOCAL: both end with the transaction, so a pooled server
connection never carries them to another client). Taking the role makes the policies
apply whatever the login is: the owner, a superuser (the embedded server, the tests) or
the application role itself (then it is a no-op).

The workspace comes from a context variable that the edges set:

- the base task and the batched tasks, from the message's `fleet_workspace` header
  (`HEADER`), which every task published inside a workspace carries
  (`workers.celery_app` adds it at publish);
- the ingest, from each event's envelope (`workspace`, by name);
- the CLI, from `--workspace` / `FLEET_WORKSPACE` (the default workspace otherwise).

A transaction begun with no workspace set fails closed: `NoWorkspace` is raised before
its first statement. Work that must span every workspace (partition maintenance,
retention) says so with `all_workspaces()`: its transactions set no tenant and run
with the login's own rights, which only the owner (migrator) role's cover; as the
application role such a transaction sees no workspace rows at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # producers import this module (celery_app): it stays free of SQLAlchemy
    from sqlalchemy.orm import Session

HEADER: Final = "fleet_workspace"
SETTING: Final = "app.current_tenant_id"
POLICY: Final = "workspace_isolation"
# The role a workspace transaction runs as (db/roles.py's application role; migration
# 0021 creates it if missing). A login that is the owner or a superuser would bypass
# row-level security, so the transaction always takes this role for itself.
APP_ROLE: Final = "fleet_app"


class NoWorkspace(RuntimeError):
    """A transaction was begun with no workspace: the fleet refuses to guess one."""


class _AllWorkspaces:
    def __repr__(self) -> str:
        return "ALL_WORKSPACES"


ALL_WORKSPACES: Final = _AllWorkspaces()

Scope = uuid.UUID | _AllWorkspaces

_current: ContextVar[Scope | None] = ContextVar("fleet_workspace", default=None)
# A process-wide scope used when the context variable is unset: only for test
# processes and one-off scripts (`set_fallback`); workers and the CLI never set it.
_fallback: Scope | None = None


def current_scope() -> Scope:
    """The workspace (or ALL_WORKSPACES) this context works in; NoWorkspace if none."""
    scope = _current.get()
    if scope is None:
        scope = _fallback
    if scope is None:
        raise NoWorkspace("no workspace is set for this transaction: run it inside "
                          "db.tenancy.workspace(id) (tasks: the fleet_workspace header; "
                          "CLI: --workspace)")
    return scope


def current_workspace() -> uuid.UUID:
    """The workspace this context works in; NoWorkspace if none or all of them."""
    scope = current_scope()
    if not isinstance(scope, uuid.UUID):
        raise NoWorkspace("this work spans every workspace: it has no one workspace")
    return scope


def current_or_none() -> uuid.UUID | None:
    """The workspace if one is set, else None (for tagging messages at publish)."""
    scope = _current.get()
    if scope is None:
        scope = _fallback
    return scope if isinstance(scope, uuid.UUID) else None


@contextmanager
def workspace(workspace_id: uuid.UUID) -> Iterator[uuid.UUID]:
    """Run the block's transactions in `workspace_id`."""
    if not isinstance(workspace_id, uuid.UUID):
        raise TypeError(f"a workspace id is a UUID, not {type(workspace_id).__name__}")
    token = _current.set(workspace_id)
    try:
        yield workspace_id
    finally:
        _current.reset(token)


@contextmanager
def all_workspaces() -> Iterator[None]:
    """Run the block's transactions without a tenant: maintenance that must see every
    workspace, which only the owner role can (module docstring)."""
    token = _current.set(ALL_WORKSPACES)
    try:
        yield
    finally:
        _current.reset(token)


def set_fallback(scope: Scope | None) -> None:
    """The scope of a context that set none (test processes, scripts); None to unset."""
    global _fallback
    _fallback = scope


def tenant_setting() -> str | None:
    """The `set_config` call a transaction begins with in the current scope (None when it
    spans all workspaces); NoWorkspace when no scope is set.

    The id is a UUID, so spelling it into the statement is safe; a literal keeps it one
    simple statement that shares its round trip with the pooler's own settings.
    """
    scope = current_scope()
    if isinstance(scope, uuid.UUID):
        return f"set_config('role', '{APP_ROLE}', true), set_config('{SETTING}', '{scope}', true)"
    return None


def switch(session: Session, workspace_id: uuid.UUID) -> None:
    """Move `session`'s open transaction to `workspace_id` (a batch of several
    workspaces' messages runs each group after a switch); also sets the context, so a
    task published afterwards carries it. Call inside `workspace(...)` so it is undone."""
    from sqlalchemy import text

    _current.set(workspace_id)
    session.execute(text("SELECT set_config(:s, :w, true)"),
                    {"s": SETTING, "w": str(workspace_id)})


def policy_sql(table: str) -> list[str]:
    """The statements that put `table` (a partition made after migration 0021) under the
    workspace policy its parent has."""
    tenant = f"(SELECT NULLIF(current_setting('{SETTING}', true), '')::uuid)"
    return [f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
            f"DROP POLICY IF EXISTS {POLICY} ON {table}",
            f"CREATE POLICY {POLICY} ON {table} FOR ALL TO PUBLIC "
            f"USING (workspace_id = {tenant}) WITH CHECK (workspace_id = {tenant})"]


def parse_header(value: object) -> uuid.UUID | None:
    """A message's workspace header as a UUID, or None if it is absent or not one."""
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
