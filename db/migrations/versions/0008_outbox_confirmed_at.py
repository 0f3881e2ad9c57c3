"""Outbox rows are confirmed when their event reaches the fleet, re-published if it never does.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("event_outbox",
                  sa.Column("confirmed_at", postgresql.TIMESTAMP(timezone=True), nullable=True))
    # Rows published before this revision are taken as delivered.
    op.execute("UPDATE event_outbox SET confirmed_at = published_at WHERE status = 'PUBLISHED'")
    op.create_index("idx_event_outbox_unconfirmed", "event_outbox", ["published_at"],
                    postgresql_where=sa.text("status = 'PUBLISHED' AND confirmed_at IS NULL"))


def downgrade() -> None:
    op.drop_index("idx_event_outbox_unconfirmed", table_name="event_outbox")
    op.drop_column("event_outbox", "confirmed_at")
