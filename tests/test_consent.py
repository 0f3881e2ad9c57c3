"""Consent: the special event types through the real ingest, the suppression list and its
command, and `opt_out_reason`, the question the send gateway asks, on real PostgreSQL.

Ingest and `opt_out_reason` run in a transaction rolled back after each test; the
`fleet suppress` commands run as processes on the session's database (committed),
each on addresses of its own.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from tests.helpers import ROOT
from tests.workflow_helpers import BPMN
from workers.events.envelope import CHANNELS
from workers.events.ingest import IngestResult, ingest
from workers.rules.triggers import TriggerCache
from workers.sends import suppressions
from workers.sends.consent import opt_out_reason

pytestmark = pytest.mark.servers

T0 = dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.UTC)
ATTRIBUTE = "unsubscribed"


@pytest.fixture()
def session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction is rolled back after the test: nothing it wrote stays."""
    with Session(engine) as session:
        yield session
        session.rollback()


def _ingest(session: Session, raws: list[Any]) -> IngestResult:
    return ingest(session, raws, source="test", triggers=TriggerCache(refresh_seconds=0), now=T0)


def _consent(event_type: str, user: str, at: dt.datetime | None = None,
             **data: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"event_id": str(uuid.uuid4()), "event_type": event_type,
                           "user": user, "data": data}
    if at is not None:
        raw["occurred_at"] = at.isoformat()
    return raw


def _unsub(user: str, at: dt.datetime | None = None, **data: Any) -> dict[str, Any]:
    return _consent("user.unsubscribed", user, at, **data)


def _sub(user: str, at: dt.datetime | None = None, **data: Any) -> dict[str, Any]:
    return _consent("user.subscribed", user, at, **data)


def _user(session: Session, attributes: dict[str, Any] | None = None) -> tuple[uuid.UUID, str]:
    email = f"{uuid.uuid4().hex[:10]}@example.com"
    user_id = session.execute(text(
        "INSERT INTO users (email, current_lifecycle_stage, attributes) "
        "VALUES (:e, 'Activation', CAST(:a AS jsonb)) RETURNING id"),
        {"e": email, "a": json.dumps(attributes or {})}).scalar_one()
    return user_id, email


def _consents(session: Session, user_id: uuid.UUID) -> dict[str, tuple[bool, Any]]:
    """{channel: (subscribed, event_id as str)} of the user's rows."""
    return {r.channel: (r.subscribed, str(r.event_id)) for r in session.execute(text(
        "SELECT channel, subscribed, event_id FROM user_consents WHERE user_id = :u"),
        {"u": user_id})}


def _reason(session: Session, user_id: uuid.UUID, channel: str = "email",
            address: str | None = None, attributes: dict[str, Any] | None = None) -> str | None:
    return opt_out_reason(session, user_id=user_id, attributes=attributes, channel=channel,
                          address=address, consent_attribute=ATTRIBUTE)


def test_caps_know_the_send_channels() -> None:
    from typing import get_args

    from workers.sends.config import CapDef

    literal, none = get_args(CapDef.model_fields["channel"].annotation)
    assert get_args(literal) == CHANNELS and none is type(None)


def test_unsubscribe_then_subscribe(session: Session) -> None:
    user_id, email = _user(session)
    off = _unsub(email, T0, channel="email")
    assert _ingest(session, [off]).accepted == 1
    assert _consents(session, user_id) == {"email": (False, off["event_id"])}
    assert _reason(session, user_id) == f"unsubscribed from email (event {off['event_id']})"
    assert _reason(session, user_id, "sms") is None

    on = _sub(str(user_id), T0 + dt.timedelta(minutes=1), channel="email")
    assert _ingest(session, [on]).accepted == 1
    assert _consents(session, user_id) == {"email": (True, on["event_id"])}
    assert _reason(session, user_id) is None
    # Both are in the audit log like any event.
    assert session.execute(text(
        "SELECT count(*) FROM lifecycle_events WHERE event_id IN (:a, :b)"),
        {"a": off["event_id"], "b": on["event_id"]}).scalar() == 2


def test_an_unknown_email_is_created_and_unsubscribed(session: Session) -> None:
    email = f"{uuid.uuid4().hex[:10]}@example.com"
    _ingest(session, [_unsub(email.upper())])  # no channel: every channel; no time: now
    user_id = session.execute(text("SELECT id FROM users WHERE email = :e"),
                              {"e": email}).scalar_one()
    assert [c for c, (subscribed, _) in _consents(session, user_id).items()
            if not subscribed] == ["all"]
    assert _reason(session, user_id, "push", email).startswith("unsubscribed from all (event ")


def test_an_older_event_arriving_later_does_not_undo_a_newer_one(session: Session) -> None:
    user_id, email = _user(session)
    newer = _sub(email, T0 + dt.timedelta(hours=1), channel="sms")
    _ingest(session, [newer])
    _ingest(session, [_unsub(email, T0, channel="sms")])  # older, ingested later: loses
    assert _consents(session, user_id) == {"sms": (True, newer["event_id"])}
    assert _reason(session, user_id, "sms") is None

    # In one batch: the newest wins whatever its position; at one instant, the later one.
    latest = _unsub(email, T0 + dt.timedelta(hours=3), channel="sms")
    _ingest(session, [latest, _sub(email, T0 + dt.timedelta(hours=2), channel="sms")])
    assert _consents(session, user_id) == {"sms": (False, latest["event_id"])}
    at = T0 + dt.timedelta(hours=4)
    second = _sub(email, at, channel="sms")
    _ingest(session, [_unsub(email, at, channel="sms"), second])
    assert _consents(session, user_id) == {"sms": (True, second["event_id"])}
    # At the same instant as the stored change, a later-ingested event wins too.
    third = _unsub(email, at, channel="sms")
    _ingest(session, [third])
    assert _consents(session, user_id) == {"sms": (False, third["event_id"])}


def test_the_latest_of_all_and_the_channel_decides(session: Session) -> None:
    user_id, email = _user(session)
    everything = _unsub(email, T0)  # channel absent: all
    _ingest(session, [everything, _sub(email, T0 + dt.timedelta(minutes=1), channel="email")])
    assert _reason(session, user_id, "email") is None  # the later email subscribe wins for email
    assert _reason(session, user_id, "sms") == f"unsubscribed from all (event {everything['event_id']})"
    assert _reason(session, user_id, "slack") is not None  # a registered channel: 'all' covers it

    again = _unsub(email, T0 + dt.timedelta(minutes=2), channel="all")
    _ingest(session, [again])
    assert _reason(session, user_id, "email") == f"unsubscribed from all (event {again['event_id']})"

    _ingest(session, [_sub(email, T0 + dt.timedelta(minutes=3), channel="all")])
    assert _reason(session, user_id, "email") is None  # both rows: the 'all' one is newer
    assert _reason(session, user_id, "webhook") is None

    # The email row and the all row changed at one instant: the unsubscribe wins.
    tie = T0 + dt.timedelta(minutes=4)
    email_off = _unsub(email, tie, channel="email")
    _ingest(session, [email_off, _sub(email, tie, channel="all")])
    assert _reason(session, user_id, "email") == \
        f"unsubscribed from email (event {email_off['event_id']})"
    assert _reason(session, user_id, "sms") is None


BAD_CHANNELS: list[Any] = ["fax", "Email", " email", "", "*", None, 3, True, ["email"],
                           {"email": False}, "x" * 10_240]


@pytest.mark.parametrize("channel", BAD_CHANNELS, ids=lambda v: repr(v)[:20])
def test_an_invalid_channel_is_dead_lettered_with_no_consent(session: Session,
                                                            channel: Any) -> None:
    user_id, _ = _user(session)
    bad = _unsub(str(user_id), T0, channel=channel)
    assert (_ingest(session, [bad]).rejected, _consents(session, user_id)) == (1, {})
    [letter] = session.execute(text(
        "SELECT reason, raw_payload FROM dead_letters WHERE event_id = :e"),
        {"e": bad["event_id"]}).all()
    assert letter.reason.startswith("data: ") and "channel of a user.unsubscribed event" in \
        letter.reason and len(letter.reason) < 300, letter.reason
    assert json.loads(bytes(letter.raw_payload)) == bad
    assert session.execute(text("SELECT count(*) FROM lifecycle_events WHERE event_id = :e"),
                           {"e": bad["event_id"]}).scalar() == 0


def test_a_consent_event_is_recorded_and_may_start_a_workflow(session: Session) -> None:
    from workers.definitions import deploy_workflow

    name = f"wf-{uuid.uuid4().hex[:8]}"
    deploy_workflow(session, name, (BPMN / "wait_for_message.bpmn").read_text(), stages=[],
                    activate=True)
    workflow_id = session.execute(text("SELECT id FROM workflows WHERE name = :n"),
                                  {"n": name}).scalar_one()
    session.execute(text(
        "INSERT INTO triggers (name, event_type, conditions, workflow_id) "
        "VALUES (:n, 'user.unsubscribed', CAST(:c AS jsonb), :w)"),
        {"n": f"t-{name}", "w": workflow_id,
         "c": json.dumps({"field": "event.data.channel", "op": "eq", "value": "push"})})
    user_id, email = _user(session)
    event_ = _unsub(email, T0, channel="push", source="preference-center")
    result = _ingest(session, [event_])
    assert len(result.started) == 1
    assert _consents(session, user_id) == {"push": (False, event_["event_id"])}
    [data] = session.execute(text("SELECT event_data FROM lifecycle_events WHERE event_id = :e"),
                             {"e": event_["event_id"]}).scalars()
    assert data == {"channel": "push", "source": "preference-center"}


# ------------------------------------------------------------------------ suppressions


def test_the_suppression_list_normalises_and_validates(session: Session) -> None:
    address = f"{uuid.uuid4().hex[:10]}@Example.COM"
    assert suppressions.add(session, f"  {address} ", "email", "bounced")
    assert not suppressions.add(session, address.lower(), "email", "other")  # already there
    assert suppressions.add(session, address)  # '*' is another entry
    [row] = [r for r in suppressions.list_(session, "email") if r.channel == "email"
             and r.address == address.lower()]
    assert row.reason == "bounced"
    assert {(r.address, r.channel) for r in suppressions.list_(session, "sms")
            if r.address == address.lower()} == {(address.lower(), "*")}
    assert suppressions.remove(session, address, "email")
    assert not suppressions.remove(session, address, "email")
    for bad_address in ("", "   ", "a\x00b@example.com", "x" * 250 + "@example.com", "\ud800"):
        with pytest.raises(suppressions.InvalidSuppression):
            suppressions.add(session, bad_address)
    for bad_channel in ("all", "EMAIL", "", "fax"):
        with pytest.raises(suppressions.InvalidSuppression):
            suppressions.add(session, address, bad_channel)
    with pytest.raises(suppressions.InvalidSuppression):
        suppressions.add(session, address, "sms", "nul \x00")


def test_a_suppression_stops_the_address_before_any_consent(session: Session) -> None:
    user_id, email = _user(session, {ATTRIBUTE: ["email"]})
    _ingest(session, [_unsub(email, T0, channel="email")])
    suppressions.add(session, email, "email", "hard bounce")
    assert _reason(session, user_id, "email", email.upper()) == f"suppressed: {email} on email"
    assert _reason(session, user_id, "sms", email) is None  # the email entry only
    suppressions.add(session, email)
    assert _reason(session, user_id, "sms", email) == f"suppressed: {email} on all channels"
    assert _reason(session, user_id, "email", email) == f"suppressed: {email} on email"
    assert _reason(session, user_id, "sms", None) is None  # no address: the list cannot apply
    suppressions.remove(session, email, "email")
    suppressions.remove(session, email)
    assert _reason(session, user_id, "email", email).startswith("unsubscribed from email")
    _ingest(session, [_sub(email, T0 + dt.timedelta(days=1), channel="email")])
    # A later subscribe does not lift the attribute: it has no date, its producer clears it.
    attributes = {ATTRIBUTE: ["email"]}
    assert _reason(session, user_id, "email", email, attributes) == \
        f"attribute {ATTRIBUTE} lists email"
    assert _reason(session, user_id, "email", email, {}) is None


def test_one_round_trip_answers(session: Session) -> None:
    user_id, email = _user(session)
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", count)
    try:
        assert _reason(session, user_id, "email", email, {ATTRIBUTE: "email"}) is not None
    finally:
        event.remove(connection, "before_cursor_execute", count)
    assert len(statements) == 1


ATTRIBUTE_OPT_OUTS: list[tuple[Any, str]] = [
    ("email", "email"), ("all", "all"), (" EMAIL ", "email"), (["sms", "email"], "email"),
    (["all"], "all"), ({"email": False}, "email"), ({"all": False, "email": True}, "all"),
    ([42, None, {"x": []}, "x" * 100_000, "email"], "email"), (True, "all"),
]
ATTRIBUTE_IGNORED: list[Any] = [
    None, False, 0, 1.5, "sms", "", "x" * 100_000, ["sms", "push"], [["email"]],
    [{"email": False}], {"email": True}, {"email": "false"}, {"email": 0}, {"email": None},
    {"sms": False}, {"email": {"nested": False}}, {"x" * 100_000: False}, {1: False},
    [None] * 10_000, "email,sms",
]


def test_the_attribute_opts_out_in_each_form_and_ignores_the_rest(session: Session) -> None:
    user_id, email = _user(session)
    for value, listed in ATTRIBUTE_OPT_OUTS:
        assert _reason(session, user_id, "email", email, {ATTRIBUTE: value}) == \
            f"attribute {ATTRIBUTE} lists {listed}", value
    for value in ATTRIBUTE_IGNORED:
        assert _reason(session, user_id, "email", email, {ATTRIBUTE: value}) is None, value
    assert _reason(session, user_id, "email", email, {"other": ["email"]}) is None
    assert _reason(session, user_id, "email", email, None) is None


def test_hostile_addresses_never_raise(session: Session) -> None:
    user_id, _ = _user(session)
    for address in ("", "   ", "\x00", "\ud800@example.com", "x" * 1_000_000):
        assert _reason(session, user_id, "email", address) is None


# ------------------------------------------------------------------------- the command


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli.main", "suppress", *args],
                          cwd=ROOT, env=dict(os.environ, COLUMNS="250"), capture_output=True,
                          text=True, timeout=120)


def test_fleet_suppress_add_list_remove() -> None:
    address = f"{uuid.uuid4().hex[:10]}@example.com"
    added = fleet("add", address.upper(), "--channel", "email", "--reason", "complained")
    assert (added.returncode, added.stdout.strip()) == (0, f"suppressed {address} on email")
    again = fleet("add", address, "--channel", "email")
    assert again.returncode == 0 and "already suppressed" in again.stdout
    assert fleet("add", address).returncode == 0  # every channel

    listed = fleet("list", "--channel", "email", "--json", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    mine = [r for r in json.loads(listed.stdout) if r["address"] == address]
    assert {(r["channel"], r["reason"]) for r in mine} == {("email", "complained"), ("*", None)}
    assert all(r["created_at"].endswith("+00:00") for r in mine)
    only_any = json.loads(fleet("list", "--channel", "*", "--json", "--limit", "1000").stdout)
    assert {r["channel"] for r in only_any if r["address"] == address} == {"*"}
    table = fleet("list", "--channel", "email", "--limit", "1000")
    assert table.returncode == 0 and address in table.stdout and "complained" in table.stdout

    removed = fleet("remove", address, "--channel", "email")
    assert (removed.returncode, removed.stdout.strip()) == (0, f"unsuppressed {address} on email")
    missing = fleet("remove", address, "--channel", "email")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip() == f"{address} is not suppressed on email"
    assert fleet("remove", address).returncode == 0
    left = json.loads(fleet("list", "--json", "--limit", "1000").stdout)
    assert not [r for r in left if r["address"] == address]


@pytest.mark.parametrize(("args", "message"), [
    (("add", "   "), "the address is empty"),
    (("add", "a@example.com", "--channel", "fax"), "the channel must be one of"),
    (("add", "x" * 300), "longer than 255 characters"),
    (("remove", "a@example.com", "--channel", "all"), "the channel must be one of"),
    (("list", "--channel", "SMS"), "the channel must be one of"),
])
def test_fleet_suppress_refuses_bad_input_in_one_line(args: tuple[str, ...], message: str) -> None:
    result = fleet(*args)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("invalid input: ") and message in line, line
