"""Initial schema: the seed tables (001), the outbox (002) and the engine's tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 13:50:17.056939
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.partitions import ensure_partitions_ahead

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('dead_letters',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('received_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('source', sa.String(length=255), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('error_type', sa.String(length=255), nullable=True),
    sa.Column('event_id', sa.UUID(), nullable=True),
    sa.Column('raw_payload', sa.LargeBinary(), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('status', sa.String(length=20), server_default=sa.text("'pending'"), nullable=False),
    sa.Column('replay_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('replayed_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'replayed', 'discarded')", name='chk_dead_letter_status'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('idx_dead_letters_event_id', 'dead_letters', ['event_id'], unique=False, postgresql_where=sa.text('event_id IS NOT NULL'))
    op.create_index('idx_dead_letters_received', 'dead_letters', ['received_at'], unique=False)
    op.create_index('idx_dead_letters_status', 'dead_letters', ['status', sa.literal_column('received_at DESC')], unique=False)
    op.create_table('event_inbox',
    sa.Column('event_id', sa.UUID(), nullable=False),
    sa.Column('event_type', sa.String(length=100), nullable=False),
    sa.Column('received_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('event_id')
    )
    op.create_index('idx_event_inbox_received', 'event_inbox', ['received_at'], unique=False)
    op.create_table('event_outbox',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('event_id', sa.UUID(), nullable=False),
    sa.Column('topic', sa.String(length=255), nullable=False),
    sa.Column('partition_key', sa.String(length=255), nullable=True),
    sa.Column('headers', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('status', sa.String(length=50), server_default=sa.text("'PENDING'"), nullable=False),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.Column('published_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('retry_count', sa.Integer(), server_default=sa.text('0'), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.CheckConstraint("status IN ('PENDING', 'PUBLISHED', 'FAILED')", name='chk_outbox_status'),
    sa.CheckConstraint('retry_count >= 0', name='chk_outbox_retry_count'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('idx_event_outbox_created', 'event_outbox', ['created_at'], unique=False)
    op.create_index('idx_event_outbox_event_id', 'event_outbox', ['event_id'], unique=False)
    op.create_index('idx_event_outbox_partition', 'event_outbox', ['partition_key'], unique=False)
    op.create_index('idx_event_outbox_status', 'event_outbox', ['status'], unique=False)
    op.create_index('idx_event_outbox_status_created', 'event_outbox', ['status', 'created_at'], unique=False)
    op.create_index('idx_event_outbox_topic', 'event_outbox', ['topic'], unique=False)
    op.create_table('metrics_daily',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('metric_date', sa.Date(), nullable=False),
    sa.Column('lifecycle_stage', sa.String(length=50), nullable=False),
    sa.Column('metric_name', sa.String(length=100), nullable=False),
    sa.Column('metric_value', sa.Numeric(), nullable=False),
    sa.Column('dimensions', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=True),
    sa.PrimaryKeyConstraint('id', 'metric_date', name='metrics_daily_pkey'),
    sa.UniqueConstraint('metric_date', 'lifecycle_stage', 'metric_name', 'dimensions'),
    postgresql_partition_by='RANGE (metric_date)'
    )
    op.create_index('idx_metrics_date_stage', 'metrics_daily', [sa.literal_column('metric_date DESC'), 'lifecycle_stage'], unique=False)
    op.create_index('idx_metrics_name', 'metrics_daily', ['metric_name', sa.literal_column('metric_date DESC')], unique=False)
    op.create_table('user_segments',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('conditions', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('lifecycle_stages', postgresql.ARRAY(sa.String(length=50)), server_default=sa.text("'{}'::character varying[]"), nullable=True),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.Column('updated_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('idx_segments_stages', 'user_segments', ['lifecycle_stages'], unique=False, postgresql_using='gin')
    op.create_table('users',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('email', sa.String(length=255), nullable=False),
    sa.Column('current_lifecycle_stage', sa.String(length=50), nullable=False),
    sa.Column('attributes', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=True),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.Column('updated_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.CheckConstraint("current_lifecycle_stage IN ('Acquisition', 'Activation', 'Retention', 'Revenue', 'Referral')", name='valid_lifecycle_stage'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('email')
    )
    op.create_index('idx_users_attributes', 'users', ['attributes'], unique=False, postgresql_using='gin')
    op.create_index('idx_users_created_at', 'users', ['created_at'], unique=False)
    op.create_index('idx_users_lifecycle_stage', 'users', ['current_lifecycle_stage'], unique=False)
    op.create_table('workflows',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('bpmn_xml', sa.Text(), nullable=False),
    sa.Column('version', sa.String(length=50), server_default=sa.text("'1.0.0'"), nullable=False),
    sa.Column('lifecycle_stages', postgresql.ARRAY(sa.String(length=50)), server_default=sa.text("'{}'::character varying[]"), nullable=True),
    sa.Column('status', sa.String(length=50), server_default=sa.text("'draft'"), nullable=False),
    sa.Column('created_by', sa.UUID(), nullable=True),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.Column('updated_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.CheckConstraint("status IN ('draft', 'active', 'inactive', 'archived')", name='valid_workflow_status'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('idx_workflows_lifecycle', 'workflows', ['lifecycle_stages'], unique=False, postgresql_using='gin')
    op.create_index('idx_workflows_status', 'workflows', ['status'], unique=False)
    op.create_table('triggers',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('event_type', sa.String(length=255), nullable=False),
    sa.Column('conditions', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('workflow_id', sa.UUID(), nullable=True),
    sa.Column('enabled', sa.Boolean(), server_default=sa.text('true'), nullable=True),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.Column('updated_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.ForeignKeyConstraint(['workflow_id'], ['workflows.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('idx_triggers_event_type', 'triggers', ['event_type'], unique=False, postgresql_where=sa.text('enabled = true'))
    op.create_index('idx_triggers_workflow', 'triggers', ['workflow_id'], unique=False, postgresql_where=sa.text('enabled = true'))
    op.create_table('user_lifecycle_history',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('user_id', sa.UUID(), nullable=False),
    sa.Column('from_stage', sa.String(length=50), nullable=True),
    sa.Column('to_stage', sa.String(length=50), nullable=False),
    sa.Column('transitioned_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.Column('workflow_execution_id', sa.UUID(), nullable=True),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=True),
    sa.CheckConstraint("(from_stage IS NULL OR from_stage IN ('Acquisition', 'Activation', 'Retention', 'Revenue', 'Referral')) AND to_stage IN ('Acquisition', 'Activation', 'Retention', 'Revenue', 'Referral')", name='valid_stages'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('idx_lifecycle_history_stage', 'user_lifecycle_history', ['to_stage', sa.literal_column('transitioned_at DESC')], unique=False)
    op.create_index('idx_lifecycle_history_user', 'user_lifecycle_history', ['user_id', sa.literal_column('transitioned_at DESC')], unique=False)
    op.create_table('user_segment_memberships',
    sa.Column('user_id', sa.UUID(), nullable=False),
    sa.Column('segment_id', sa.UUID(), nullable=False),
    sa.Column('evaluated_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.Column('valid_until', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['segment_id'], ['user_segments.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'segment_id')
    )
    op.create_index('idx_memberships_expiry', 'user_segment_memberships', ['valid_until'], unique=False, postgresql_where=sa.text('valid_until IS NOT NULL'))
    op.create_index('idx_memberships_segment', 'user_segment_memberships', ['segment_id', sa.literal_column('evaluated_at DESC')], unique=False)
    op.create_table('workflow_versions',
    sa.Column('workflow_id', sa.UUID(), nullable=False),
    sa.Column('version', sa.String(length=50), nullable=False),
    sa.Column('bpmn_xml', sa.Text(), nullable=False),
    sa.Column('process_id', sa.String(length=255), nullable=True),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['workflow_id'], ['workflows.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('workflow_id', 'version')
    )
    op.create_table('workflow_executions',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('workflow_id', sa.UUID(), nullable=False),
    sa.Column('user_id', sa.UUID(), nullable=False),
    sa.Column('status', sa.String(length=50), server_default=sa.text("'pending'"), nullable=False),
    sa.Column('variables', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=True),
    sa.Column('current_node_id', sa.String(length=255), nullable=True),
    sa.Column('started_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.Column('completed_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('workflow_version', sa.String(length=50), nullable=True),
    sa.Column('engine_state', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('state_version', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('wake_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('awaiting_events', postgresql.ARRAY(sa.String(length=100)), nullable=True),
    sa.Column('paused_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('step_enqueued_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('trigger_id', sa.UUID(), nullable=True),
    sa.Column('source_event_id', sa.UUID(), nullable=True),
    sa.Column('updated_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'running', 'completed', 'failed', 'cancelled')", name='valid_execution_status'),
    sa.CheckConstraint('state_version >= 0', name='chk_execution_state_version'),
    sa.ForeignKeyConstraint(['trigger_id'], ['triggers.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.ForeignKeyConstraint(['workflow_id'], ['workflows.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('idx_executions_awaiting', 'workflow_executions', ['user_id'], unique=False, postgresql_where=sa.text('awaiting_events IS NOT NULL'))
    op.create_index('idx_executions_status', 'workflow_executions', ['status', sa.literal_column('started_at DESC')], unique=False)
    op.create_index('idx_executions_step_enqueued', 'workflow_executions', ['step_enqueued_at'], unique=False, postgresql_where=sa.text("status IN ('pending', 'running')"))
    op.create_index('idx_executions_trigger_user', 'workflow_executions', ['trigger_id', 'user_id', sa.literal_column('started_at DESC')], unique=False)
    op.create_index('idx_executions_user', 'workflow_executions', ['user_id', sa.literal_column('started_at DESC')], unique=False)
    op.create_index('idx_executions_wake_at', 'workflow_executions', ['wake_at'], unique=False, postgresql_where=sa.text('wake_at IS NOT NULL'))
    op.create_index('idx_executions_workflow', 'workflow_executions', ['workflow_id', sa.literal_column('started_at DESC')], unique=False)
    op.create_index('uq_executions_trigger_event', 'workflow_executions', ['trigger_id', 'source_event_id'], unique=True, postgresql_where=sa.text('source_event_id IS NOT NULL'))
    op.create_table('execution_steps',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('execution_id', sa.UUID(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.String(length=255), nullable=False),
    sa.Column('node_type', sa.String(length=100), nullable=False),
    sa.Column('outcome', sa.String(length=20), nullable=False),
    sa.Column('attempt', sa.Integer(), server_default=sa.text('1'), nullable=False),
    sa.Column('started_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.CheckConstraint("outcome IN ('completed', 'waiting', 'failed', 'retrying', 'cancelled')", name='chk_execution_step_outcome'),
    sa.ForeignKeyConstraint(['execution_id'], ['workflow_executions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('execution_id', 'seq', name='uq_execution_steps_seq')
    )
    op.create_index('idx_execution_steps_started', 'execution_steps', ['started_at'], unique=False)
    op.create_table('lifecycle_events',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('event_type', sa.String(length=100), nullable=False),
    sa.Column('user_id', sa.UUID(), nullable=True),
    sa.Column('workflow_execution_id', sa.UUID(), nullable=True),
    sa.Column('lifecycle_stage', sa.String(length=50), nullable=True),
    sa.Column('event_data', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('event_id', sa.UUID(), nullable=True),
    sa.Column('occurred_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.ForeignKeyConstraint(['workflow_execution_id'], ['workflow_executions.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', 'created_at', name='lifecycle_events_pkey'),
    postgresql_partition_by='RANGE (created_at)'
    )
    op.create_index('idx_lifecycle_events_created', 'lifecycle_events', [sa.literal_column('created_at DESC')], unique=False)
    op.create_index('idx_lifecycle_events_event_id', 'lifecycle_events', ['event_id'], unique=False)
    op.create_index('idx_lifecycle_events_execution', 'lifecycle_events', ['workflow_execution_id'], unique=False, postgresql_where=sa.text('workflow_execution_id IS NOT NULL'))
    op.create_index('idx_lifecycle_events_stage', 'lifecycle_events', ['lifecycle_stage', sa.literal_column('created_at DESC')], unique=False)
    op.create_index('idx_lifecycle_events_type', 'lifecycle_events', ['event_type', sa.literal_column('created_at DESC')], unique=False)
    op.create_index('idx_lifecycle_events_user', 'lifecycle_events', ['user_id', sa.literal_column('created_at DESC')], unique=False)
    op.create_table('trigger_executions',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('trigger_id', sa.UUID(), nullable=False),
    sa.Column('user_id', sa.UUID(), nullable=True),
    sa.Column('event_data', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('condition_met', sa.Boolean(), nullable=False),
    sa.Column('workflow_execution_id', sa.UUID(), nullable=True),
    sa.Column('executed_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('event_id', sa.UUID(), nullable=True),
    sa.ForeignKeyConstraint(['trigger_id'], ['triggers.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.ForeignKeyConstraint(['workflow_execution_id'], ['workflow_executions.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', 'executed_at', name='trigger_executions_pkey'),
    postgresql_partition_by='RANGE (executed_at)'
    )
    op.create_index('idx_trigger_executions_execution', 'trigger_executions', ['workflow_execution_id'], unique=False, postgresql_where=sa.text('workflow_execution_id IS NOT NULL'))
    op.create_index('idx_trigger_executions_trigger', 'trigger_executions', ['trigger_id', sa.literal_column('executed_at DESC')], unique=False)
    op.create_index('idx_trigger_executions_user', 'trigger_executions', ['user_id', sa.literal_column('executed_at DESC')], unique=False)
    # Partitions: a DEFAULT one per table (no insert is ever refused) and the
    # current period plus the next ones; beat maintenance keeps creating them.
    ensure_partitions_ahead(op.get_bind(), dt.datetime.now(dt.UTC).date())


def downgrade() -> None:
    # Children before parents; dropping a partitioned table drops its partitions.
    for table in (
        "trigger_executions",
        "lifecycle_events",
        "execution_steps",
        "workflow_executions",
        "workflow_versions",
        "user_segment_memberships",
        "user_lifecycle_history",
        "triggers",
        "workflows",
        "users",
        "user_segments",
        "metrics_daily",
        "event_outbox",
        "event_inbox",
        "dead_letters",
    ):
        op.drop_table(table)
