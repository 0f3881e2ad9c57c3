"""Goal exits: an execution may leave its workflow when its goal is reached or its
`exit_when` condition holds for its user.

- `execution_exits`: an exit requested for an execution (one row each, the first
  wins), written by ingest whatever the execution is doing; its next step ends it.
- `workflow_executions.outcome`: `goal` or `exited` for an execution that ended so
  (status `completed`); NULL for every other end.
- `execution_steps.outcome` `exited`: the history row of such an end (node type `Exit`).
- `sends.outcome` `dropped`: a send deferred to the user's window whose execution
  ended before it went out.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = postgresql.TIMESTAMP(timezone=True)
REASONS = "('goal', 'exited')"
STEPS_BEFORE = "outcome IN ('completed', 'waiting', 'failed', 'retrying', 'cancelled', 'stalled')"
STEPS_AFTER = ("outcome IN ('completed', 'waiting', 'failed', 'retrying', 'cancelled', "
               "'stalled', 'exited')")
SENDS_BEFORE = "outcome IN ('sent', 'suppressed', 'capped', 'deferred', 'held_out')"
SENDS_AFTER = "outcome IN ('sent', 'suppressed', 'capped', 'deferred', 'held_out', 'dropped')"


def upgrade() -> None:
    op.create_table(
        "execution_exits",
        sa.Column("execution_id", postgresql.UUID(as_uuid=True),
                  sa.ForeignKey("workflow_executions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("reason", sa.String(20), nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=True)),
        sa.Column("requested_at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint(f"reason IN {REASONS}", name="chk_execution_exit_reason"),
    )
    op.add_column("workflow_executions", sa.Column("outcome", sa.String(20)))
    op.create_check_constraint("chk_execution_outcome", "workflow_executions",
                               f"outcome IS NULL OR outcome IN {REASONS}")
    op.drop_constraint("chk_execution_step_outcome", "execution_steps", type_="check")
    op.create_check_constraint("chk_execution_step_outcome", "execution_steps", STEPS_AFTER)
    op.drop_constraint("chk_sends_outcome", "sends", type_="check")
    op.create_check_constraint("chk_sends_outcome", "sends", SENDS_AFTER)


def downgrade() -> None:
    op.execute("UPDATE sends SET outcome = 'deferred' WHERE outcome = 'dropped'")
    op.drop_constraint("chk_sends_outcome", "sends", type_="check")
    op.create_check_constraint("chk_sends_outcome", "sends", SENDS_BEFORE)
    op.execute("UPDATE execution_steps SET outcome = 'cancelled' WHERE outcome = 'exited'")
    op.drop_constraint("chk_execution_step_outcome", "execution_steps", type_="check")
    op.create_check_constraint("chk_execution_step_outcome", "execution_steps", STEPS_BEFORE)
    op.drop_constraint("chk_execution_outcome", "workflow_executions", type_="check")
    op.drop_column("workflow_executions", "outcome")
    op.drop_table("execution_exits")
