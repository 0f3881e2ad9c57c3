"""The inbox keeps each event's content hash; stored emails move to the one normal form.

A reused event_id with other content is dead-lettered only if the inbox knows what
the first event held. Emails were normalised with lower() before this revision and
with the envelope's `normalise_email` (NFKC, case folding) after it: a stored non-ASCII email whose
normal form differs is renamed to it, so its user's next event finds it instead of
creating a second user. When the normal form belongs to another user already, the
address had two users before this revision; both are left as they are (merging users
is an operator's decision) and named in the log.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

# A migration is a snapshot: the normal form and the column width as they were when
# this revision was written, copied from workers/events/envelope.py rather than
# imported, so a later change there cannot rewrite what this revision did.
MAX_EMAIL_LENGTH = 255  # users.email is varchar(255)


def normalise_email(value: str) -> str:
    """NFKC, case folding, NFKC again (the folding can leave a string unnormalised)."""
    if value.isascii():
        return value.lower().strip()
    folded = unicodedata.normalize("NFKC", value).casefold()
    return unicodedata.normalize("NFKC", folded).strip()


def upgrade() -> None:
    # NULL for rows written before this revision: their duplicates count as plain repeats.
    op.add_column("event_inbox", sa.Column("content_hash", sa.LargeBinary(), nullable=True))
    bind = op.get_bind()
    # ASCII emails are unchanged (lower() and the normal form agree): only multibyte ones.
    stored = bind.execute(sa.text(
        "SELECT id, email FROM users WHERE octet_length(email) <> char_length(email) "
        "ORDER BY created_at, id")).all()
    for user_id, email in stored:
        normal = normalise_email(email)
        if normal == email:
            continue
        if len(normal) > MAX_EMAIL_LENGTH:
            log.warning("user %s keeps email %r: its normal form is too long", user_id, email)
            continue
        renamed = bind.execute(sa.text(
            "UPDATE users SET email = :normal, updated_at = now() WHERE id = :id "
            "AND NOT EXISTS (SELECT 1 FROM users WHERE email = :normal)"),
            {"id": user_id, "normal": normal}).rowcount
        if not renamed:
            log.warning("user %s keeps email %r: %r belongs to another user", user_id, email, normal)


def downgrade() -> None:
    op.drop_column("event_inbox", "content_hash")
