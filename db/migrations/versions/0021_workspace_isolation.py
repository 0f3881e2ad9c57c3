"""Workspace isolation: `workspace_id` on every workspace table, per-workspace unique
keys and row-level security (issue 19, items 1-2).

**The column.** Every table that holds a workspace's data gets `workspace_id uuid NOT
NULL`. Not `alembic_version`, `workspaces`, `task_redeliveries` (Celery task ids are
global) or `maintenance_runs` (global jobs); `workspace_secrets`, `erasure_keys` and
`erasure_tombstones` have had it from the start. It is added with the constant default
of the default workspace (migration 0019's fixed id): PostgreSQL stores a constant
default as the value of the existing rows without rewriting the table, and an
installation's existing data lands in its one workspace. The default then becomes
`fleet_current_workspace()`, so every INSERT the application makes is filled from the
transaction's tenant (`app.current_tenant_id`, set with SET LOCAL by db/tenancy.py)
with no change to the code that writes. With no tenant set it gives the default
workspace: only the owner and superusers can write then (maintenance, scripts, an old
release's code during an upgrade), and what they write belongs where every row of a
one-workspace installation does. The application role gains nothing from it: the
policy's WITH CHECK refuses any row when no tenant is set.

**Foreign keys to `workspaces`** only on the definition tables (workflows, triggers,
user_segments, workflow_schedules, program_settings), which are small and written by
`fleet apply`; each is indexed by the per-workspace unique key that leads with
`workspace_id`. Not on the high-volume tables: every insert would take FOR KEY SHARE
on the one workspace row, and concurrent lockers of one row make MultiXacts (SLRU
lookups, members to freeze and truncate) on every insert, for a check that hardly
ever fails. A
workspace is deleted on purpose, table by table (NO ACTION: the definitions refuse a
plain DELETE while they exist).

**Unique keys per workspace.** Each key that names something inside a workspace gets
`workspace_id` first and keeps its name: `users_email_key` (a UNIQUE constraint, as the
seed's `email UNIQUE` makes it), `uq_workflows_name`, `uq_user_segments_name`,
`uq_triggers_name`, `uq_workflow_schedules_name` (unique indexes), metrics_daily's
unique key (made on the parent, so every partition gets its index), and the primary
keys of `suppressions`, `program_settings` and `event_inbox`. Two workspaces may then
hold the same email, definition name or event id, and an upsert's conflict stays inside
its own workspace: a conflict with another workspace's row would be invisible to the
RLS-bound writer and fail (ON CONFLICT DO UPDATE) or drop its row (DO NOTHING). The
indexes are rebuilt under the migration's ACCESS EXCLUSIVE locks, in time proportional
to `users` and `event_inbox` (30 days of event ids). The downgrade restores the old keys,
which fails once two workspaces share a key: it is meant for one-workspace databases.

**Row-level security** on those tables and the three that already had the column:
one policy `workspace_isolation`, FOR ALL (rows read, updated and deleted: USING;
rows written: WITH CHECK, so no row can be written into or moved to another workspace).
ENABLE, not FORCE: the owner (the migrator, which runs migrations and partition
maintenance) and superusers see every workspace. TO PUBLIC, so every other role that
is not BYPASSRLS is bound whatever the application role is called (db/roles.py: default
`fleet_app`). With no tenant set the policy matches nothing: `current_setting(..., true)`
is NULL, or '' once a SET LOCAL ended in this session, and NULLIF turns that into NULL.
The expression is written inline, not through `fleet_current_workspace()`, and as a
scalar subquery, `(SELECT NULLIF(current_setting(...), '')::uuid)`: PostgreSQL runs it
once per query (an InitPlan) instead of once per row, and `workspace_id = $initplan`
is still an index condition. Measured on a 100-event ingest transaction, its statements
cost 4% more with the policies than without, against 9% with the bare expression.
One cost of RLS: for a bound role, a query's own non-leakproof conditions (jsonb `@>`,
array `&&`, LIKE) may not be pushed ahead of the policy, so they are not used as index
conditions; `=`, `<` and `= ANY` on uuid, text and timestamps are leakproof and are.

**Partitioned tables** (lifecycle_events, trigger_executions, metrics_daily): the column
and its defaults reach every partition; RLS and the policy are set on the parent, which
covers every query through the parent. A partition named directly is covered only by
its own RLS, so every existing partition gets the same policy here and every partition
made later gets it from db/partitions.py (the application role holds SELECT on
partitions: db/roles.py grants on all tables).

**The application role.** Every workspace transaction takes the role `fleet_app` (SET
LOCAL ROLE, db/tenancy.py), so that the policies bind whatever the login is. Where it is
missing this migration makes it, without login (db/roles.py makes it a login), and
grants it rows (not schema) on every table now and later, as db/roles.py does.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-11
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same constant as db/models.DEFAULT_WORKSPACE_ID (a migration does not import models).
DEFAULT_WORKSPACE_ID = "00000000-0000-0000-0000-000000000001"
SETTING = "app.current_tenant_id"  # db/tenancy.SETTING
POLICY = "workspace_isolation"

# Tables that get the column; the partitioned ones are ALTERed through their parent.
WORKSPACE_TABLES: tuple[str, ...] = (
    "users", "user_lifecycle_history", "workflows", "workflow_versions",
    "workflow_executions", "execution_steps", "execution_messages", "execution_goals",
    "execution_exits", "split_exposures", "user_segments", "user_segment_memberships",
    "segment_exclusions", "triggers", "trigger_executions", "lifecycle_events",
    "metrics_daily", "action_deliveries", "sends", "program_settings", "user_consents",
    "suppressions", "message_log", "event_inbox", "dead_letters", "event_outbox",
    "workflow_schedules", "workflow_schedule_runs",
)
# Small definition tables: the only ones with a foreign key to workspaces.
DEFINITION_TABLES: tuple[str, ...] = (
    "workflows", "triggers", "user_segments", "workflow_schedules", "program_settings",
)
# Row-level security: every table above, and those that had workspace_id already.
SECURED_TABLES: tuple[str, ...] = (
    *WORKSPACE_TABLES, "workspace_secrets", "erasure_keys", "erasure_tombstones",
)

TENANT = f"(SELECT NULLIF(current_setting('{SETTING}', true), '')::uuid)"

CURRENT_WORKSPACE_FUNCTION = f"""
CREATE FUNCTION fleet_current_workspace() RETURNS uuid
LANGUAGE sql STABLE AS $fleet$
  SELECT coalesce(NULLIF(current_setting('{SETTING}', true), '')::uuid,
                  '{DEFAULT_WORKSPACE_ID}'::uuid)
$fleet$"""

APP_ROLE = "fleet_app"  # db/tenancy.APP_ROLE, db/roles.DEFAULT_APP_ROLE
# The role every workspace transaction takes (db/tenancy.py). db/roles.py makes it a
# login with a password; here it is made (without login) only where it is missing, so
# that a database migrated by a superuser (the embedded server, the tests) works at once.
APP_ROLE_SQL = f"""
DO $fleet$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
    BEGIN
      CREATE ROLE "{APP_ROLE}" NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
      NULL;  -- another database's migration made it meanwhile (roles are cluster-wide)
    END;
  END IF;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE EXCEPTION 'role {APP_ROLE} does not exist and this role may not create it'
    USING HINT = 'Create the roles first: DATABASE_URL=<admin url> python -m db.roles apply';
END
$fleet$"""
APP_GRANTS = (
    f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{APP_ROLE}"',
    f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{APP_ROLE}"',
    f'ALTER DEFAULT PRIVILEGES GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "{APP_ROLE}"',
    f'ALTER DEFAULT PRIVILEGES GRANT USAGE, SELECT ON SEQUENCES TO "{APP_ROLE}"',
)
PARTITIONED = ("lifecycle_events", "trigger_executions", "metrics_daily")


class Key(NamedTuple):  # not a dataclass: Alembic loads this file outside sys.modules
    """A unique key that becomes per workspace: (workspace_id, *columns), same name."""

    table: str
    name: str
    kind: str  # "PRIMARY KEY", "UNIQUE" (constraints) or "INDEX" (a unique index)
    columns: tuple[str, ...]  # the key before this migration


KEYS: tuple[Key, ...] = (
    Key("users", "users_email_key", "UNIQUE", ("email",)),
    Key("workflows", "uq_workflows_name", "INDEX", ("name",)),
    Key("user_segments", "uq_user_segments_name", "INDEX", ("name",)),
    Key("triggers", "uq_triggers_name", "INDEX", ("name",)),
    Key("workflow_schedules", "uq_workflow_schedules_name", "INDEX", ("name",)),
    # The name PostgreSQL gave the seed's unnamed UNIQUE; kept as it was.
    Key("metrics_daily", "metrics_daily_metric_date_lifecycle_stage_metric_name_dimen_key",
        "UNIQUE", ("metric_date", "lifecycle_stage", "metric_name", "dimensions")),
    Key("suppressions", "suppressions_pkey", "PRIMARY KEY", ("address", "channel")),
    Key("program_settings", "program_settings_pkey", "PRIMARY KEY", ("name",)),
    Key("event_inbox", "event_inbox_pkey", "PRIMARY KEY", ("event_id",)),
)


def _rebuild_key(key: Key, columns: Sequence[str]) -> None:
    """Replace `key` by one of the same name and kind on `columns`."""
    cols = ", ".join(columns)
    if key.kind == "INDEX":
        op.execute(f"DROP INDEX {key.name}")
        op.execute(f"CREATE UNIQUE INDEX {key.name} ON {key.table} ({cols})")
    else:
        op.execute(f"ALTER TABLE {key.table} DROP CONSTRAINT {key.name}, "
                   f"ADD CONSTRAINT {key.name} {key.kind} ({cols})")


def upgrade() -> None:
    op.execute(CURRENT_WORKSPACE_FUNCTION)
    for table in WORKSPACE_TABLES:
        # A constant default: existing rows get it without a rewrite of the table.
        op.execute(f"ALTER TABLE {table} ADD COLUMN workspace_id uuid NOT NULL "
                   f"DEFAULT '{DEFAULT_WORKSPACE_ID}'::uuid")
        op.execute(f"ALTER TABLE {table} ALTER COLUMN workspace_id "
                   "SET DEFAULT fleet_current_workspace()")
    for table in DEFINITION_TABLES:
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT fk_{table}_workspace "
                   "FOREIGN KEY (workspace_id) REFERENCES workspaces (id)")
    for key in KEYS:
        _rebuild_key(key, ("workspace_id", *key.columns))
    for table in [*SECURED_TABLES, *_partitions()]:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY {POLICY} ON {table} FOR ALL TO PUBLIC "
                   f"USING (workspace_id = {TENANT}) WITH CHECK (workspace_id = {TENANT})")
    op.execute(APP_ROLE_SQL)
    for grant in APP_GRANTS:
        op.execute(grant)


def _partitions() -> list[str]:
    """The partitions that exist now (db/partitions.py secures those it makes later)."""
    rows = op.get_bind().exec_driver_sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent::regclass::text = ANY(%(parents)s) ORDER BY 1",
        {"parents": list(PARTITIONED)})
    return [name for (name,) in rows]


def downgrade() -> None:
    for table in [*SECURED_TABLES, *_partitions()]:
        op.execute(f"DROP POLICY IF EXISTS {POLICY} ON {table}")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    for key in KEYS:  # fails if two workspaces share a key (module docstring)
        _rebuild_key(key, key.columns)
    for table in DEFINITION_TABLES:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT fk_{table}_workspace")
    for table in WORKSPACE_TABLES:
        op.execute(f"ALTER TABLE {table} DROP COLUMN workspace_id")
    op.execute("DROP FUNCTION fleet_current_workspace()")
