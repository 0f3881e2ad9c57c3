"""Negative membership cache: users evaluated as not in a segment, until valid_until.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "segment_exclusions",
        sa.Column("user_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("segment_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("user_segments.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("evaluated_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("valid_until", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("segment_exclusions")
