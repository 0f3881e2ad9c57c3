"""Poison-message guard: count redeliveries of task messages whose worker died.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "task_redeliveries",
        sa.Column("task_id", sa.String(255), primary_key=True),
        sa.Column("task_name", sa.String(255), nullable=False),
        sa.Column("redeliveries", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("first_seen", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("last_seen", TZ, server_default=sa.text("now()"), nullable=False),
    )
    op.create_index("idx_task_redeliveries_last_seen", "task_redeliveries", ["last_seen"])


def downgrade() -> None:
    op.drop_table("task_redeliveries")
