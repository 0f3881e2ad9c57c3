"""Dead letters keep the size and SHA-256 of the body, so large bodies can be truncated.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for rows written before this revision (their body was kept whole).
    op.add_column("dead_letters", sa.Column("raw_size", sa.BigInteger(), nullable=True))
    op.add_column("dead_letters", sa.Column("raw_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("dead_letters", "raw_sha256")
    op.drop_column("dead_letters", "raw_size")
