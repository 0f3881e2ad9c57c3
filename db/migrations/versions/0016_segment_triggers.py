"""Segment entry and exit triggers: `triggers.segment_id`.

A trigger of event type `segment.entered` or `segment.exited` names the segment it
watches in `segment_id`; the membership writers emit those events (through the
outbox, in the transaction that changes the membership) only for segments some
enabled trigger watches, so a refresh of an unwatched segment writes no event.
Deleting a segment a trigger watches is refused (RESTRICT): the trigger would start
nothing, silently.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("triggers", sa.Column(
        "segment_id", postgresql.UUID(as_uuid=True),
        sa.ForeignKey("user_segments.id", ondelete="RESTRICT", name="fk_triggers_segment"),
        nullable=True))
    op.create_check_constraint(
        "chk_trigger_segment", "triggers",
        "(segment_id IS NOT NULL) = (event_type IN ('segment.entered', 'segment.exited'))")
    op.create_index("idx_triggers_segment", "triggers", ["segment_id"],
                    postgresql_where=sa.text("enabled = true AND segment_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("idx_triggers_segment", "triggers")
    op.drop_constraint("chk_trigger_segment", "triggers")
    op.drop_column("triggers", "segment_id")
