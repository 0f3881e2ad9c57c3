"""Tombstones of erased users: keyed hashes (HMAC-SHA256) only, so archives can be matched.

Owner of `erasure_tombstones` and `erasure_keys`. A ref is
HMAC-SHA256(the workspace's key, "<kind>:<value>") in hex, kind `id`, `email` or
`external_id`. The audit archives carry `user_id`, so an archived row is an erased
user's when the ref of its user_id is among a tombstone's `identifier_refs`
(`ErasedUsers`); `user_ref`, the id's, keeps one tombstone per user. The key is 32 random bytes per workspace, made by its first
erasure: without it a tombstone cannot be tested against a guessed email (migration
0020 says why it lives in the database).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from db.models import DEFAULT_WORKSPACE

Db = Session | Connection


class UnknownWorkspace(LookupError):
    """No workspace of that name."""


@dataclass(frozen=True)
class Identifiers:
    """What names one user, as far as known: its id, its (normalised) email, external ids."""

    user_id: uuid.UUID | None = None
    email: str | None = None
    external_ids: tuple[str, ...] = ()

    def pairs(self) -> list[tuple[str, str]]:
        """(kind, value) of each identifier, the id first."""
        found = [("id", str(self.user_id))] if self.user_id is not None else []
        if self.email:
            found.append(("email", self.email))
        return found + [("external_id", value) for value in self.external_ids]


def ref(key: bytes, kind: str, value: str) -> str:
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def refs(key: bytes, identifiers: Identifiers) -> list[str]:
    return [ref(key, kind, value) for kind, value in identifiers.pairs()]


@dataclass(frozen=True)
class Tombstone:
    id: uuid.UUID
    workspace_id: uuid.UUID
    user_ref: str
    requested_by: str
    erased_at: dt.datetime
    counts: Mapping[str, int]


def workspace_id(db: Db, name: str = DEFAULT_WORKSPACE) -> uuid.UUID:
    found = db.execute(text("SELECT id FROM workspaces WHERE name = :n"), {"n": name}
                       ).scalar_one_or_none()
    if found is None:
        raise UnknownWorkspace(f"no workspace named {name!r}")
    return uuid.UUID(str(found))


def key(db: Db, workspace: uuid.UUID, *, create: bool) -> bytes | None:
    """The workspace's key; made (once, whoever races) when `create`, else None if none yet."""
    if create:
        db.execute(text("INSERT INTO erasure_keys (workspace_id, key) VALUES (:w, :k) "
                        "ON CONFLICT (workspace_id) DO NOTHING"),
                   {"w": workspace, "k": secrets.token_bytes(32)})
    found = db.execute(text("SELECT key FROM erasure_keys WHERE workspace_id = :w"),
                       {"w": workspace}).scalar_one_or_none()
    return bytes(found) if found is not None else None


_COLUMNS = "id, workspace_id, user_ref, requested_by, erased_at, counts"


def _tombstone(row: Any) -> Tombstone:
    return Tombstone(row.id, row.workspace_id, row.user_ref, row.requested_by, row.erased_at,
                     dict(row.counts))


def find(db: Db, workspace: uuid.UUID, key_: bytes, identifiers: Identifiers,
         *, lock: bool = False) -> Tombstone | None:
    """The tombstone any of these identifiers names in the workspace (the oldest), or None."""
    row = db.execute(text(
        f"SELECT {_COLUMNS} FROM erasure_tombstones WHERE workspace_id = :w "
        "AND identifier_refs && CAST(:refs AS varchar[]) ORDER BY erased_at LIMIT 1"
        + (" FOR UPDATE" if lock else "")),
        {"w": workspace, "refs": refs(key_, identifiers)}).one_or_none()
    return _tombstone(row) if row is not None else None


def record(db: Db, workspace: uuid.UUID, key_: bytes, identifiers: Identifiers, *,
           requested_by: str, counts: Mapping[str, int], now: dt.datetime) -> Tombstone:
    """Write the user's tombstone, or add this run's refs and counts to the one it has.

    One per user: a rerun (by email once the user row is gone, or by id) finds the
    first by any identifier and keeps its time and operator; its counts are the sums.
    """
    new_refs = refs(key_, identifiers)
    existing = find(db, workspace, key_, identifiers, lock=True)
    if existing is not None:
        summed = {t: int(existing.counts.get(t, 0)) + int(counts.get(t, 0))
                  for t in sorted({*existing.counts, *counts})}
        row = db.execute(text(
            "UPDATE erasure_tombstones SET counts = CAST(:c AS jsonb), identifier_refs = "
            "  ARRAY(SELECT DISTINCT r FROM unnest(identifier_refs || CAST(:refs AS varchar[])) r "
            "        ORDER BY r) "
            f"WHERE id = :id RETURNING {_COLUMNS}"),
            {"c": json.dumps(summed), "refs": new_refs, "id": existing.id}).one()
        return _tombstone(row)
    row = db.execute(text(
        "INSERT INTO erasure_tombstones (workspace_id, user_ref, identifier_refs, requested_by, "
        "  erased_at, counts) VALUES (:w, :user_ref, CAST(:refs AS varchar[]), :by, :now, "
        f"  CAST(:c AS jsonb)) RETURNING {_COLUMNS}"),
        {"w": workspace, "user_ref": new_refs[0], "refs": sorted(set(new_refs)),
         "by": requested_by, "now": now, "c": json.dumps(dict(counts))}).one()
    return _tombstone(row)


_SEEN_LIMIT = 100_000  # user ids whose answer ErasedUsers remembers


class ErasedUsers:
    """Answers "was this user id erased?" from every workspace's tombstones (for archives)."""

    def __init__(self, keyed: list[tuple[bytes, frozenset[str]]], tombstones: int | None = None
                 ) -> None:
        self._keyed = keyed  # (a workspace's key, the refs of its tombstones)
        self._seen: dict[str, bool] = {}
        self.tombstones = len(keyed) if tombstones is None else tombstones

    @classmethod
    def load(cls, db: Db) -> ErasedUsers:
        rows = db.execute(text(
            "SELECT k.key, array_agg(r.ref) AS refs, count(DISTINCT t.id) AS n FROM erasure_keys k "
            "JOIN erasure_tombstones t ON t.workspace_id = k.workspace_id "
            "CROSS JOIN unnest(t.identifier_refs) AS r(ref) GROUP BY k.key")).all()
        # Every ref: an id ref cannot be mistaken for an email's (the kind is hashed too).
        return cls([(bytes(r.key), frozenset(r.refs)) for r in rows], sum(r.n for r in rows))

    def __bool__(self) -> bool:
        return self.tombstones > 0

    def __contains__(self, user_id: object) -> bool:
        if not isinstance(user_id, str) or not user_id:
            return False
        answer = self._seen.get(user_id)
        if answer is None:
            canonical = user_id.lower()
            answer = any(ref(k, "id", canonical) in refs_ for k, refs_ in self._keyed)
            if len(self._seen) >= _SEEN_LIMIT:  # a month of audit rows: bounded memory
                self._seen.clear()
            self._seen[user_id] = answer
        return answer
