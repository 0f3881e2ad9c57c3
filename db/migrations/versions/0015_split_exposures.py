"""A/B splits: `split_exposures`, one row per execution and split node (the `split` operator).

The variant a user was sent down, with its place in the declared order (0: the
baseline of the per-branch lift). Unique per (execution, node), so a redelivered or
repeated operator call records one exposure; deleted with its execution.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "split_exposures",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("execution_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("workflow_executions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("workflow_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("node_id", sa.String(255), nullable=False),
        sa.Column("user_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("variant", sa.String(100), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.UniqueConstraint("execution_id", "node_id", name="uq_split_exposures_execution_node"),
    )
    op.create_index("idx_split_exposures_workflow", "split_exposures",
                    ["workflow_id", "node_id", "created_at"])


def downgrade() -> None:
    op.drop_table("split_exposures")
