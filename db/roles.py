"""Least-privilege database roles: an application role and a migration role.

- The **migrator** owns the schema and every object in it. Alembic migrations
  (`fleet migrate`) run as it, and so does partition maintenance (the `maintenance`
  queue's worker and `fleet retention run`): PostgreSQL lets only a table's owner
  create, attach, detach or drop its partitions.
- The **application** role connects, reads and writes rows (SELECT, INSERT, UPDATE,
  DELETE), uses sequences and calls functions. It cannot CREATE, ALTER, DROP or
  TRUNCATE anything. Workers for `events`, `workflows`, `actions`, `segments`, the
  beat and Flower use it.
- Row-level security (migration 0021): the fleet's workspace transactions take the
  role `fleet_app` (db/tenancy.APP_ROLE) with SET LOCAL ROLE, so an application role of
  another name must be a member of `fleet_app`; the migrator is made one, for the
  maintenance worker's per-workspace sweeps. The owner sees every workspace.
- Default privileges: whatever the migrator creates later (tables of a new
  migration, next month's partitions) is granted to the application role at once.

`ensure_roles(conn, ...)` is idempotent: it creates missing roles, hands every object
of the schema over to the migrator (for a database first migrated by another role)
and (re)grants. Run it as a superuser (on a managed service, as the admin role once it
may SET ROLE to both roles: it changes owners). `roles_sql()` is the
same as plain SQL (`deploy/sql/roles.sql` is its output for the default names):

    python -m db.roles sql [--app-role fleet_app] [--migrator-role fleet_migrator]
    DATABASE_URL=<admin url> python -m db.roles apply   # passwords from
        # FLEET_APP_DB_PASSWORD / FLEET_MIGRATOR_DB_PASSWORD when set
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from psycopg import sql
from sqlalchemy import Connection, create_engine, text

from db.config import to_sqlalchemy_url

DEFAULT_APP_ROLE = "fleet_app"
DEFAULT_MIGRATOR_ROLE = "fleet_migrator"

# Conservative names, so they can be spelled inside DO blocks without any escaping.
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

APP_TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"
APP_SEQUENCE_PRIVILEGES = "USAGE, SELECT"


def _check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r}: use lowercase letters, digits and _ (at most 63)")
    return name


def roles_sql(app_role: str = DEFAULT_APP_ROLE, migrator_role: str = DEFAULT_MIGRATOR_ROLE,
              schema: str = "public") -> list[str]:
    """The statements, in order, that set up both roles on the current database."""
    app = _check_name("application role", app_role)
    mig = _check_name("migration role", migrator_role)
    sch = _check_name("schema", schema)
    if app == mig:
        raise ValueError("the application and migration roles must differ")
    ns = f"'{sch}'::regnamespace"
    not_extension = (
        "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{cat}'::regclass "
        "AND d.objid = {oid} AND d.deptype = 'e')"
    )
    return [
        # Roles (cluster-wide); created without any attribute beyond LOGIN.
        f"""DO $fleet$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{mig}') THEN
    CREATE ROLE "{mig}" LOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{app}') THEN
    CREATE ROLE "{app}" LOGIN;
  END IF;
  -- Migration 0021 makes the application role without login where it was missing.
  ALTER ROLE "{app}" LOGIN;
  -- The migrator's maintenance work inside a workspace takes the application role
  -- (db/tenancy.py: SET LOCAL ROLE), as every workspace transaction does.
  IF NOT EXISTS (SELECT FROM pg_auth_members WHERE roleid = '{app}'::regrole
                 AND member = '{mig}'::regrole) THEN
    GRANT "{app}" TO "{mig}";
  END IF;
  -- Membership in the owner would give the application role the owner's rights.
  IF EXISTS (SELECT FROM pg_auth_members WHERE roleid = '{mig}'::regrole
             AND member = '{app}'::regrole) THEN
    REVOKE "{mig}" FROM "{app}";
  END IF;
  EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO "{app}"', current_database());
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO "{mig}"', current_database());
END
$fleet$""",
        # The migrator owns the schema; nobody else may create in it.
        f'ALTER SCHEMA "{sch}" OWNER TO "{mig}"',
        f'REVOKE CREATE ON SCHEMA "{sch}" FROM PUBLIC',
        f'GRANT USAGE ON SCHEMA "{sch}" TO "{app}"',
        # Objects made before the migrator existed (e.g. migrated as postgres) move to it.
        # Partitions are owned one by one; indexes and column sequences follow their table.
        f"""DO $fleet$
DECLARE
  r record;
BEGIN
  FOR r IN
    SELECT c.oid::regclass AS obj, c.relkind FROM pg_class c
    WHERE c.relnamespace = {ns} AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
      AND c.relowner <> '{mig}'::regrole
      AND {not_extension.format(cat="pg_class", oid="c.oid")}
  LOOP
    EXECUTE format('ALTER %s %s OWNER TO "{mig}"',
                   CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                  WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, r.obj);
  END LOOP;
  FOR r IN
    SELECT c.oid::regclass AS obj FROM pg_class c
    WHERE c.relnamespace = {ns} AND c.relkind = 'S' AND c.relowner <> '{mig}'::regrole
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype IN ('a', 'i', 'e'))
  LOOP
    EXECUTE format('ALTER SEQUENCE %s OWNER TO "{mig}"', r.obj);
  END LOOP;
  FOR r IN
    SELECT p.oid::regprocedure AS obj, p.prokind FROM pg_proc p
    WHERE p.pronamespace = {ns} AND p.proowner <> '{mig}'::regrole
      AND p.prokind IN ('f', 'p', 'a')
      AND {not_extension.format(cat="pg_proc", oid="p.oid")}
  LOOP
    EXECUTE format('ALTER %s %s OWNER TO "{mig}"',
                   CASE r.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE'
                                  ELSE 'FUNCTION' END, r.obj);
  END LOOP;
  FOR r IN
    SELECT t.oid::regtype AS obj, t.typtype FROM pg_type t
    WHERE t.typnamespace = {ns} AND t.typowner <> '{mig}'::regrole
      AND (t.typtype IN ('e', 'd', 'r')
           OR (t.typtype = 'c' AND (SELECT c.relkind FROM pg_class c
                                    WHERE c.oid = t.typrelid) = 'c'))
      AND {not_extension.format(cat="pg_type", oid="t.oid")}
  LOOP
    EXECUTE format('ALTER %s %s OWNER TO "{mig}"',
                   CASE r.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, r.obj);
  END LOOP;
END
$fleet$""",
        # Rows, not schema: what exists now ...
        f'GRANT {APP_TABLE_PRIVILEGES} ON ALL TABLES IN SCHEMA "{sch}" TO "{app}"',
        f'GRANT {APP_SEQUENCE_PRIVILEGES} ON ALL SEQUENCES IN SCHEMA "{sch}" TO "{app}"',
        f'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA "{sch}" TO "{app}"',
        # ... and whatever later migrations and partition maintenance create.
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "{mig}" IN SCHEMA "{sch}" '
        f'GRANT {APP_TABLE_PRIVILEGES} ON TABLES TO "{app}"',
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "{mig}" IN SCHEMA "{sch}" '
        f'GRANT {APP_SEQUENCE_PRIVILEGES} ON SEQUENCES TO "{app}"',
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "{mig}" IN SCHEMA "{sch}" '
        f'GRANT EXECUTE ON FUNCTIONS TO "{app}"',
    ]


def render_sql(app_role: str = DEFAULT_APP_ROLE, migrator_role: str = DEFAULT_MIGRATOR_ROLE,
               schema: str = "public") -> str:
    """roles_sql() as one psql script (what deploy/sql/roles.sql holds)."""
    header = (
        "-- Least-privilege roles for the lifecycle fleet (generated by `python -m db.roles sql`;\n"
        "-- see db/roles.py). Run it connected to the fleet's database as a superuser (on a\n"
        "-- managed service: the admin role, once it may SET ROLE to both roles):\n"
        "--   psql \"$ADMIN_DATABASE_URL\" -v ON_ERROR_STOP=1 -f roles.sql\n"
        f"-- Then set passwords:  \\password {migrator_role}   and   \\password {app_role}\n"
        "-- Idempotent: run it again after restoring a dump made with --no-owner.\n"
    )
    body = ";\n\n".join(roles_sql(app_role, migrator_role, schema))
    return f"{header}\nBEGIN;\n\n{body};\n\nCOMMIT;\n"


def ensure_roles(conn: Connection, app_role: str = DEFAULT_APP_ROLE,
                 migrator_role: str = DEFAULT_MIGRATOR_ROLE, *, app_password: str | None = None,
                 migrator_password: str | None = None, schema: str = "public") -> None:
    """Create or update both roles and their privileges on `conn`'s database, then commit.

    `conn` is a SQLAlchemy connection (psycopg 3) of a superuser on the fleet's database.
    Passwords, when given, are set with ALTER ROLE (quoted by the driver).
    """
    for statement in roles_sql(app_role, migrator_role, schema):
        conn.execute(text(statement))
    raw = conn.connection.driver_connection
    assert raw is not None
    for role, password in ((app_role, app_password), (migrator_role, migrator_password)):
        if password:
            with raw.cursor() as cur:
                cur.execute(sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)))
    conn.commit()


def drop_roles(conn: Connection, *roles: str) -> None:
    """Drop roles of the current database's cluster (tests). Their objects and privileges
    must be gone from every database first (DROP OWNED BY runs here for this one)."""
    for role in roles:
        name = _check_name("role", role)
        exists = conn.exec_driver_sql(
            f"SELECT 1 FROM pg_roles WHERE rolname = '{name}'").scalar()
        if exists:
            conn.exec_driver_sql(f'DROP OWNED BY "{name}" CASCADE')
            conn.exec_driver_sql(f'DROP ROLE "{name}"')
    conn.commit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m db.roles",
                                     description="Least-privilege database roles (db/roles.py).")
    parser.add_argument("action", choices=["sql", "apply"],
                        help="sql: print the SQL; apply: run it on DATABASE_URL (an admin URL)")
    parser.add_argument("--app-role", default=os.environ.get("FLEET_APP_DB_ROLE", DEFAULT_APP_ROLE))
    parser.add_argument("--migrator-role",
                        default=os.environ.get("FLEET_MIGRATOR_DB_ROLE", DEFAULT_MIGRATOR_ROLE))
    parser.add_argument("--schema", default="public")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "sql":
        sys.stdout.write(render_sql(args.app_role, args.migrator_role, args.schema))
        return 0
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("DATABASE_URL (an admin URL of the fleet's database) is not set", file=sys.stderr)
        return 2
    engine = create_engine(to_sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            ensure_roles(conn, args.app_role, args.migrator_role,
                         app_password=os.environ.get("FLEET_APP_DB_PASSWORD") or None,
                         migrator_password=os.environ.get("FLEET_MIGRATOR_DB_PASSWORD") or None,
                         schema=args.schema)
    finally:
        engine.dispose()
    print(f"roles {args.app_role} (application) and {args.migrator_role} (migrations) are set up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
