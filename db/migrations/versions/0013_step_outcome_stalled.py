"""A step-history row may say `stalled`: the execution can never go on by itself.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = "outcome IN ('completed', 'waiting', 'failed', 'retrying', 'cancelled')"
AFTER = "outcome IN ('completed', 'waiting', 'failed', 'retrying', 'cancelled', 'stalled')"


def upgrade() -> None:
    op.drop_constraint("chk_execution_step_outcome", "execution_steps", type_="check")
    op.create_check_constraint("chk_execution_step_outcome", "execution_steps", AFTER)


def downgrade() -> None:
    op.execute("UPDATE execution_steps SET outcome = 'waiting' WHERE outcome = 'stalled'")
    op.drop_constraint("chk_execution_step_outcome", "execution_steps", type_="check")
    op.create_check_constraint("chk_execution_step_outcome", "execution_steps", BEFORE)
