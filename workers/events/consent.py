"""Consent events (`user.unsubscribed` / `user.subscribed`): the one writer of `user_consents`.

One row per user and channel ('all' is a channel of its own: workers/sends/consent.py
resolves a send's channel against both) holds the latest change, dated by the event's
`occurred_at`. Events arrive late and out of order (retries, the outbox, replayed
dead letters), so a change older than the stored one is ignored instead of undoing it.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

from workers.events.envelope import ALL_CHANNELS, CONSENT_TYPES, UNSUBSCRIBED, Event
from workers.rules.triggers import UserView

# DISTINCT ON: a statement may not update one row twice, so the batch's latest change
# per (user, channel) goes in; at equal occurred_at the later event in the batch wins.
UPSERT = text(
    "INSERT INTO user_consents (user_id, channel, subscribed, changed_at, event_id) "
    "SELECT DISTINCT ON (k.user_id, k.channel) k.user_id, k.channel, k.subscribed, "
    "k.changed_at, k.event_id "
    "FROM unnest(CAST(:users AS uuid[]), CAST(:channels AS text[]), "
    "CAST(:subscribed AS boolean[]), CAST(:changed AS timestamptz[]), CAST(:events AS uuid[])) "
    "WITH ORDINALITY AS k(user_id, channel, subscribed, changed_at, event_id, n) "
    "ORDER BY k.user_id, k.channel, k.changed_at DESC, k.n DESC "
    "ON CONFLICT (user_id, channel) DO UPDATE SET subscribed = excluded.subscribed, "
    "changed_at = excluded.changed_at, event_id = excluded.event_id "
    "WHERE excluded.changed_at >= user_consents.changed_at")


def channel_of(event: Event) -> str:
    """The channel a consent event is about (the envelope has checked it)."""
    channel: str = event.data.get("channel", ALL_CHANNELS)
    return channel


def record_consents(session: Session, events: Sequence[Event], users: dict[str, UserView]) -> None:
    """Apply the batch's consent events to `user_consents` in one statement (none if none).

    Runs in ingest's transaction, after the users exist; `users` maps each event's
    `user` string to its user. `changed_at` is the event's `occurred_at` (which the
    envelope defaults to the time it was built); at an equal one, the event ingested
    later wins.
    """
    consents = [e for e in events if e.event_type in CONSENT_TYPES]
    if not consents:
        return
    session.execute(UPSERT, {
        "users": [users[e.user].id for e in consents],
        "channels": [channel_of(e) for e in consents],
        "subscribed": [e.event_type != UNSUBSCRIBED for e in consents],
        "changed": [e.occurred_at for e in consents],
        "events": [e.event_id for e in consents],
    })
