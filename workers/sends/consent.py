"""May this user receive on this channel? What the send gateway asks first (reads only).

Three sources, each able to say no; a user receives on channel C only when none does.
They are asked in this order, and the first that says no gives the reason:

1. the suppression list (`suppressions`, workers/sends/suppressions.py): the address,
   on C or on '*'. An operator's decision about an address: nothing the user's own
   events do lifts it.
2. consent events (`user_consents`, workers/events/consent.py): of the user's rows
   for C and for 'all', the one changed last decides (at the same instant, the
   unsubscribe). So `user.unsubscribed {channel: all}` then `user.subscribed
   {channel: email}` receives email only, and the reverse order receives nothing.
3. the user attribute named by the policy's `consent_attribute`: a channel name or
   "all", a list of them, a mapping {channel: false} ("all" as a key too), or `true`
   (opted out of everything: `unsubscribed: true` means what it says); names
   are compared stripped and lowercased. It has
   no date, so a later subscribe event does not override it: the producer that
   set it clears it (`user.identify` with the key set to null or to a list without C).
   Any other value in it (numbers, booleans, nested values, long strings) is ignored.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from workers.events.envelope import ALL_CHANNELS
from workers.sends.suppressions import ANY_CHANNEL, normalise_address

# One round trip for both tables; each lookup is on a primary key.
_LOOKUP = (
    "SELECT 'suppression' AS source, s.channel, false AS subscribed, "
    "CAST(NULL AS timestamptz) AS changed_at, CAST(NULL AS uuid) AS event_id "
    "FROM suppressions s WHERE s.address = CAST(:address AS text) "
    "AND s.channel IN (:channel, :any) "
    "UNION ALL "
    "SELECT 'consent', c.channel, c.subscribed, c.changed_at, c.event_id "
    "FROM user_consents c WHERE c.user_id = :user_id AND c.channel IN (:channel, :all)")
LOOKUP = text(_LOOKUP)
# The same, also taking the send gateway's transaction-scoped lock on the user (a
# volatile function in a branch that yields a row, so it always runs): a round trip
# saved. The caps' count must be a later statement, so its snapshot follows the lock.
LOOKUP_AND_LOCK = text(
    _LOOKUP + " UNION ALL SELECT 'lock', NULL, NULL, NULL, NULL "
    "FROM (SELECT pg_advisory_xact_lock(hashtext(:lock))) AS l")
MAX_NAME_LENGTH = 50  # a longer string in the attribute names no channel; not even lowercased


def opt_out_reason(session: Session, *, user_id: uuid.UUID,
                   attributes: Mapping[str, Any] | None, channel: str, address: str | None,
                   consent_attribute: str, lock: str | None = None) -> str | None:
    """None if the user may receive on `channel` at `address`, else why not (module docstring).

    With `lock`, the same round trip takes `pg_advisory_xact_lock(hashtext(lock))`.
    """
    stored = _stored_form(address)
    params = {"address": stored, "channel": channel, "any": ANY_CHANNEL, "user_id": user_id,
              "all": ALL_CHANNELS}
    if lock is not None:
        params["lock"] = lock
    rows = session.execute(LOOKUP if lock is None else LOOKUP_AND_LOCK, params).all()
    suppressed = {r.channel for r in rows if r.source == "suppression"}
    if suppressed:
        return f"suppressed: {stored} on {channel if channel in suppressed else 'all channels'}"
    consents = [r for r in rows if r.source == "consent"]
    if consents:
        latest = max(consents, key=lambda r: (r.changed_at, not r.subscribed))
        if not latest.subscribed:
            event = f" (event {latest.event_id})" if latest.event_id else ""
            return f"unsubscribed from {latest.channel}{event}"
    listed = _attribute_lists(attributes.get(consent_attribute) if attributes else None, channel)
    if listed is not None:
        return f"attribute {consent_attribute} lists {listed}"
    return None


def _stored_form(address: str | None) -> str | None:
    """The address as the list stores it; None for one the list cannot hold (so on it: never)."""
    if address is None:
        return None
    try:
        return normalise_address(address)
    except ValueError:
        return None


def _attribute_lists(value: Any, channel: str) -> str | None:
    """`channel` or "all" if the attribute's value opts the user out of `channel`; else None."""
    if value is True:
        return ALL_CHANNELS
    if isinstance(value, Mapping):
        listed = {_name(key) for key, subscribed in value.items() if subscribed is False}
    elif isinstance(value, list):
        listed = {_name(item) for item in value}
    else:
        listed = {_name(value)}
    for name in (channel, ALL_CHANNELS):
        if name in listed:
            return name
    return None


def _name(item: Any) -> str | None:
    if isinstance(item, str) and len(item) <= MAX_NAME_LENGTH:
        return item.strip().lower()
    return None
