"""Erasure (`fleet user forget`) and export (`fleet user export`) of one user's data.

`REGISTRY` names every table that can hold a user's data, with the SQL that finds the
user's rows (the export) and what erasure does to them; `EXEMPT` names the tables
that look as if they could, and why they do not. `uncovered_tables` holds both
against the live schema, so a new table with user data fails a test until it is
listed (tests/test_erasure.py).

The user row is **deleted**, not anonymised. An anonymised row would still be a user:
schedules over everyone and dynamic segments would keep starting journeys for it, and
an event carrying its old id would be recorded against it again. Deleted, the old id
is unknown (an event with it is dead-lettered) and an event with the email creates a
new user. The foreign keys decide the rest: `workflow_executions.user_id` is NOT NULL
without ON DELETE, so the user's executions are cancelled first (through
`workers.engine.control`, which waits for a running step) and then deleted, their
steps, messages, deliveries, sends, goals, exits and split exposures with them
(ON DELETE CASCADE, as retention deletes executions after a year); the audit log and
the trigger log keep their rows, with `user_id` NULL and the data emptied, so the
per-type, per-stage and per-trigger counts stay what they were. Figures recomputed from
per-user rows (users in stage, stage entries, executions, sends, goal conversions)
lose the user when a day is computed again (today, a goal's open window, a backfill);
the rows already in `metrics_daily` stay.

Rows of other users that mention the user (a dead letter, an outbox event, a message
sent to their address) are found by the user's id, email and external id in their
text: a case-insensitive match of the whole token (`ada@example.com` does not match
`bada@example.com`). Other users' audit events and execution variables are not
searched: they are matched by user id only.

One transaction per user: a concurrent step or ingest of the same user can make it a
deadlock victim, so `forget_user` runs it again. It is idempotent: a second run finds
nothing more (or what arrived since) and succeeds, and the user keeps one tombstone.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import getpass
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db import tenancy
from db.models import ACTIVE_EXECUTION_STATUSES, DEFAULT_WORKSPACE, PARTITIONED_TABLES, sql_list
from db.session import session_scope
from workers import workspaces
from workers.engine import control
from workers.events.envelope import normalise_email
from workers.privacy import tombstones
from workers.privacy.tombstones import Identifiers, Tombstone
from workers.retention import detached_partitions

# Attributes whose string value names the user outside the fleet (matched like the email).
EXTERNAL_ID_ATTRIBUTES = ("external_id",)
# Shorter external ids are not searched for in other rows' text: "42" is in everything.
MIN_MATCH_LENGTH = 6
RETRIED_SQLSTATES = ("40P01", "40001")  # deadlock, serialization failure
_EXECUTIONS = "SELECT id FROM workflow_executions WHERE user_id = :uid"


def _mentions(*columns: str, raw: bool = False) -> str:
    """SQL: one of the columns mentions an identifier as a whole token, in any case.

    `raw`: the columns are bytea, seen as `encode(…, 'escape')` shows them (the
    identifiers' pattern is made the same way). A whole table is read: measured at about
    1 s for 200,000 outbox rows, most of it the jsonb-to-text cast (an ILIKE before the
    regex made it slower, not faster).
    """
    param = ":raw_pattern" if raw else ":pattern"
    return " OR ".join(f"{c} ~* {param}" for c in columns)


_DEAD_LETTER_MATCH = (_mentions("encode(raw_payload, 'escape')", raw=True) + " OR "
                      + _mentions("CAST(payload AS text)", "reason"))
_OUTBOX_MATCH = _mentions("partition_key", "CAST(payload AS text)", "CAST(headers AS text)",
                          "error_message")
_RECIPIENT_MATCH = _mentions("recipient")


@dataclass(frozen=True)
class Table:
    """A table that can hold a user's data and what erasure does to it.

    `select` finds the user's rows (what export writes, counted before erasure);
    `erase` changes them and returns how many, or is None when they go with a row
    erased before them (ON DELETE CASCADE). `{table}` is the table's name, or one of
    its detached partitions when `partitions` (a retention run that died between
    DETACH and DROP leaves a plain table holding the same rows).
    """

    name: str
    how: str
    select: str
    erase: str | None = None
    partitions: bool = False


def _via_executions(order: str) -> str:
    """The rows of the user's executions (`{table}` is filled in later)."""
    return f"SELECT * FROM {{table}} WHERE execution_id IN ({_EXECUTIONS}) ORDER BY {order}"


def _count_of(statement: str) -> str:
    return f"WITH done AS ({statement} RETURNING 1) SELECT count(*) FROM done"


# In erasure order: rows found through others first (inbox through the audit log), the
# rows of `users` last. Cascaded tables are counted before anything is erased.
REGISTRY: tuple[Table, ...] = (
    Table("event_inbox", "content hash cleared (the event id stays: redeliveries are "
          "still duplicates)",
          "SELECT * FROM {table} WHERE event_id IN (SELECT event_id FROM lifecycle_events "
          "WHERE user_id = :uid) ORDER BY received_at, event_id",
          _count_of("UPDATE {table} SET content_hash = NULL WHERE content_hash IS NOT NULL AND "
                    "event_id IN (SELECT event_id FROM lifecycle_events WHERE user_id = :uid)")),
    Table("lifecycle_events", "data emptied, user_id NULL (type, stage and times kept)",
          "SELECT * FROM {table} WHERE user_id = :uid ORDER BY created_at, id",
          _count_of("UPDATE {table} SET user_id = NULL, event_data = jsonb_build_object() "
                    "WHERE user_id = :uid"), partitions=True),
    Table("trigger_executions", "event data emptied, user_id NULL (the evaluation kept)",
          "SELECT * FROM {table} WHERE user_id = :uid ORDER BY executed_at, id",
          _count_of("UPDATE {table} SET user_id = NULL, event_data = jsonb_build_object() "
                    "WHERE user_id = :uid"), partitions=True),
    Table("message_log", "deleted (with messages to their address from others' journeys)",
          f"SELECT * FROM {{table}} WHERE user_id = :uid OR {_RECIPIENT_MATCH} "
          "ORDER BY sent_at, id",
          _count_of(f"DELETE FROM message_log WHERE user_id = :uid OR {_RECIPIENT_MATCH}")),
    Table("workflow_executions", "cancelled first, then deleted (variables, state, errors)",
          "SELECT * FROM {table} WHERE user_id = :uid ORDER BY started_at, id",
          _count_of("DELETE FROM workflow_executions WHERE user_id = :uid")),
    Table("execution_steps", "deleted with their execution",
          _via_executions("execution_id, seq")),
    Table("execution_messages", "deleted with their execution",
          _via_executions("execution_id, id")),
    Table("action_deliveries", "deleted with their execution (parameters, results)",
          _via_executions("execution_id, created_at, key")),
    Table("sends", "deleted with their execution",
          "SELECT * FROM {table} WHERE user_id = :uid ORDER BY created_at, key"),
    Table("execution_goals", "deleted with their execution",
          _via_executions("execution_id")),
    Table("execution_exits", "deleted with their execution",
          _via_executions("execution_id")),
    Table("split_exposures", "deleted with their execution",
          _via_executions("execution_id, id")),
    Table("workflow_schedule_runs", "a run's cursor at the user moves to the user before",
          "SELECT * FROM {table} WHERE last_user_id = :uid ORDER BY started_at, id",
          _count_of("UPDATE workflow_schedule_runs SET last_user_id = (SELECT u.id FROM users u "
                    "WHERE u.id < :uid ORDER BY u.id DESC LIMIT 1) WHERE last_user_id = :uid")),
    Table("suppressions", "the address's entries deleted",
          "SELECT * FROM {table} WHERE address = ANY(CAST(:texts AS varchar[])) "
          "ORDER BY address, channel",
          _count_of("DELETE FROM suppressions WHERE address = ANY(CAST(:texts AS varchar[]))")),
    Table("dead_letters", "deleted when the raw bytes, JSON or reason mention them",
          f"SELECT * FROM {{table}} WHERE {_DEAD_LETTER_MATCH} ORDER BY id",
          _count_of(f"DELETE FROM {{table}} WHERE {_DEAD_LETTER_MATCH}")),
    Table("event_outbox", "deleted when the event mentions them (pending ones never go out)",
          f"SELECT * FROM {{table}} WHERE {_OUTBOX_MATCH} ORDER BY created_at, id",
          _count_of(f"DELETE FROM {{table}} WHERE {_OUTBOX_MATCH}")),
    Table("user_lifecycle_history", "deleted with the user",
          "SELECT * FROM {table} WHERE user_id = :uid ORDER BY transitioned_at, id"),
    Table("user_segment_memberships", "deleted with the user (no segment exit is sent)",
          "SELECT * FROM {table} WHERE user_id = :uid ORDER BY segment_id"),
    Table("segment_exclusions", "deleted with the user",
          "SELECT * FROM {table} WHERE user_id = :uid ORDER BY segment_id"),
    Table("user_consents", "deleted with the user",
          "SELECT * FROM {table} WHERE user_id = :uid ORDER BY channel"),
    Table("users", "deleted (email, attributes)",
          "SELECT * FROM {table} WHERE id = :uid",
          _count_of("DELETE FROM users WHERE id = :uid")),
)

_DEFINITIONS = ("a definition written by operators (fleet apply, fleet workflow deploy); "
                "a definition that names a user is changed there")
EXEMPT: dict[str, str] = {
    "workflows": _DEFINITIONS,
    "workflow_versions": _DEFINITIONS,
    "triggers": _DEFINITIONS,
    "user_segments": _DEFINITIONS,
    "workflow_schedules": _DEFINITIONS,
    "program_settings": _DEFINITIONS,
    "metrics_daily": "aggregates by day, stage, workflow, trigger: no row per user",
    "maintenance_runs": "the nightly jobs' days and totals",
    "task_redeliveries": "the poison guard's task ids and names; no payload",
    "workspaces": "tenants",
    "workspace_secrets": "a tenant's encrypted credentials",
    "erasure_keys": "the tombstones' HMAC keys",
    "erasure_tombstones": "keyed hashes, times and counts: nothing personal",
    "alembic_version": "the schema's revision",
}

# A table needs an entry when it has one of these (tests/test_erasure.py).
SUSPECT_COLUMN = re.compile(r"(.*_)?user_id|email|external_id|raw.*|.*data|variables|payload|"
                            r"params|result|attributes|metadata|headers|recipient|address")
SUSPECT_TYPES = frozenset({"json", "jsonb", "bytea"})


class NothingFound(LookupError):
    """No user, no tombstone and no row anywhere for what was asked."""


class AmbiguousUser(ValueError):
    """An external id that several users have."""


# --------------------------------------------------------------------------- the user


def find_user(db: Session | Connection, who: str) -> tuple[Identifiers, bool]:
    """The identifiers `who` (an id, an email or an external id) names, and whether a user has them.

    With a user, all of theirs (id, stored email, external ids); without, what `who` is.
    """
    who = who.strip()
    try:
        by_id: uuid.UUID | None = uuid.UUID(who)
    except ValueError:
        by_id = None
    if by_id is not None:
        rows = db.execute(text("SELECT id, email, attributes FROM users WHERE id = :v"),
                          {"v": by_id}).all()
        given = Identifiers(user_id=by_id)
    elif "@" in who:
        email = normalise_email(who)
        rows = db.execute(text("SELECT id, email, attributes FROM users WHERE email = :v"),
                          {"v": email}).all()
        given = Identifiers(email=email)
    else:
        rows = db.execute(text(
            "SELECT id, email, attributes FROM users WHERE "
            + " OR ".join(f"attributes ->> '{a}' = :v" for a in EXTERNAL_ID_ATTRIBUTES)),
            {"v": who}).all()
        given = Identifiers(external_ids=(who,))
        if len(rows) > 1:
            raise AmbiguousUser(f"{len(rows)} users have the external id {who!r}: "
                                "name one by email or id")
    if not rows:
        return given, False
    row = rows[0]
    attributes = row.attributes or {}
    external = tuple(dict.fromkeys(
        [*(str(attributes[a]) for a in EXTERNAL_ID_ATTRIBUTES
           if isinstance(attributes.get(a), str | int) and str(attributes[a]).strip()),
         *given.external_ids]))
    return Identifiers(user_id=row.id, email=row.email, external_ids=external), True


def _are_escape(value: str) -> str:
    """`value` as a literal in a PostgreSQL regular expression (ARE)."""
    return "".join("\\" + c if c.isascii() and not c.isalnum() else c for c in value)


def _bytea_escape(value: str) -> str:
    """`value` as `encode(bytes, 'escape')` shows its UTF-8 bytes."""
    return "".join("\\\\" if b == 0x5C else chr(b) if 0 < b < 0x80 else f"\\{b:03o}"
                   for b in value.encode())


def _token_pattern(values: list[str]) -> str:
    """Any of `values` as a whole token: not inside a longer address, id or word."""
    if not values:
        return "x^"  # matches nothing
    alternatives = "|".join(_are_escape(v) for v in values)
    return f"(^|[^[:alnum:]_.%+-])({alternatives})($|[^[:alnum:]_.-])"


def _params(ids: Identifiers) -> dict[str, Any]:
    searched = [v for kind, v in ids.pairs() if kind != "external_id" or len(v) >= MIN_MATCH_LENGTH]
    return {"uid": ids.user_id, "texts": [v for _, v in ids.pairs()],
            "pattern": _token_pattern(searched),
            "raw_pattern": _token_pattern([_bytea_escape(v) for v in searched])}


def _names(conn: Connection, table: Table) -> list[str]:
    """The table, and its detached partitions when it has them."""
    return [table.name, *detached_partitions(conn, table.name)] if table.partitions else [table.name]


def _rows(conn: Connection, table: Table, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for name in _names(conn, table):
        for row in conn.execute(text(table.select.format(table=name)), params).mappings():
            yield dict(row)


def _count(conn: Connection, table: Table, params: Mapping[str, Any]) -> int:
    return sum(int(conn.execute(text(f"SELECT count(*) FROM ({table.select.format(table=name)}) s"),
                                params).scalar_one())
               for name in _names(conn, table))


def _erase(conn: Connection, table: Table, params: Mapping[str, Any]) -> int:
    assert table.erase is not None
    return sum(int(conn.execute(text(table.erase.format(table=name)), params).scalar_one())
               for name in _names(conn, table))


# --------------------------------------------------------------------------- forget


@dataclass(frozen=True)
class Erasure:
    """What one `forget` did."""

    workspace: str
    user_found: bool
    already_erased: bool  # the user had a tombstone before this run
    cancelled: int  # active executions cancelled before anything was erased
    counts: Mapping[str, int]  # rows erased, by table (REGISTRY order)
    tombstone: Tombstone


def _cancel_executions(session: Session, user_id: uuid.UUID, now: dt.datetime) -> int:
    """Cancel the user's active executions through the control path, in id order (as steps lock)."""
    cancelled = 0
    for execution_id in session.execute(text(
            f"{_EXECUTIONS} AND status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)}) ORDER BY id"),
            {"uid": user_id}).scalars():
        try:
            control.cancel(session, execution_id, now)
            cancelled += 1
        except control.ControlError:  # it ended meanwhile
            pass
    session.flush()
    return cancelled


def forget(session: Session, who: str, *, requested_by: str,
           workspace: str = DEFAULT_WORKSPACE, now: dt.datetime | None = None) -> Erasure:
    """Erase everything the fleet keeps about `who` in the session's transaction (see the module).

    Raises NothingFound when there is no user, no tombstone and no row mentioning them.
    """
    now = now or dt.datetime.now(dt.UTC)
    # The text searches read whole tables (dead letters, outbox): no statement timeout.
    session.execute(text("SET LOCAL statement_timeout = 0"))
    workspace_id = tombstones.workspace_id(session, workspace)
    key = tombstones.key(session, workspace_id, create=True)
    assert key is not None
    ids, found = find_user(session, who)
    cancelled = 0
    if found:
        assert ids.user_id is not None
        cancelled = _cancel_executions(session, ids.user_id, now)
        session.execute(text("SELECT 1 FROM users WHERE id = :u FOR UPDATE"), {"u": ids.user_id})
    params = _params(ids)
    conn = session.connection()
    counts = {t.name: _count(conn, t, params) for t in REGISTRY if t.erase is None}
    counts.update({t.name: _erase(conn, t, params) for t in REGISTRY if t.erase is not None})
    counts = {t.name: counts[t.name] for t in REGISTRY}
    before = tombstones.find(session, workspace_id, key, ids)
    if not found and before is None and not any(counts.values()):
        raise NothingFound(f"no user and nothing kept for {who!r}")
    tombstone = tombstones.record(session, workspace_id, key, ids, requested_by=requested_by,
                                  counts=counts, now=now)
    return Erasure(workspace, found, before is not None, cancelled, counts, tombstone)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a name
        return f"uid {os.getuid()}"


def forget_user(who: str, *, requested_by: str | None = None, workspace: str = DEFAULT_WORKSPACE,
                attempts: int = 3) -> Erasure:
    """`forget` in a transaction of its own, run again if it lost a deadlock to a step or ingest."""
    by = requested_by or _os_user()
    with tenancy.all_workspaces(), session_scope() as session:
        workspace_id = workspaces.resolve(session, workspace)
    for attempt in range(1, attempts + 1):
        try:
            # Under the workspace's row-level security: no other workspace's row is touched.
            with tenancy.workspace(workspace_id), session_scope() as session:
                return forget(session, who, requested_by=by, workspace=workspace)
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) not in RETRIED_SQLSTATES or attempt == attempts:
                raise
    raise AssertionError("unreachable")


def preview(session: Session, who: str) -> tuple[Identifiers, bool, dict[str, int]]:
    """What `forget` would erase now, by table; changes nothing."""
    ids, found = find_user(session, who)
    params, conn = _params(ids), session.connection()
    return ids, found, {t.name: _count(conn, t, params) for t in REGISTRY}


# --------------------------------------------------------------------------- export


def jsonable(value: Any) -> Any:
    """A column value as JSON: times ISO 8601 in UTC, bytes base64, ids and decimals as strings."""
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.astimezone(dt.UTC).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def export(session: Session, who: str, *, workspace: str = DEFAULT_WORKSPACE,
           now: dt.datetime | None = None) -> dict[str, Any]:
    """Everything the fleet keeps about `who`, as one JSON document (a data-access request).

    `tables` has every table of REGISTRY, empty or not. Raises NothingFound as `forget` does.
    """
    ids, found = find_user(session, who)
    params, conn = _params(ids), session.connection()
    tables = {t.name: [jsonable(row) for row in _rows(conn, t, params)] for t in REGISTRY}
    workspace_id = tombstones.workspace_id(session, workspace)
    key = tombstones.key(session, workspace_id, create=False)
    tombstone = tombstones.find(session, workspace_id, key, ids) if key is not None else None
    if not found and tombstone is None and not any(tables.values()):
        raise NothingFound(f"no user and nothing kept for {who!r}")
    return {
        "exported_at": jsonable(now or dt.datetime.now(dt.UTC)),
        "workspace": workspace,
        "query": who,
        "user_found": found,
        "erased": None if tombstone is None else {
            "erased_at": jsonable(tombstone.erased_at), "requested_by": tombstone.requested_by},
        "tables": tables,
    }


# --------------------------------------------------------------------------- coverage


def _partition_names(conn: Connection) -> set[str]:
    """Detached partitions of the partitioned tables: covered with their parent."""
    return {name for table in PARTITIONED_TABLES for name in detached_partitions(conn, table)}


def suspect_tables(conn: Connection) -> dict[str, list[str]]:
    """{table: why it may hold a user's data} for the tables of the live schema."""
    columns = conn.execute(text(
        "SELECT c.relname AS table_name, a.attname AS column_name, t.typname AS type_name "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
        "AND NOT c.relispartition ORDER BY c.relname, a.attnum")).all()
    to_users = conn.execute(text(  # a partition's copies of its parent's keys: the parent's
        "SELECT DISTINCT c.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
        "WHERE k.contype = 'f' AND k.confrelid = CAST('users' AS regclass) "
        "AND NOT c.relispartition")).scalars().all()
    found: dict[str, list[str]] = {}
    partitions = _partition_names(conn)
    for row in columns:
        if row.table_name in partitions:
            continue
        reasons = found.setdefault(row.table_name, [])
        if SUSPECT_COLUMN.fullmatch(row.column_name):
            reasons.append(f"column {row.column_name}")
        elif row.type_name.lstrip("_") in SUSPECT_TYPES:
            reasons.append(f"{row.type_name} column {row.column_name}")
    for table in to_users:
        if table not in partitions:
            found.setdefault(table, []).append("a foreign key to users")
    return {table: reasons for table, reasons in found.items() if reasons}


def uncovered_tables(conn: Connection) -> dict[str, list[str]]:
    """Tables that may hold a user's data and are neither in REGISTRY nor EXEMPT."""
    listed = {t.name for t in REGISTRY} | set(EXEMPT)
    return {t: why for t, why in suspect_tables(conn).items() if t not in listed}


def stale_entries(conn: Connection) -> list[str]:
    """Names in REGISTRY or EXEMPT that are no table of the live schema."""
    tables = set(conn.execute(text(
        "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')")).scalars())
    return sorted(({t.name for t in REGISTRY} | set(EXEMPT)) - tables)
