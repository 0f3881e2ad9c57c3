"""Trigger re-entry rules, segment kind and TTL, unique names, a safe timestamp cast.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 14:06:57.610130
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The condition language reads ISO-8601 strings from jsonb as timestamps; an
# impossible date (2026-02-31) must give NULL (false), not abort the query. Without
# an offset the time is UTC, whatever the session's TimeZone.
TRY_TIMESTAMPTZ = """
CREATE OR REPLACE FUNCTION fleet_try_timestamptz(value text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF value ~ '(Z|[+-][0-9]{2}:[0-9]{2})$' THEN
        RETURN value::timestamptz;
    END IF;
    RETURN value::timestamp AT TIME ZONE 'UTC';
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.execute(TRY_TIMESTAMPTZ)
    op.add_column('triggers', sa.Column('reentry', sa.String(length=20), server_default=sa.text("'no_concurrent'"), nullable=False))
    op.add_column('triggers', sa.Column('max_runs_per_user', sa.Integer(), nullable=True))
    op.add_column('triggers', sa.Column('cooldown_seconds', sa.Integer(), nullable=True))
    op.create_check_constraint("chk_trigger_reentry", "triggers", "reentry IN ('no_concurrent', 'allow')")
    op.create_check_constraint("chk_trigger_max_runs", "triggers", "max_runs_per_user IS NULL OR max_runs_per_user > 0")
    op.create_check_constraint("chk_trigger_cooldown", "triggers", "cooldown_seconds IS NULL OR cooldown_seconds >= 0")
    op.create_index('uq_triggers_name', 'triggers', ['name'], unique=True)
    op.add_column('user_segments', sa.Column('kind', sa.String(length=20), server_default=sa.text("'dynamic'"), nullable=False))
    op.add_column('user_segments', sa.Column('ttl_seconds', sa.Integer(), server_default=sa.text('3600'), nullable=False))
    op.create_check_constraint("chk_segment_kind", "user_segments", "kind IN ('dynamic', 'static')")
    op.create_check_constraint("chk_segment_ttl", "user_segments", "ttl_seconds > 0")
    op.create_index('uq_user_segments_name', 'user_segments', ['name'], unique=True)
    op.add_column('workflow_executions', sa.Column('single_active', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    op.create_index('uq_executions_single_active', 'workflow_executions', ['trigger_id', 'user_id'], unique=True, postgresql_where=sa.text("single_active AND status IN ('pending', 'running')"))
    op.create_index('uq_workflows_name', 'workflows', ['name'], unique=True)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS fleet_try_timestamptz(text)")
    op.drop_index('uq_workflows_name', table_name='workflows')
    op.drop_index('uq_executions_single_active', table_name='workflow_executions', postgresql_where=sa.text("single_active AND status IN ('pending', 'running')"))
    op.drop_column('workflow_executions', 'single_active')
    op.drop_index('uq_user_segments_name', table_name='user_segments')
    op.drop_column('user_segments', 'ttl_seconds')
    op.drop_column('user_segments', 'kind')
    op.drop_index('uq_triggers_name', table_name='triggers')
    op.drop_column('triggers', 'cooldown_seconds')
    op.drop_column('triggers', 'max_runs_per_user')
    op.drop_column('triggers', 'reentry')
