"""The global suppression list: the one writer of `suppressions` (`fleet suppress`).

An address on the list gets nothing on its channel ('*': on any channel), from any
workflow, transactional sends included (workers/sends/consent.py reads it).
Addresses are kept in the form users' emails are (workers/events/envelope.py
`normalise_email`: stripped, NFKC, case-folded; plain ASCII is just lowercased), so
`Ada@Example.com` on the list stops the user created by `ada@example.com`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.models import Suppression
from workers.events.envelope import CHANNELS, MAX_EMAIL_LENGTH, normalise_email

ANY_CHANNEL = "*"
MAX_ADDRESS_LENGTH = MAX_EMAIL_LENGTH  # suppressions.address is varchar(255)
DEFAULT_LIMIT = 100


class InvalidSuppression(ValueError):
    """An address, channel or reason the list cannot hold; the message says which and why."""


def _storable(what: str, value: str) -> None:
    """PostgreSQL text cannot hold NUL, and UTF-8 cannot encode a lone surrogate."""
    if "\x00" in value:
        raise InvalidSuppression(f"the {what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidSuppression(f"the {what} contains invalid Unicode (lone surrogates)") from None


def normalise_address(address: str) -> str:
    """The stored form of an address; raises InvalidSuppression for one the list cannot hold."""
    _storable("address", address)
    normalised = normalise_email(address)
    if not normalised:
        raise InvalidSuppression("the address is empty")
    if len(normalised) > MAX_ADDRESS_LENGTH:
        raise InvalidSuppression(f"the address is longer than {MAX_ADDRESS_LENGTH} characters "
                                 "once normalised")
    return normalised


def check_channel(channel: str) -> str:
    """`channel` if the list can hold it ('*' or a send channel); else InvalidSuppression."""
    if channel != ANY_CHANNEL and channel not in CHANNELS:
        shown = repr(channel) if len(channel) <= 40 else f"{len(channel)} characters"
        raise InvalidSuppression(f"the channel must be one of {', '.join(CHANNELS)} or "
                                 f"{ANY_CHANNEL} (every channel), not {shown}")
    return channel


def check_reason(reason: str) -> str:
    """`reason` if PostgreSQL text holds it; else InvalidSuppression."""
    _storable("reason", reason)
    return reason


def add(session: Session, address: str, channel: str = ANY_CHANNEL,
        reason: str | None = None) -> bool:
    """Suppress `address` on `channel`; True if added, False if it was already (reason kept)."""
    added = session.execute(
        pg_insert(Suppression)
        .values(address=normalise_address(address), channel=check_channel(channel),
                reason=None if reason is None else check_reason(reason))
        .on_conflict_do_nothing().returning(Suppression.address)).first()
    return added is not None


def remove(session: Session, address: str, channel: str = ANY_CHANNEL) -> bool:
    """Lift the suppression of `address` on exactly `channel`; False if there was none."""
    removed = session.execute(
        delete(Suppression)
        .where(Suppression.address == normalise_address(address),
               Suppression.channel == check_channel(channel))
        .returning(Suppression.address)).first()
    return removed is not None


def list_(session: Session, channel: str | None = None,
          limit: int = DEFAULT_LIMIT) -> Sequence[Suppression]:
    """The newest `limit` suppressions; with a send channel, those that apply to it
    (that channel's and the '*' ones), with '*' only the '*' ones."""
    query = select(Suppression).order_by(Suppression.created_at.desc(),
                                         Suppression.address, Suppression.channel).limit(limit)
    if channel is not None:
        check_channel(channel)
        query = query.where(Suppression.channel == channel if channel == ANY_CHANNEL
                            else or_(Suppression.channel == channel,
                                     Suppression.channel == ANY_CHANNEL))
    return session.execute(query).scalars().all()
