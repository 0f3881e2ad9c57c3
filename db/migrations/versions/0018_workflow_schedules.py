"""Scheduled audience journeys: `workflow_schedules` and `workflow_schedule_runs`.

Seed 003 names `workflow_schedules` with the trigger types cron, interval, event and
manual (no columns): a schedule starts a workflow for every member of a segment (or
every user, `segment_id` NULL) on a cron expression read in a time zone, on an
interval, or only by hand ('manual': `fleet schedule run`). 'event' is allowed by
the CHECK as the seed's vocabulary, but event-driven starts are the `triggers`
table's, so the fleet writes none. A run is one row per (schedule, scheduled_for),
with its keyset cursor and counts committed with each batch of starts, so a run
whose worker died resumes where it stopped and starts nobody twice.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = postgresql.TIMESTAMP(timezone=True)
UUID = postgresql.UUID(as_uuid=True)
NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "workflow_schedules",
        sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("workflow_id", UUID,
                  sa.ForeignKey("workflows.id", name="fk_workflow_schedules_workflow"),
                  nullable=False),
        sa.Column("trigger_type", sa.String(20), nullable=False),
        sa.Column("cron_expression", sa.String(255), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=False, server_default=sa.text("'UTC'")),
        sa.Column("interval_seconds", sa.Integer(), nullable=True),
        sa.Column("segment_id", UUID,
                  sa.ForeignKey("user_segments.id", ondelete="RESTRICT",
                                name="fk_workflow_schedules_segment"), nullable=True),
        sa.Column("batch_size", sa.Integer(), nullable=False, server_default=sa.text("1000")),
        sa.Column("reentry", sa.String(20), nullable=False,
                  server_default=sa.text("'no_concurrent'")),
        sa.Column("paused_at", TZ, nullable=True),
        sa.Column("next_run_at", TZ, nullable=True),
        sa.Column("last_run_at", TZ, nullable=True),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.Column("updated_at", TZ, nullable=False, server_default=NOW),
        sa.CheckConstraint("trigger_type IN ('cron', 'interval', 'event', 'manual')",
                           name="chk_schedule_trigger_type"),
        sa.CheckConstraint("(trigger_type = 'cron') = (cron_expression IS NOT NULL) AND "
                           "(trigger_type = 'interval') = (interval_seconds IS NOT NULL)",
                           name="chk_schedule_when"),
        sa.CheckConstraint("interval_seconds IS NULL OR interval_seconds > 0",
                           name="chk_schedule_interval"),
        sa.CheckConstraint("next_run_at IS NULL OR trigger_type IN ('cron', 'interval')",
                           name="chk_schedule_next_run"),
        sa.CheckConstraint("batch_size BETWEEN 1 AND 10000", name="chk_schedule_batch_size"),
        sa.CheckConstraint("reentry IN ('no_concurrent', 'allow')", name="chk_schedule_reentry"),
    )
    op.create_index("uq_workflow_schedules_name", "workflow_schedules", ["name"], unique=True)
    op.create_index("idx_workflow_schedules_due", "workflow_schedules", ["next_run_at"],
                    postgresql_where=sa.text("paused_at IS NULL AND next_run_at IS NOT NULL"))
    op.create_table(
        "workflow_schedule_runs",
        sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("schedule_id", UUID,
                  sa.ForeignKey("workflow_schedules.id", ondelete="CASCADE",
                                name="fk_schedule_runs_schedule"), nullable=False),
        sa.Column("scheduled_for", TZ, nullable=False),
        sa.Column("manual", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("status", sa.String(20), nullable=False, server_default=sa.text("'running'")),
        sa.Column("last_user_id", UUID, nullable=True),
        sa.Column("batches", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("started", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("skipped", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("started_at", TZ, nullable=False, server_default=NOW),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("updated_at", TZ, nullable=False, server_default=NOW),
        sa.UniqueConstraint("schedule_id", "scheduled_for", name="uq_schedule_runs_scheduled_for"),
        sa.CheckConstraint("status IN ('running', 'completed', 'failed')",
                           name="chk_schedule_run_status"),
    )
    op.create_index("idx_schedule_runs_running", "workflow_schedule_runs", ["updated_at"],
                    postgresql_where=sa.text("status = 'running'"))


def downgrade() -> None:
    op.drop_table("workflow_schedule_runs")
    op.drop_table("workflow_schedules")
