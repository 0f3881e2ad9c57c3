"""The send gateway: program settings, workflow settings, sends, consents, suppressions, goals.

- `program_settings`: program-wide settings applied by `fleet apply` (the messaging
  policy: default time zone, send window, caps, holdout).
- `workflows.settings`: a workflow's goal, holdout and caps.
- `sends`: one row per message the gateway decided (key = the operator call's
  idempotency key), with its outcome; caps count its `sent` rows under a per-user lock.
- `action_deliveries.send_outcome` and `run_after`, and the status `deferred`: a send
  outside the user's window waits as a durable timer and runs again when it opens.
- `user_consents`: the latest subscribe/unsubscribe per user and channel (events).
- `suppressions`: the global suppression list, by address and channel.
- `execution_goals`: a workflow's goal reached, once per execution, with the event.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = postgresql.TIMESTAMP(timezone=True)
NOW = sa.text("now()")
JSONB_EMPTY = sa.text("'{}'::jsonb")
OUTCOMES = "('sent', 'suppressed', 'capped', 'deferred', 'held_out')"


def upgrade() -> None:
    op.create_table(
        "program_settings",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("value", postgresql.JSONB(), nullable=False, server_default=JSONB_EMPTY),
        sa.Column("updated_at", TZ, nullable=False, server_default=NOW),
    )
    op.add_column("workflows", sa.Column("settings", postgresql.JSONB(), nullable=False,
                                         server_default=JSONB_EMPTY))

    op.create_table(
        "sends",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("execution_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("workflow_executions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("workflow_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("channel", sa.String(50), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("transactional", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.Column("decided_at", TZ, nullable=False, server_default=NOW),
        sa.Column("sent_at", TZ),
        sa.Column("deferred_until", TZ),
        sa.Column("deferrals", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.CheckConstraint(f"outcome IN {OUTCOMES}", name="chk_sends_outcome"),
    )
    # Caps count a user's sent, non-transactional rows in a window.
    op.create_index("idx_sends_user_sent", "sends", ["user_id", "sent_at"],
                    postgresql_where=sa.text("outcome = 'sent' AND NOT transactional"))
    op.create_index("idx_sends_execution", "sends", ["execution_id"])
    op.create_index("idx_sends_decided", "sends", ["decided_at"])

    op.drop_constraint("chk_action_delivery_status", "action_deliveries", type_="check")
    op.create_check_constraint("chk_action_delivery_status", "action_deliveries",
                               "status IN ('pending', 'deferred', 'succeeded', 'failed')")
    op.add_column("action_deliveries", sa.Column("send_outcome", sa.String(20)))
    op.add_column("action_deliveries", sa.Column("run_after", TZ))

    op.create_table(
        "user_consents",
        sa.Column("user_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("channel", sa.String(50), primary_key=True),
        sa.Column("subscribed", sa.Boolean(), nullable=False),
        sa.Column("changed_at", TZ, nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=True)),
    )
    op.create_table(
        "suppressions",
        sa.Column("address", sa.String(255), primary_key=True),
        sa.Column("channel", sa.String(50), primary_key=True),  # '*': every channel
        sa.Column("reason", sa.Text()),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
    )
    op.create_table(
        "execution_goals",
        sa.Column("execution_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("workflow_executions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("workflow_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("event_type", sa.String(100), nullable=False),
        sa.Column("reached_at", TZ, nullable=False),
        sa.Column("recorded_at", TZ, nullable=False, server_default=NOW),
    )
    op.create_index("idx_execution_goals_workflow", "execution_goals",
                    ["workflow_id", "reached_at"])


def downgrade() -> None:
    op.drop_table("execution_goals")
    op.drop_table("suppressions")
    op.drop_table("user_consents")
    op.drop_column("action_deliveries", "run_after")
    op.drop_column("action_deliveries", "send_outcome")
    op.execute("UPDATE action_deliveries SET status = 'pending' WHERE status = 'deferred'")
    op.drop_constraint("chk_action_delivery_status", "action_deliveries", type_="check")
    op.create_check_constraint("chk_action_delivery_status", "action_deliveries",
                               "status IN ('pending', 'succeeded', 'failed')")
    op.drop_table("sends")
    op.drop_column("workflows", "settings")
    op.drop_table("program_settings")
