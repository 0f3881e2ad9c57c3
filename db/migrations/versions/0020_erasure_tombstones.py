"""Erasure of a user (`fleet user forget`): `erasure_tombstones` and `erasure_keys`.

A tombstone records that a user's personal data was erased: in which workspace, when,
at whose request (the operator, not the user) and how many rows of each table
(`counts`), and nothing personal. The user is named only by keyed hashes, so an
archive or a backup restored later can be matched against the tombstones without the
fleet keeping who the user was:

- `identifier_refs` holds HMAC-SHA256(key, "<kind>:<value>") in hex of every
  identifier an erasure used: "id:<uuid>", "email:<normalised email>",
  "external_id:<value>". The audit archives (`fleet retention`) carry `user_id`, so an
  archived row is an erased user's when the HMAC of "id:<its user_id>" is among them.
  A second `fleet user forget` of the same email finds the tombstone by it (the user
  row is gone), sweeps once more and succeeds.
- `user_ref` is the first erasure's id ref (or, when no user row matched, the ref of
  the first identifier given): one tombstone per user and workspace.

The key is per workspace, 32 random bytes made by the first erasure (`erasure_keys`).
It is kept in the database on purpose: a backup or dump restored with its tombstones
must still match them, and without the key a tombstone shown anywhere else (a log, a
ticket, an export) cannot be tested against a guessed email. Whoever holds the
database can test a guess; that is what lets them scrub what they restore.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = postgresql.TIMESTAMP(timezone=True)
UUID = postgresql.UUID(as_uuid=True)
NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "erasure_keys",
        sa.Column("workspace_id", UUID,
                  sa.ForeignKey("workspaces.id", name="fk_erasure_keys_workspace"),
                  primary_key=True),
        sa.Column("key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.CheckConstraint("octet_length(key) = 32", name="chk_erasure_key_length"),
    )
    op.create_table(
        "erasure_tombstones",
        sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("workspace_id", UUID,
                  sa.ForeignKey("workspaces.id", name="fk_erasure_tombstones_workspace"),
                  nullable=False),
        sa.Column("user_ref", sa.String(64), nullable=False),
        sa.Column("identifier_refs", postgresql.ARRAY(sa.String(64)), nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=False),
        sa.Column("erased_at", TZ, nullable=False, server_default=NOW),
        sa.Column("counts", postgresql.JSONB(), nullable=False,
                  server_default=sa.text("'{}'::jsonb")),
        sa.CheckConstraint("user_ref ~ '^[0-9a-f]{64}$'", name="chk_erasure_user_ref"),
    )
    op.create_index("uq_erasure_tombstones_user", "erasure_tombstones",
                    ["workspace_id", "user_ref"], unique=True)
    op.create_index("idx_erasure_tombstones_refs", "erasure_tombstones", ["identifier_refs"],
                    postgresql_using="gin")


def downgrade() -> None:
    op.drop_table("erasure_tombstones")
    op.drop_table("erasure_keys")
