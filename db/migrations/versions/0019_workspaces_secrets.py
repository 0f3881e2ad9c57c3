"""Workspaces (minimal) and their secrets, encrypted at rest: `workspaces`, `workspace_secrets`.

Seed 004 keeps tenant credentials such as a webhook secret encrypted in the database.
A secret belongs to a workspace, so this adds the smallest `workspaces` table that can
own one (id, unique name, created_at) and its row 'default', which every
single-workspace installation uses. Its id is a fixed, well-known UUID so that a later
migration can give existing rows a `workspace_id` of the default workspace with a
constant. Workspace creation, `workspace_id` on the other tables and row-level
security come later (issue 19, items 1-2).

`workspace_secrets.ciphertext` is a Fernet token (AES-128-CBC + HMAC-SHA256) made by
the fleet (workers/secrets/crypto.py): the key never reaches PostgreSQL, unlike
pgcrypto's `pgp_sym_encrypt(value, key)`, whose key travels in the statement (and so
into `pg_stat_activity`, `log_statement` and `auto_explain`). `key_id` is a
fingerprint of the key that encrypted the row, never the key: `fleet secret
rotate-key` re-encrypts the rows whose key is not the current one.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = postgresql.TIMESTAMP(timezone=True)
UUID = postgresql.UUID(as_uuid=True)
NOW = sa.text("now()")
# The same constant as db/models.DEFAULT_WORKSPACE_ID (a migration does not import models).
DEFAULT_WORKSPACE_ID = "00000000-0000-0000-0000-000000000001"


def upgrade() -> None:
    op.create_table(
        "workspaces",
        sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
    )
    op.create_index("uq_workspaces_name", "workspaces", ["name"], unique=True)
    op.execute(sa.text("INSERT INTO workspaces (id, name) VALUES (CAST(:id AS uuid), 'default')")
               .bindparams(id=DEFAULT_WORKSPACE_ID))
    op.create_table(
        "workspace_secrets",
        sa.Column("workspace_id", UUID,
                  sa.ForeignKey("workspaces.id", ondelete="CASCADE",
                                name="fk_workspace_secrets_workspace"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.Column("updated_at", TZ, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("workspace_id", "name", name="pk_workspace_secrets"),
        sa.CheckConstraint("name ~ '^[a-z0-9][a-z0-9_.-]*$'", name="chk_workspace_secret_name"),
    )


def downgrade() -> None:
    op.drop_table("workspace_secrets")
    op.drop_table("workspaces")
