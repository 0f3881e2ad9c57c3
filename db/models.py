"""SQLAlchemy 2.0 models of the fleet's schema.

The seed schema (the section marked "seed schema" below) is the contract: its
tables, columns, types, NOT NULL, CHECK constraints and index names appear here
exactly as written. The engine's own tables and columns are added beside them,
never in their place.
Alembic migrations (db/migrations) make the schema; these models describe it, and
a test checks the two agree.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

LIFECYCLE_STAGES: tuple[str, ...] = ("Acquisition", "Activation", "Retention", "Revenue", "Referral")
WORKFLOW_STATUSES: tuple[str, ...] = ("draft", "active", "inactive", "archived")


class ExecutionStatus(StrEnum):
    """`workflow_executions.status`; a paused execution keeps its status (see `paused_at`)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_EXECUTION_STATUSES = frozenset({ExecutionStatus.PENDING, ExecutionStatus.RUNNING})
TERMINAL_EXECUTION_STATUSES = frozenset(ExecutionStatus) - ACTIVE_EXECUTION_STATUSES


class StepOutcome(StrEnum):
    """`execution_steps.outcome`: what one history row says a node (or the reaper) did."""

    COMPLETED = "completed"
    WAITING = "waiting"
    FAILED = "failed"
    RETRYING = "retrying"
    CANCELLED = "cancelled"
    STALLED = "stalled"  # running, but nothing is ready, due, awaited or in flight
    EXITED = "exited"  # ended by a goal exit or an exit condition (node type `Exit`)


class ExitReason(StrEnum):
    """`workflow_executions.outcome` of an execution that left its workflow early."""

    GOAL = "goal"  # its goal was reached and the workflow has `exit_on_goal`
    EXITED = "exited"  # the workflow's `exit_when` condition held for its user


def sql_list(values: Iterable[StrEnum]) -> str:
    """`'a', 'b'` for an SQL `IN (...)`, in the enum's order.

    Literals, not a bound array: PostgreSQL uses a partial index (`WHERE status IN
    (...)`) only for a query whose predicate it can match with the index's at plan time,
    and the generated DDL text stays the text of the migrations.
    """
    members = list(values)
    order = list(type(members[0])) if members else []
    return ", ".join(f"'{m}'" for m in sorted(members, key=order.index))


_STAGES_SQL = ", ".join(f"'{s}'" for s in LIFECYCLE_STAGES)
_ACTIVE_SQL = sql_list(ACTIVE_EXECUTION_STATUSES)

TZ = TIMESTAMP(timezone=True)
NOW = text("now()")


class Base(DeclarativeBase):
    metadata = MetaData()
    type_annotation_map = {
        uuid.UUID: UUID(as_uuid=True),
        dt.datetime: TZ,
        dict[str, Any]: JSONB,
    }


def uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, server_default=text("gen_random_uuid()"))


# Migration 0021: every workspace table's `workspace_id` is filled from the transaction's
# tenant (`app.current_tenant_id`, db/tenancy.py); with none set, the default workspace
# (only the owner can write then: the policy refuses the application role's row).
CURRENT_WORKSPACE = text("fleet_current_workspace()")


def workspace_column() -> Mapped[uuid.UUID]:
    """The row's workspace, without a foreign key (high-volume tables: migration 0021)."""
    return mapped_column(server_default=CURRENT_WORKSPACE)


def workspace_fk(table: str) -> Mapped[uuid.UUID]:
    """The row's workspace on a definition table: with a foreign key to `workspaces`."""
    return mapped_column(ForeignKey("workspaces.id", name=f"fk_{table}_workspace"),
                         server_default=CURRENT_WORKSPACE)


# --------------------------------------------------------------------------- seed schema


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint(
            f"current_lifecycle_stage IN ({_STAGES_SQL})", name="valid_lifecycle_stage"
        ),
        Index("idx_users_lifecycle_stage", "current_lifecycle_stage"),
        Index("idx_users_attributes", "attributes", postgresql_using="gin"),
        Index("idx_users_created_at", "created_at"),
        # The seed's `email UNIQUE`, per workspace (migration 0021); the name is the seed's.
        UniqueConstraint("workspace_id", "email", name="users_email_key"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    email: Mapped[str] = mapped_column(String(255))
    current_lifecycle_stage: Mapped[str] = mapped_column(String(50))
    attributes: Mapped[dict[str, Any] | None] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    updated_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class UserLifecycleHistory(Base):
    __tablename__ = "user_lifecycle_history"
    __table_args__ = (
        CheckConstraint(
            f"(from_stage IS NULL OR from_stage IN ({_STAGES_SQL})) AND to_stage IN ({_STAGES_SQL})",
            name="valid_stages",
        ),
        Index("idx_lifecycle_history_user", "user_id", text("transitioned_at DESC")),
        Index("idx_lifecycle_history_stage", "to_stage", text("transitioned_at DESC")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    from_stage: Mapped[str | None] = mapped_column(String(50))
    to_stage: Mapped[str] = mapped_column(String(50))
    transitioned_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    # No foreign key (as the seed): history is kept forever, executions for one year.
    workflow_execution_id: Mapped[uuid.UUID | None]
    metadata_: Mapped[dict[str, Any] | None] = mapped_column(
        "metadata", server_default=text("'{}'::jsonb")
    )
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class Workflow(Base):
    __tablename__ = "workflows"
    __table_args__ = (
        CheckConstraint(
            "status IN ('draft', 'active', 'inactive', 'archived')", name="valid_workflow_status"
        ),
        Index("idx_workflows_status", "status"),
        Index("idx_workflows_lifecycle", "lifecycle_stages", postgresql_using="gin"),
        Index("uq_workflows_name", "workspace_id", "name", unique=True),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    bpmn_xml: Mapped[str] = mapped_column(Text)
    version: Mapped[str] = mapped_column(String(50), server_default=text("'1.0.0'"))
    lifecycle_stages: Mapped[list[str] | None] = mapped_column(
        ARRAY(String(50)), server_default=text("'{}'::character varying[]")
    )
    status: Mapped[str] = mapped_column(String(50), server_default=text("'draft'"))
    created_by: Mapped[uuid.UUID | None]
    created_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    updated_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    # --- not in the seed ---
    # Goal, holdout and caps from `fleet apply` (workers/sends/config.py WorkflowSettings).
    settings: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    workspace_id: Mapped[uuid.UUID] = workspace_fk("workflows")


class WorkflowExecution(Base):
    __tablename__ = "workflow_executions"
    __table_args__ = (
        CheckConstraint(
            f"status IN ({sql_list(ExecutionStatus)})",
            name="valid_execution_status",
        ),
        CheckConstraint("state_version >= 0", name="chk_execution_state_version"),
        CheckConstraint(f"outcome IS NULL OR outcome IN ({sql_list(ExitReason)})",
                        name="chk_execution_outcome"),
        Index("idx_executions_workflow", "workflow_id", text("started_at DESC")),
        Index("idx_executions_user", "user_id", text("started_at DESC")),
        Index("idx_executions_status", "status", text("started_at DESC")),
        # Durable timers: the beat claims due rows of this small partial index.
        Index("idx_executions_wake_at", "wake_at", postgresql_where=text("wake_at IS NOT NULL")),
        # Message waits: an incoming event finds the user's waiting executions.
        Index(
            "idx_executions_awaiting",
            "user_id",
            postgresql_where=text("awaiting_events IS NOT NULL"),
        ),
        # Re-entry rules: a user's executions started by one trigger.
        Index("idx_executions_trigger_user", "trigger_id", "user_id", text("started_at DESC")),
        # A redelivered event cannot start the same trigger's execution twice.
        Index(
            "uq_executions_trigger_event",
            "trigger_id",
            "source_event_id",
            unique=True,
            postgresql_where=text("source_event_id IS NOT NULL"),
        ),
        # Re-entry 'no_concurrent': one active execution per (trigger, user), enforced
        # by the database so two workers racing on one user cannot both start one.
        Index(
            "uq_executions_single_active",
            "trigger_id",
            "user_id",
            unique=True,
            postgresql_where=text(f"single_active AND status IN ({_ACTIVE_SQL})"),
        ),
        # The stuck-execution reaper looks at running rows whose step is overdue.
        Index(
            "idx_executions_step_enqueued",
            "step_enqueued_at",
            postgresql_where=text(f"status IN ({_ACTIVE_SQL})"),
        ),
        # `fleet status`, `fleet health` and the exporter count stalled executions.
        Index("idx_executions_stalled", "stalled_at",
              postgresql_where=text("stalled_at IS NOT NULL")),
        # A manual start with a key (`fleet execution start --key`) happens once.
        Index("uq_executions_start_key", "workflow_id", "start_key", unique=True,
              postgresql_where=text("start_key IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    workflow_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflows.id"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    status: Mapped[str] = mapped_column(String(50), server_default=text("'pending'"))
    variables: Mapped[dict[str, Any] | None] = mapped_column(server_default=text("'{}'::jsonb"))
    current_node_id: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    completed_at: Mapped[dt.datetime | None]
    error_message: Mapped[str | None] = mapped_column(Text)

    # --- engine columns (not in the seed) ---
    # The definition version this execution runs; it never changes after start.
    workflow_version: Mapped[str | None] = mapped_column(String(50))
    # SpiffWorkflow's serialized state, kept O(live nodes) by the engine.
    engine_state: Mapped[dict[str, Any] | None]
    # Bumped by every step; a step message carries the version it expects.
    state_version: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Durable timer: when the execution is due to be woken by the beat.
    wake_at: Mapped[dt.datetime | None]
    # Event types this execution waits for from its user (message catch events).
    awaiting_events: Mapped[list[str] | None] = mapped_column(ARRAY(String(100)))
    # User and manual tasks (node ids) waiting for `fleet execution complete`.
    awaiting_tasks: Mapped[list[str] | None] = mapped_column(ARRAY(String(255)))
    # Set when a step found the execution running with nothing ready, due, awaited or
    # in flight: it can never go on by itself (the reason is in error_message).
    stalled_at: Mapped[dt.datetime | None]
    # The caller's idempotency key of a manual start (unique per workflow).
    start_key: Mapped[str | None] = mapped_column(String(255))
    # Set while paused (the paused state); status is left as it was.
    paused_at: Mapped[dt.datetime | None]
    # When the last step message was sent; the reaper re-sends overdue ones.
    step_enqueued_at: Mapped[dt.datetime | None]
    # What started it: the trigger and the event (idempotency of starts).
    trigger_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("triggers.id", ondelete="SET NULL")
    )
    source_event_id: Mapped[uuid.UUID | None]
    # True when the trigger's re-entry rule allows one active execution per user.
    single_active: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    updated_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    # How a completed execution ended when not at an end event (ExitReason); else NULL.
    outcome: Mapped[str | None] = mapped_column(String(20))
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class UserSegment(Base):
    __tablename__ = "user_segments"
    __table_args__ = (
        Index("idx_segments_stages", "lifecycle_stages", postgresql_using="gin"),
        # Conditions refer to segments by name (`in_segment`), so names are unique.
        Index("uq_user_segments_name", "workspace_id", "name", unique=True),
        CheckConstraint("kind IN ('dynamic', 'static')", name="chk_segment_kind"),
        CheckConstraint("ttl_seconds > 0", name="chk_segment_ttl"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    conditions: Mapped[dict[str, Any]]
    lifecycle_stages: Mapped[list[str] | None] = mapped_column(
        ARRAY(String(50)), server_default=text("'{}'::character varying[]")
    )
    created_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    updated_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    # 'dynamic' members are computed from conditions; 'static' ones are set by hand.
    kind: Mapped[str] = mapped_column(String(20), server_default=text("'dynamic'"))
    # How long a computed membership stays valid (valid_until = evaluated_at + ttl).
    ttl_seconds: Mapped[int] = mapped_column(Integer, server_default=text("3600"))
    # When the last full refresh ran (dynamic segments); NULL: never.
    refreshed_at: Mapped[dt.datetime | None]
    workspace_id: Mapped[uuid.UUID] = workspace_fk("user_segments")


class UserSegmentMembership(Base):
    __tablename__ = "user_segment_memberships"
    __table_args__ = (
        Index("idx_memberships_segment", "segment_id", text("evaluated_at DESC")),
        Index(
            "idx_memberships_expiry",
            "valid_until",
            postgresql_where=text("valid_until IS NOT NULL"),
        ),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    segment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user_segments.id", ondelete="CASCADE"), primary_key=True
    )
    evaluated_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    valid_until: Mapped[dt.datetime | None]
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class SegmentExclusion(Base):
    """The negative side of the membership cache: evaluated as not a member, until valid_until.

    Kept apart from `user_segment_memberships` so that table keeps the seed's meaning
    (its rows are members). Without it, every message about a non-member would
    evaluate the segment's SQL again.
    """

    __tablename__ = "segment_exclusions"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    segment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user_segments.id", ondelete="CASCADE"), primary_key=True
    )
    evaluated_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    valid_until: Mapped[dt.datetime]
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class Trigger(Base):
    __tablename__ = "triggers"
    __table_args__ = (
        Index("idx_triggers_event_type", "event_type", postgresql_where=text("enabled = true")),
        Index("idx_triggers_workflow", "workflow_id", postgresql_where=text("enabled = true")),
        # Definitions are applied by name (`fleet apply`).
        Index("uq_triggers_name", "workspace_id", "name", unique=True),
        CheckConstraint("reentry IN ('no_concurrent', 'allow')", name="chk_trigger_reentry"),
        CheckConstraint("max_runs_per_user IS NULL OR max_runs_per_user > 0",
                        name="chk_trigger_max_runs"),
        CheckConstraint("cooldown_seconds IS NULL OR cooldown_seconds >= 0",
                        name="chk_trigger_cooldown"),
        CheckConstraint("(segment_id IS NOT NULL) = "
                        "(event_type IN ('segment.entered', 'segment.exited'))",
                        name="chk_trigger_segment"),
        Index("idx_triggers_segment", "segment_id",
              postgresql_where=text("enabled = true AND segment_id IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(255))
    event_type: Mapped[str] = mapped_column(String(255))
    conditions: Mapped[dict[str, Any]]
    workflow_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("workflows.id"))
    enabled: Mapped[bool | None] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    updated_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    # Re-entry rules (not in the seed): by default a user has at most one active
    # execution from a trigger; 'allow' lifts that, the caps apply either way.
    reentry: Mapped[str] = mapped_column(String(20), server_default=text("'no_concurrent'"))
    max_runs_per_user: Mapped[int | None] = mapped_column(Integer)
    cooldown_seconds: Mapped[int | None] = mapped_column(Integer)
    # Start variables of the executions it starts: {name: path}, e.g.
    # {"order_id": "event.data.order_id"} (not in the seed).
    start_variables: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # The segment a `segment.entered` / `segment.exited` trigger watches (not in the seed).
    segment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("user_segments.id", ondelete="RESTRICT", name="fk_triggers_segment"))
    workspace_id: Mapped[uuid.UUID] = workspace_fk("triggers")


class TriggerExecution(Base):
    """Log of trigger firings, range-partitioned by month on executed_at."""

    __tablename__ = "trigger_executions"
    __table_args__ = (
        # PostgreSQL: a partitioned table's primary key must contain the partition
        # key, so the seed's PRIMARY KEY (id) becomes (id, executed_at); this also
        # makes executed_at NOT NULL (it always has its default anyway).
        PrimaryKeyConstraint("id", "executed_at", name="trigger_executions_pkey"),
        Index("idx_trigger_executions_trigger", "trigger_id", text("executed_at DESC")),
        Index("idx_trigger_executions_user", "user_id", text("executed_at DESC")),
        # Lets an execution be deleted (SET NULL) without scanning every partition.
        Index(
            "idx_trigger_executions_execution",
            "workflow_execution_id",
            postgresql_where=text("workflow_execution_id IS NOT NULL"),
        ),
        {"postgresql_partition_by": "RANGE (executed_at)"},
    )

    id: Mapped[uuid.UUID] = mapped_column(server_default=text("gen_random_uuid()"))
    trigger_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("triggers.id"))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    event_data: Mapped[dict[str, Any] | None]
    condition_met: Mapped[bool] = mapped_column(Boolean)
    # SET NULL: executions are kept 1 year, and deleting one must neither be
    # blocked by nor delete the log rows that point at it.
    workflow_execution_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="SET NULL")
    )
    executed_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    # The event that was evaluated (not in the seed): ties the log to the audit row.
    event_id: Mapped[uuid.UUID | None]
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class LifecycleEvent(Base):
    """Audit log of all lifecycle events, range-partitioned by month on created_at."""

    __tablename__ = "lifecycle_events"
    __table_args__ = (
        # Partition key in the primary key, as for trigger_executions.
        PrimaryKeyConstraint("id", "created_at", name="lifecycle_events_pkey"),
        Index("idx_lifecycle_events_user", "user_id", text("created_at DESC")),
        Index("idx_lifecycle_events_type", "event_type", text("created_at DESC")),
        Index("idx_lifecycle_events_stage", "lifecycle_stage", text("created_at DESC")),
        Index("idx_lifecycle_events_created", text("created_at DESC")),
        Index(
            "idx_lifecycle_events_execution",
            "workflow_execution_id",
            postgresql_where=text("workflow_execution_id IS NOT NULL"),
        ),
        Index("idx_lifecycle_events_event_id", "event_id"),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )

    id: Mapped[int] = mapped_column(BigInteger, autoincrement=True)
    event_type: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    # SET NULL: audit rows are kept 2 years, executions 1 year (see TriggerExecution).
    workflow_execution_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="SET NULL")
    )
    lifecycle_stage: Mapped[str | None] = mapped_column(String(50))
    event_data: Mapped[dict[str, Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    # The producer's idempotency key (not in the seed; uniqueness lives in event_inbox,
    # since a unique index on a partitioned table would have to include created_at).
    event_id: Mapped[uuid.UUID | None]
    # When the event happened at the producer; created_at is when it was recorded.
    occurred_at: Mapped[dt.datetime | None]
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class MetricDaily(Base):
    """Aggregated daily metrics, range-partitioned by year on metric_date."""

    __tablename__ = "metrics_daily"
    __table_args__ = (
        PrimaryKeyConstraint("id", "metric_date", name="metrics_daily_pkey"),
        # The seed's unnamed UNIQUE, per workspace (migration 0021), under the name
        # PostgreSQL gave it then.
        UniqueConstraint("workspace_id", "metric_date", "lifecycle_stage", "metric_name",
                         "dimensions",
                         name="metrics_daily_metric_date_lifecycle_stage_metric_name_dimen_key"),
        Index("idx_metrics_date_stage", text("metric_date DESC"), "lifecycle_stage"),
        Index("idx_metrics_name", "metric_name", text("metric_date DESC")),
        {"postgresql_partition_by": "RANGE (metric_date)"},
    )

    id: Mapped[int] = mapped_column(BigInteger, autoincrement=True)
    metric_date: Mapped[dt.date] = mapped_column(Date)
    lifecycle_stage: Mapped[str] = mapped_column(String(50))
    metric_name: Mapped[str] = mapped_column(String(100))
    metric_value: Mapped[float] = mapped_column(Numeric)
    dimensions: Mapped[dict[str, Any] | None] = mapped_column(server_default=text("'{}'::jsonb"))
    workspace_id: Mapped[uuid.UUID] = workspace_column()


# --------------------------------------------------------------------------- engine tables


class WorkflowVersion(Base):
    """Every deployed version of a workflow's BPMN, so running executions keep theirs."""

    __tablename__ = "workflow_versions"

    workflow_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflows.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[str] = mapped_column(String(50), primary_key=True)
    bpmn_xml: Mapped[str] = mapped_column(Text)
    process_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    # {file name: XML} of the files holding the processes bpmn_xml's call activities call.
    extra_files: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class ExecutionStep(Base):
    """One row per BPMN node run by a step task (the execution history)."""

    __tablename__ = "execution_steps"
    __table_args__ = (
        UniqueConstraint("execution_id", "seq", name="uq_execution_steps_seq"),
        CheckConstraint(
            f"outcome IN ({sql_list(StepOutcome)})",
            name="chk_execution_step_outcome",
        ),
        Index("idx_execution_steps_started", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE")
    )
    # The execution's state_version this step produced: gap-free per execution.
    seq: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(255))
    node_type: Mapped[str] = mapped_column(String(100))
    outcome: Mapped[str] = mapped_column(String(20))
    attempt: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    started_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    finished_at: Mapped[dt.datetime | None]
    error_message: Mapped[str | None] = mapped_column(Text)
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class ExecutionMessage(Base):
    """An event delivered to a waiting execution (message catch); consumed by its next step."""

    __tablename__ = "execution_messages"
    __table_args__ = (
        UniqueConstraint("execution_id", "event_id", name="uq_execution_messages_event"),
        Index("idx_execution_messages_pending", "execution_id", "id",
              postgresql_where=text("consumed_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE")
    )
    event_id: Mapped[uuid.UUID]
    event_type: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]]
    received_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    consumed_at: Mapped[dt.datetime | None]
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class ActionDelivery(Base):
    """One service-task operator call: its idempotency key, parameters, state and result.

    The key is (execution, node, task instance); a redelivered action finds its row
    and does not repeat the effect.
    """

    __tablename__ = "action_deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'deferred', 'succeeded', 'failed')",
                        name="chk_action_delivery_status"),
        Index("idx_action_deliveries_execution", "execution_id"),
        Index("idx_action_deliveries_pending", "created_at",
              postgresql_where=text("status = 'pending'")),
    )

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE")
    )
    node_id: Mapped[str] = mapped_column(String(255))
    operator: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(20), server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    result: Mapped[dict[str, Any] | None]
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    finished_at: Mapped[dt.datetime | None]
    # A message's gateway outcome (SEND_OUTCOMES); NULL for operators that send nothing.
    send_outcome: Mapped[str | None] = mapped_column(String(20))
    # A deferred send (status 'deferred') runs again at this time, when the window opens.
    run_after: Mapped[dt.datetime | None]
    workspace_id: Mapped[uuid.UUID] = workspace_column()


# 'dropped': a deferred send whose execution ended (a goal exit) before it went out.
SEND_OUTCOMES = ("sent", "suppressed", "capped", "deferred", "held_out", "dropped")


class Send(Base):
    """One message the send gateway decided: its outcome, and what caps count."""

    __tablename__ = "sends"
    __table_args__ = (
        CheckConstraint(f"outcome IN ({', '.join(repr(o) for o in SEND_OUTCOMES)})",
                        name="chk_sends_outcome"),
        Index("idx_sends_user_sent", "user_id", "sent_at",
              postgresql_where=text("outcome = 'sent' AND NOT transactional")),
        Index("idx_sends_execution", "execution_id"),
        Index("idx_sends_decided", "decided_at"),
    )

    key: Mapped[str] = mapped_column(String(255), primary_key=True)  # the delivery's key
    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE"))
    workflow_id: Mapped[uuid.UUID]
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(50))
    outcome: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text)
    transactional: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    decided_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    sent_at: Mapped[dt.datetime | None]
    deferred_until: Mapped[dt.datetime | None]
    deferrals: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class ProgramSetting(Base):
    """Program-wide settings applied by `fleet apply` (name `messaging`: the send policy)."""

    __tablename__ = "program_settings"
    __table_args__ = (PrimaryKeyConstraint("workspace_id", "name", name="program_settings_pkey"),)
    # The ORM's identity is the name alone: its one reader, `session.get(ProgramSetting,
    # name)`, runs inside one workspace, whose rows are all that row-level security shows.
    __mapper_args__ = {"primary_key": ["name"]}

    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    workspace_id: Mapped[uuid.UUID] = workspace_fk("program_settings")


class UserConsent(Base):
    """A user's latest subscribe/unsubscribe for a channel ('all': every channel)."""

    __tablename__ = "user_consents"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                               primary_key=True)
    channel: Mapped[str] = mapped_column(String(50), primary_key=True)
    subscribed: Mapped[bool] = mapped_column(Boolean)
    changed_at: Mapped[dt.datetime]  # the event's occurred_at: a late older event loses
    event_id: Mapped[uuid.UUID | None]
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class Suppression(Base):
    """A workspace's suppression list: nothing is sent to `address` on `channel` ('*': any)."""

    __tablename__ = "suppressions"
    __table_args__ = (PrimaryKeyConstraint("workspace_id", "address", "channel",
                                           name="suppressions_pkey"),)

    address: Mapped[str] = mapped_column(String(255))  # lowercased
    channel: Mapped[str] = mapped_column(String(50))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class ExecutionGoal(Base):
    """A workflow's goal reached by one execution: recorded once, with the event."""

    __tablename__ = "execution_goals"
    __table_args__ = (Index("idx_execution_goals_workflow", "workflow_id", "reached_at"),)

    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE"), primary_key=True)
    workflow_id: Mapped[uuid.UUID]
    user_id: Mapped[uuid.UUID]
    event_id: Mapped[uuid.UUID]
    event_type: Mapped[str] = mapped_column(String(100))
    reached_at: Mapped[dt.datetime]  # the goal event's occurred_at
    recorded_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class ExecutionExit(Base):
    """An exit requested for an execution (its goal reached, or its `exit_when` met).

    Written by ingest in the goal's (or the identify's) transaction, whatever the
    execution is doing; its next step ends it (workers/engine/stepper.py). Once per
    execution: the first request wins.
    """

    __tablename__ = "execution_exits"
    __table_args__ = (
        CheckConstraint(f"reason IN ({sql_list(ExitReason)})", name="chk_execution_exit_reason"),
    )

    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE"), primary_key=True)
    reason: Mapped[str] = mapped_column(String(20))
    event_id: Mapped[uuid.UUID | None]  # the goal event (NULL for an exit condition)
    requested_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class SplitExposure(Base):
    """A user sent down one branch of an A/B split (the `split` operator): once per
    execution and split node, so a redelivered or repeated call records one exposure."""

    __tablename__ = "split_exposures"
    __table_args__ = (
        UniqueConstraint("execution_id", "node_id", name="uq_split_exposures_execution_node"),
        # Per-branch reports: a workflow's splits over a period.
        Index("idx_split_exposures_workflow", "workflow_id", "node_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="CASCADE"))
    workflow_id: Mapped[uuid.UUID]
    node_id: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[uuid.UUID]
    variant: Mapped[str] = mapped_column(String(100))
    # The variant's place in the declared order (0: the baseline the others are compared to).
    position: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class MessageLog(Base):
    """Messages sent by the default (local) channel of `send_message`: the offline outbox."""

    __tablename__ = "message_log"
    __table_args__ = (
        Index("idx_message_log_user", "user_id", text("sent_at DESC")),
        Index("idx_message_log_sent", "sent_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    execution_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("workflow_executions.id", ondelete="SET NULL")
    )
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(50))
    recipient: Mapped[str] = mapped_column(String(255))
    template: Mapped[str | None] = mapped_column(String(255))
    subject: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class TaskRedelivery(Base):
    """How often a task message came back after its worker died running it (poison guard)."""

    __tablename__ = "task_redeliveries"
    __table_args__ = (Index("idx_task_redeliveries_last_seen", "last_seen"),)

    task_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(255))
    redeliveries: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    first_seen: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    last_seen: Mapped[dt.datetime] = mapped_column(server_default=NOW)


class MaintenanceRun(Base):
    """A nightly job done for a day: the beat catches up every missed day exactly once."""

    __tablename__ = "maintenance_runs"

    job: Mapped[str] = mapped_column(String(100), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    finished_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    result: Mapped[dict[str, Any] | None]


class EventInbox(Base):
    """Dedupe ledger: one row per accepted event_id; a redelivery finds it and stops."""

    __tablename__ = "event_inbox"
    __table_args__ = (
        PrimaryKeyConstraint("workspace_id", "event_id", name="event_inbox_pkey"),
        Index("idx_event_inbox_received", "received_at"),
    )

    event_id: Mapped[uuid.UUID]
    event_type: Mapped[str] = mapped_column(String(100))
    received_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    # SHA-256 of (event_type, user, data): a later event with this id and other content is
    # dead-lettered, not silently dropped. NULL for rows from before it was kept.
    content_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class DeadLetter(Base):
    """Input the fleet could not process: the reason and the raw bytes, for replay."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'replayed', 'discarded')", name="chk_dead_letter_status"
        ),
        Index("idx_dead_letters_status", "status", text("received_at DESC")),
        Index("idx_dead_letters_received", "received_at"),
        Index("idx_dead_letters_event_id", "event_id", postgresql_where=text("event_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    # Where it was rejected: a task name, "producer", "outbox", "broker".
    source: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(255))
    event_id: Mapped[uuid.UUID | None]
    # Exactly the bytes received (may be invalid UTF-8 or not JSON at all).
    raw_payload: Mapped[bytes] = mapped_column(LargeBinary)
    # The size and SHA-256 of the whole body: raw_payload keeps at most its first MiB.
    raw_size: Mapped[int | None] = mapped_column(BigInteger)
    raw_sha256: Mapped[str | None] = mapped_column(String(64))
    # The payload parsed, when it was valid JSON: handy for queries and fixing.
    payload: Mapped[dict[str, Any] | None]
    status: Mapped[str] = mapped_column(String(20), server_default=text("'pending'"))
    replay_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    replayed_at: Mapped[dt.datetime | None]
    workspace_id: Mapped[uuid.UUID] = workspace_column()


class EventOutbox(Base):
    """Seed 002's transactional outbox: rows written with the producer's transaction.

    Seed 002's foreign key to domain_events is left out: the fleet has no
    domain_events table; event_id is the lifecycle event's idempotency key.
    """

    __tablename__ = "event_outbox"
    __table_args__ = (
        CheckConstraint(
            "status IN ('PENDING', 'PUBLISHED', 'FAILED')", name="chk_outbox_status"
        ),
        CheckConstraint("retry_count >= 0", name="chk_outbox_retry_count"),
        Index("idx_event_outbox_status", "status"),
        Index("idx_event_outbox_topic", "topic"),
        Index("idx_event_outbox_created", "created_at"),
        Index("idx_event_outbox_partition", "partition_key"),
        Index("idx_event_outbox_event_id", "event_id"),
        Index("idx_event_outbox_status_created", "status", "created_at"),
        Index("idx_event_outbox_unconfirmed", "published_at",
              postgresql_where=text("status = 'PUBLISHED' AND confirmed_at IS NULL")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    event_id: Mapped[uuid.UUID]
    topic: Mapped[str] = mapped_column(String(255))
    partition_key: Mapped[str | None] = mapped_column(String(255))
    headers: Mapped[dict[str, Any]]
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(50), server_default=text("'PENDING'"))
    created_at: Mapped[dt.datetime | None] = mapped_column(server_default=NOW)
    published_at: Mapped[dt.datetime | None]
    retry_count: Mapped[int | None] = mapped_column(Integer, server_default=text("0"))
    error_message: Mapped[str | None] = mapped_column(Text)
    # --- not in the seed: when the event was seen in event_inbox or dead_letters ---
    confirmed_at: Mapped[dt.datetime | None]
    workspace_id: Mapped[uuid.UUID] = workspace_column()



# --------------------------------------------------------------------------- schedules
# Seed 003 names `workflow_schedules` with trigger types cron, interval, event and
# manual; its columns are the fleet's (workers/schedules/runs.py owns both tables).
SCHEDULE_TRIGGER_TYPES: tuple[str, ...] = ("cron", "interval", "event", "manual")
SCHEDULE_RUN_STATUSES: tuple[str, ...] = ("running", "completed", "failed")


class WorkflowSchedule(Base):
    """Starts a workflow for every member of a segment (or everyone) on a cron or an interval.

    'cron' and 'interval' schedules are started by the beat at `next_run_at`; 'manual'
    ones only by `fleet schedule run`. 'event' is the seed's name for event-driven
    starts: those are the `triggers` table's, so the fleet never writes one here.
    """

    __tablename__ = "workflow_schedules"
    __table_args__ = (
        Index("uq_workflow_schedules_name", "workspace_id", "name", unique=True),
        CheckConstraint("trigger_type IN ('cron', 'interval', 'event', 'manual')",
                        name="chk_schedule_trigger_type"),
        CheckConstraint("(trigger_type = 'cron') = (cron_expression IS NOT NULL) AND "
                        "(trigger_type = 'interval') = (interval_seconds IS NOT NULL)",
                        name="chk_schedule_when"),
        CheckConstraint("interval_seconds IS NULL OR interval_seconds > 0",
                        name="chk_schedule_interval"),
        CheckConstraint("next_run_at IS NULL OR trigger_type IN ('cron', 'interval')",
                        name="chk_schedule_next_run"),
        CheckConstraint("batch_size BETWEEN 1 AND 10000", name="chk_schedule_batch_size"),
        CheckConstraint("reentry IN ('no_concurrent', 'allow')", name="chk_schedule_reentry"),
        # The beat's sweep: schedules due now.
        Index("idx_workflow_schedules_due", "next_run_at",
              postgresql_where=text("paused_at IS NULL AND next_run_at IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(255))
    workflow_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflows.id", name="fk_workflow_schedules_workflow"))
    trigger_type: Mapped[str] = mapped_column(String(20))
    cron_expression: Mapped[str | None] = mapped_column(String(255))
    # The IANA zone the cron expression's wall-clock times are read in.
    timezone: Mapped[str] = mapped_column(String(64), server_default=text("'UTC'"))
    interval_seconds: Mapped[int | None] = mapped_column(Integer)
    # NULL: every user. RESTRICT: deleting a segment a schedule starts for is refused.
    segment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("user_segments.id", ondelete="RESTRICT", name="fk_workflow_schedules_segment"))
    # Users started per transaction of a run.
    batch_size: Mapped[int] = mapped_column(Integer, server_default=text("1000"))
    # 'no_concurrent': a member with an active execution of the workflow is skipped.
    reentry: Mapped[str] = mapped_column(String(20), server_default=text("'no_concurrent'"))
    # Set by `fleet schedule pause`: no run starts, a running one stops at its next batch.
    paused_at: Mapped[dt.datetime | None]
    next_run_at: Mapped[dt.datetime | None]
    last_run_at: Mapped[dt.datetime | None]  # the scheduled time of the latest run
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    workspace_id: Mapped[uuid.UUID] = workspace_fk("workflow_schedules")


class WorkflowScheduleRun(Base):
    """One scheduled (or manual) run of a schedule: its progress, committed with each batch.

    Unique per (schedule, scheduled_for), so a beat that runs twice creates one run.
    Members are taken in `users.id` order after `last_user_id`; `batches` is the
    version a run message expects (a copy of a message finds it moved on and does
    nothing); `updated_at` is the heartbeat the beat's sweep resumes a dead run by.
    """

    __tablename__ = "workflow_schedule_runs"
    __table_args__ = (
        UniqueConstraint("schedule_id", "scheduled_for", name="uq_schedule_runs_scheduled_for"),
        CheckConstraint("status IN ('running', 'completed', 'failed')",
                        name="chk_schedule_run_status"),
        # The sweep: running runs whose heartbeat is old.
        Index("idx_schedule_runs_running", "updated_at",
              postgresql_where=text("status = 'running'")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    schedule_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_schedules.id", ondelete="CASCADE", name="fk_schedule_runs_schedule"))
    scheduled_for: Mapped[dt.datetime]
    manual: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    status: Mapped[str] = mapped_column(String(20), server_default=text("'running'"))
    last_user_id: Mapped[uuid.UUID | None]  # the keyset cursor: members up to it are done
    batches: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    started: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    skipped: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    error_message: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    finished_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    workspace_id: Mapped[uuid.UUID] = workspace_column()


# --------------------------------------------------------------------------- workspaces
# Seed 004's tenants. Every workspace table has `workspace_id` and row-level security
# (migration 0021); migration 0019 inserts 'default' (every single-workspace
# installation's) with this fixed id, which 0021 gave the rows that existed before it.
DEFAULT_WORKSPACE = "default"
DEFAULT_WORKSPACE_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")


class Workspace(Base):
    __tablename__ = "workspaces"
    __table_args__ = (Index("uq_workspaces_name", "name", unique=True),)

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(63))
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)


class WorkspaceSecret(Base):
    """A workspace's credential (webhook signing key, a channel's token), encrypted.

    `ciphertext` is a Fernet token of the fleet's keys (workers/secrets/crypto.py binds it
    to the workspace and name); `key_id` is the fingerprint of the key that made it,
    never the key. Owned by workers/secrets/store.py.
    """

    __tablename__ = "workspace_secrets"
    __table_args__ = (
        PrimaryKeyConstraint("workspace_id", "name", name="pk_workspace_secrets"),
        CheckConstraint("name ~ '^[a-z0-9][a-z0-9_.-]*$'", name="chk_workspace_secret_name"),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE", name="fk_workspace_secrets_workspace"))
    name: Mapped[str] = mapped_column(String(100))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)  # the value's last change


# --------------------------------------------------------------------------- erasure
# `fleet user forget` (workers/privacy/): tombstones name erased users by keyed hashes only.


class ErasureKey(Base):
    """A workspace's HMAC key for tombstone refs: 32 random bytes made by its first erasure."""

    __tablename__ = "erasure_keys"
    __table_args__ = (CheckConstraint("octet_length(key) = 32", name="chk_erasure_key_length"),)

    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", name="fk_erasure_keys_workspace"), primary_key=True)
    key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)


class ErasureTombstone(Base):
    """A user's personal data was erased: where, when, by whom, how many rows; nothing personal.

    `identifier_refs` are HMAC-SHA256(the workspace's key, "id:<user id>", "email:…"): an
    archive row is an erased user's when the HMAC of "id:<its user_id>" is one; `user_ref`
    is the id's, one tombstone per user (migration 0020 says more).
    Owned by workers/privacy/tombstones.py.
    """

    __tablename__ = "erasure_tombstones"
    __table_args__ = (
        CheckConstraint("user_ref ~ '^[0-9a-f]{64}$'", name="chk_erasure_user_ref"),
        Index("uq_erasure_tombstones_user", "workspace_id", "user_ref", unique=True),
        Index("idx_erasure_tombstones_refs", "identifier_refs", postgresql_using="gin"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspaces.id", name="fk_erasure_tombstones_workspace"))
    user_ref: Mapped[str] = mapped_column(String(64))
    # HMACs of every identifier used: "id:…", "email:…", "external_id:…".
    identifier_refs: Mapped[list[str]] = mapped_column(ARRAY(String(64)))
    requested_by: Mapped[str] = mapped_column(String(255))  # the operator
    erased_at: Mapped[dt.datetime] = mapped_column(server_default=NOW)
    counts: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


PARTITIONED_TABLES: dict[str, tuple[str, str]] = {
    # table: (partition column, interval)
    "lifecycle_events": ("created_at", "month"),
    "trigger_executions": ("executed_at", "month"),
    "metrics_daily": ("metric_date", "year"),
}
