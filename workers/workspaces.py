"""Workspaces (`workspaces`, owned here): a name, a fixed id, the default one.

A workspace is one organisation's share of the fleet: its users, events, definitions,
executions and messages, kept apart by row-level security (db/tenancy.py). Names are
what people and producers use (`--workspace acme`, an envelope's `workspace`); ids are
what rows and messages carry. A name never changes its id, so ids are cached for the
life of the process; a name not found is looked up again next time (it may be created
meanwhile).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db.models import DEFAULT_WORKSPACE, DEFAULT_WORKSPACE_ID, Workspace
from workers.events.envelope import WORKSPACE_NAME as NAME_PATTERN
from workers.events.envelope import WORKSPACE_NAME_RULE as NAME_RULE

_ids: dict[str, uuid.UUID] = {DEFAULT_WORKSPACE: DEFAULT_WORKSPACE_ID}


class UnknownWorkspace(LookupError):
    """No workspace has this name (or id)."""


@dataclass(frozen=True)
class WorkspaceInfo:
    id: uuid.UUID
    name: str
    created_at: str


def check_name(name: str) -> str:
    """`name` if it is a valid workspace name; ValueError saying the rule otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"a workspace name is {NAME_RULE}; got {name!r}"[:200])
    return name


def resolve(session: Session, name: str) -> uuid.UUID:
    """The id of the workspace named `name` (or whose id `name` spells); UnknownWorkspace.

    `workspaces` has no row-level security: any transaction may read it, whatever
    workspace it works in.
    """
    found = _ids.get(name)
    if found is not None:
        return found
    try:
        as_id: uuid.UUID | None = uuid.UUID(name)
    except ValueError:
        as_id = None
    column = Workspace.id if as_id is not None else Workspace.name
    row = session.execute(select(Workspace.id).where(column == (as_id or name))).scalar()
    if row is None:
        raise UnknownWorkspace(f"no workspace named {name!r}"[:200])
    _ids[name] = row
    return row


def create(session: Session, name: str) -> tuple[uuid.UUID, bool]:
    """Create the workspace `name` if it does not exist; (its id, whether it was created)."""
    check_name(name)
    created = session.execute(text(
        "INSERT INTO workspaces (name) VALUES (:n) ON CONFLICT (name) DO NOTHING RETURNING id"),
        {"n": name}).scalar()
    if created is not None:
        return created, True
    return resolve(session, name), False


def all_ids(session: Session) -> list[uuid.UUID]:
    """Every workspace's id, the default one first (for work done in each of them)."""
    return list(session.execute(select(Workspace.id).order_by(
        Workspace.id != DEFAULT_WORKSPACE_ID, Workspace.created_at, Workspace.id)).scalars())


def list_(session: Session) -> list[WorkspaceInfo]:
    """Every workspace, by name."""
    rows = session.execute(select(Workspace.id, Workspace.name, Workspace.created_at)
                           .order_by(Workspace.name))
    return [WorkspaceInfo(r.id, r.name, r.created_at.isoformat()) for r in rows]
