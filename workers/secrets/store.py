"""`workspace_secrets`: a workspace's credentials, encrypted at rest (the table's one writer).

A value is encrypted here before it is written and decrypted only where it is used:
the actions worker, when it sends (workers/operators/webhooks.py), and `fleet secret
rotate-key`. Nothing else reads values; `list_` returns names and key ids.

Rotation (`rotate`) re-encrypts every row whose key is not the first configured one,
each row in its own short transaction, so readers (which never wait on a row lock)
keep working throughout: with the keys "new,old" everywhere, every row opens before,
during and after it. It walks every workspace's rows: once workspaces are isolated by
row-level security it runs as a role that may see them all.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import SecretStr
from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db import tenancy
from db.models import DEFAULT_WORKSPACE, Workspace, WorkspaceSecret
from db.session import session_scope
from workers import workspaces
from workers.secrets.crypto import Keyring, TokenRejected, UndecryptableSecret, load_keyring

WEBHOOK_SIGNING_KEY = "webhook_signing_key"
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,99}")  # as chk_workspace_secret_name, at most 100
MAX_VALUE_BYTES = 64 * 1024
ROTATE_BATCH = 100


class InvalidSecret(ValueError):
    """A name or value the table cannot hold; the message never shows the value."""


class UnknownWorkspace(LookupError):
    """No workspace has this name."""


class RotationRefused(Exception):
    """Some rows do not open with the configured keys: rotating would strand them."""

    def __init__(self, rows: list[UndecryptableSecret], reencrypted: int = 0) -> None:
        names = ", ".join(f"{row.workspace}/{row.name} (key {row.key_id})" for row in rows)
        super().__init__(f"{len(rows)} secret(s) cannot be decrypted with the configured "
                         f"keys: {names}")
        self.rows, self.reencrypted = rows, reencrypted


@dataclass(frozen=True)
class SecretInfo:
    """What `fleet secret list` shows: never the value."""

    workspace: str
    name: str
    key_id: str
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class RotationReport:
    reencrypted: int  # rows re-encrypted under the first key by this run
    current: int  # rows that already were under it
    key_id: str  # the first key's id


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidSecret(f"secret name {name!r}: lowercase letters, digits, _ . - "
                            "(starting with a letter or digit), at most 100")
    return name


def check_value(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if not raw:
        raise InvalidSecret("the value is empty")
    try:
        size = len(raw.encode())
    except UnicodeEncodeError:
        raise InvalidSecret("the value contains invalid Unicode (lone surrogates)") from None
    if size > MAX_VALUE_BYTES:
        raise InvalidSecret(f"the value is {size:,} bytes; at most {MAX_VALUE_BYTES:,}")
    return value


def workspace_id(session: Session, workspace: str = DEFAULT_WORKSPACE) -> uuid.UUID:
    found = session.execute(select(Workspace.id).where(Workspace.name == workspace)).scalar()
    if found is None:
        raise UnknownWorkspace(f"no workspace named {workspace!r}")
    return found


def _context(workspace: uuid.UUID, name: str) -> str:
    return f"{workspace}/{name}"


def put(session: Session, workspace: uuid.UUID, name: str, value: SecretStr,
        keyring: Keyring | None = None) -> bool:
    """Store `value` as secret `name` of `workspace`, encrypted; True if it is new."""
    keyring = keyring or load_keyring()
    token = keyring.encrypt(_context(workspace, check_name(name)), check_value(value))
    inserted = pg_insert(WorkspaceSecret).values(workspace_id=workspace, name=name,
                                                 ciphertext=token, key_id=keyring.primary)
    created = session.execute(inserted.on_conflict_do_update(
        index_elements=[WorkspaceSecret.workspace_id, WorkspaceSecret.name],
        set_={"ciphertext": inserted.excluded.ciphertext, "key_id": inserted.excluded.key_id,
              "updated_at": func.clock_timestamp()},  # after created_at, even in its transaction
    ).returning(WorkspaceSecret.created_at == WorkspaceSecret.updated_at)).scalar_one()
    return bool(created)


def get(session: Session, workspace: uuid.UUID, name: str,
        keyring: Keyring | None = None) -> SecretStr | None:
    """The value of secret `name` of `workspace`, or None when it is not stored.

    Keys are needed (and loaded) only when the row exists, so an installation without
    stored secrets needs none.
    """
    row = session.execute(select(WorkspaceSecret.ciphertext, WorkspaceSecret.key_id).where(
        WorkspaceSecret.workspace_id == workspace, WorkspaceSecret.name == name)).one_or_none()
    if row is None:
        return None
    keyring = keyring or load_keyring()
    try:
        return keyring.decrypt(_context(workspace, name), row.ciphertext, row.key_id)
    except TokenRejected:
        raise UndecryptableSecret(_workspace_name(session, workspace), name, row.key_id,
                                  keyring.key_ids) from None


def delete_(session: Session, workspace: uuid.UUID, name: str) -> bool:
    """Forget secret `name` of `workspace`; False if there was none."""
    deleted = session.execute(delete(WorkspaceSecret).where(
        WorkspaceSecret.workspace_id == workspace, WorkspaceSecret.name == name)
        .returning(WorkspaceSecret.name)).first()
    return deleted is not None


def list_(session: Session, workspace: uuid.UUID) -> list[SecretInfo]:
    """The workspace's secrets by name: names, key ids and times, no values."""
    rows = session.execute(
        select(Workspace.name.label("workspace"), WorkspaceSecret.name, WorkspaceSecret.key_id,
               WorkspaceSecret.created_at, WorkspaceSecret.updated_at)
        .join(Workspace, Workspace.id == WorkspaceSecret.workspace_id)
        .where(WorkspaceSecret.workspace_id == workspace).order_by(WorkspaceSecret.name))
    return [SecretInfo(r.workspace, r.name, r.key_id, r.created_at, r.updated_at) for r in rows]


def _workspace_name(session: Session, workspace: uuid.UUID) -> str:
    name = session.execute(select(Workspace.name).where(Workspace.id == workspace)).scalar()
    return name or str(workspace)


def _batches(batch_size: int) -> Iterator[list[WorkspaceSecret]]:
    """Every workspace's rows, in (workspace, name) keyset batches, each read in its own
    transaction. Each workspace is read (and its batches are rewritten by the caller)
    under its own row-level security: the rotation needs no role that sees all."""
    with tenancy.all_workspaces(), session_scope() as session:
        ids = sorted(workspaces.all_ids(session))
    for workspace_id in ids:
        with tenancy.workspace(workspace_id):
            yield from _workspace_batches(batch_size)


def _workspace_batches(batch_size: int) -> Iterator[list[WorkspaceSecret]]:
    after: tuple[uuid.UUID, str] | None = None
    while True:
        with session_scope() as session:
            query = select(WorkspaceSecret).order_by(WorkspaceSecret.workspace_id,
                                                     WorkspaceSecret.name).limit(batch_size)
            if after is not None:
                query = query.where(tuple_(WorkspaceSecret.workspace_id, WorkspaceSecret.name)
                                    > tuple_(*after))
            rows = list(session.execute(query).scalars())
            session.expunge_all()
        if not rows:
            return
        yield rows
        after = (rows[-1].workspace_id, rows[-1].name)


def undecryptable(keyring: Keyring, batch_size: int = ROTATE_BATCH) -> list[UndecryptableSecret]:
    """The rows that none of `keyring`'s keys opens (their names and key ids)."""
    failed: list[UndecryptableSecret] = []
    names: dict[uuid.UUID, str] = {}
    for batch in _batches(batch_size):
        for row in batch:
            try:
                keyring.decrypt(_context(row.workspace_id, row.name), row.ciphertext, row.key_id)
            except TokenRejected:
                if row.workspace_id not in names:
                    with session_scope() as session:
                        names[row.workspace_id] = _workspace_name(session, row.workspace_id)
                failed.append(UndecryptableSecret(names[row.workspace_id], row.name, row.key_id,
                                                  keyring.key_ids))
    return failed


def rotate(keyring: Keyring | None = None, batch_size: int = ROTATE_BATCH) -> RotationReport:
    """Re-encrypt every secret under the first key, one row per transaction; idempotent.

    Refuses (`RotationRefused`, naming the rows, changing nothing) when some row does
    not open with the configured keys: dropping the old key afterwards would lose it.
    """
    keyring = keyring or load_keyring()
    failed = undecryptable(keyring, batch_size)
    if failed:
        raise RotationRefused(failed)
    reencrypted = current = 0
    for batch in _batches(batch_size):
        for stale in batch:
            if stale.key_id == keyring.primary:
                current += 1
                continue
            with session_scope() as session:  # one row, locked only while it is rewritten
                row = session.execute(select(WorkspaceSecret).where(
                    WorkspaceSecret.workspace_id == stale.workspace_id,
                    WorkspaceSecret.name == stale.name).with_for_update()).scalar_one_or_none()
                if row is None:  # deleted meanwhile
                    continue
                if row.key_id == keyring.primary:  # set again meanwhile, under the new key
                    current += 1
                    continue
                try:
                    row.ciphertext = keyring.rotate(_context(row.workspace_id, row.name),
                                                    row.ciphertext, row.key_id)
                except TokenRejected:  # replaced meanwhile by a value under a key we lack
                    raise RotationRefused([UndecryptableSecret(
                        _workspace_name(session, row.workspace_id), row.name, row.key_id,
                        keyring.key_ids)], reencrypted) from None
                row.key_id = keyring.primary
                reencrypted += 1
    return RotationReport(reencrypted, current, keyring.primary)
