"""Segments remember their last full refresh, so the beat knows which are due.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("user_segments", sa.Column("refreshed_at", postgresql.TIMESTAMP(timezone=True),
                                             nullable=True))


def downgrade() -> None:
    op.drop_column("user_segments", "refreshed_at")
