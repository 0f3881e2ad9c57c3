"""Workflow engine: messages delivered to waiting executions, operator calls, the message log.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = postgresql.TIMESTAMP(timezone=True)
NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "execution_messages",
        sa.Column("id", sa.BigInteger(), autoincrement=True, primary_key=True),
        sa.Column("execution_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("workflow_executions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("event_type", sa.String(100), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("received_at", TZ, server_default=NOW, nullable=False),
        sa.Column("consumed_at", TZ, nullable=True),
        sa.UniqueConstraint("execution_id", "event_id", name="uq_execution_messages_event"),
    )
    op.create_index("idx_execution_messages_pending", "execution_messages", ["execution_id", "id"],
                    postgresql_where=sa.text("consumed_at IS NULL"))
    op.create_table(
        "action_deliveries",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("execution_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("workflow_executions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("node_id", sa.String(255), nullable=False),
        sa.Column("operator", sa.String(100), nullable=False),
        sa.Column("params", postgresql.JSONB(), nullable=False),
        sa.Column("status", sa.String(20), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("result", postgresql.JSONB(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, server_default=NOW, nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.CheckConstraint("status IN ('pending', 'succeeded', 'failed')",
                           name="chk_action_delivery_status"),
    )
    op.create_index("idx_action_deliveries_execution", "action_deliveries", ["execution_id"])
    op.create_index("idx_action_deliveries_pending", "action_deliveries", ["created_at"],
                    postgresql_where=sa.text("status = 'pending'"))
    op.create_table(
        "message_log",
        sa.Column("id", sa.BigInteger(), autoincrement=True, primary_key=True),
        sa.Column("idempotency_key", sa.String(255), nullable=False, unique=True),
        sa.Column("execution_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("workflow_executions.id", ondelete="SET NULL"), nullable=True),
        sa.Column("user_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
        sa.Column("channel", sa.String(50), nullable=False),
        sa.Column("recipient", sa.String(255), nullable=False),
        sa.Column("template", sa.String(255), nullable=True),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("sent_at", TZ, server_default=NOW, nullable=False),
    )
    op.create_index("idx_message_log_user", "message_log", ["user_id", sa.text("sent_at DESC")])
    op.create_index("idx_message_log_sent", "message_log", ["sent_at"])


def downgrade() -> None:
    op.drop_table("message_log")
    op.drop_table("action_deliveries")
    op.drop_table("execution_messages")
