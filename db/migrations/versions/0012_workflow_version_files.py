"""The other files of a workflow version: the processes its call activities call.

A workflow may be deployed as several BPMN files; `bpmn_xml` keeps the main one
and `extra_files` ({file name: XML}) the rest, so a worker can rebuild the spec.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("workflow_versions", sa.Column("extra_files", postgresql.JSONB(), nullable=False,
                                                 server_default=sa.text("'{}'::jsonb")))


def downgrade() -> None:
    op.drop_column("workflow_versions", "extra_files")
