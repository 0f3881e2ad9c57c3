"""Human tasks, stalled executions, manual start keys and trigger start variables.

`awaiting_tasks` makes a user/manual task's wait visible (and completable),
`stalled_at` marks an execution that can never go on by itself, `start_key` makes a
manual start idempotent, and `triggers.start_variables` maps event data into the
variables an execution starts with.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("workflow_executions",
                  sa.Column("awaiting_tasks", postgresql.ARRAY(sa.String(255)), nullable=True))
    op.add_column("workflow_executions",
                  sa.Column("stalled_at", postgresql.TIMESTAMP(timezone=True), nullable=True))
    op.add_column("workflow_executions", sa.Column("start_key", sa.String(255), nullable=True))
    op.create_index("idx_executions_stalled", "workflow_executions", ["stalled_at"],
                    postgresql_where=sa.text("stalled_at IS NOT NULL"))
    op.create_index("uq_executions_start_key", "workflow_executions",
                    ["workflow_id", "start_key"], unique=True,
                    postgresql_where=sa.text("start_key IS NOT NULL"))
    op.add_column("triggers", sa.Column("start_variables", postgresql.JSONB(), nullable=False,
                                        server_default=sa.text("'{}'::jsonb")))


def downgrade() -> None:
    op.drop_column("triggers", "start_variables")
    op.drop_index("uq_executions_start_key", table_name="workflow_executions")
    op.drop_index("idx_executions_stalled", table_name="workflow_executions")
    op.drop_column("workflow_executions", "start_key")
    op.drop_column("workflow_executions", "stalled_at")
    op.drop_column("workflow_executions", "awaiting_tasks")
