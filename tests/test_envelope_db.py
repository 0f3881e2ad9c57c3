"""The envelope against the real PostgreSQL: what it accepts stores and reads back unchanged.

Ingest runs in-process on a real session (no worker needed): these tests are about
which values the database refuses, and what ingest does when it refuses one.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from tests.helpers import ROOT
from workers.events.envelope import EVENT_TYPE_PATTERN, InvalidEvent, parse_event
from workers.events.ingest import ingest
from workers.rules.triggers import TriggerCache

pytestmark = pytest.mark.servers

# Characters that have broken stores before: NUL, lone surrogates, ones that grow when
# normalised or folded ('İ', 'ß', 'ﷺ'), compatibility forms, combining marks, '＠', and the
# pieces of a literal backslash-u0000 (text, not NUL).
TRICKY = ["\x00", "\ud800", "\udfff", "İ", "ß", "ﷺ", "ａ", "Ａ", "\u0301", "＠", "\u3000", "\uffff",
          "\U0010ffff", "\\", "u", "0", "é", "Σ", "ς", "\x7f", "\u200b"]
chars = st.one_of(st.characters(exclude_categories=["Cc", "Zs", "Zl", "Zp"]), st.sampled_from(TRICKY))
texts = st.text(chars, max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes)))
occurred = st.one_of(
    st.datetimes(timezones=st.none() | offsets).map(dt.datetime.isoformat),
    st.sampled_from(["2026-01-02T03:04:05+18:00", "2026-01-02T03:04:05-20:00",
                     "9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+05:00",
                     "1970-01-01T00:00:00+00:01", "2026-01-02T03:04:05+15:59"]),
)
emails = st.builds(lambda local, domain, tld: f"{local}@{domain}.{tld}",
                   st.text(chars, min_size=1, max_size=70), st.text(chars, min_size=1, max_size=60),
                   st.text(chars, min_size=1, max_size=8))
event_types = st.from_regex(EVENT_TYPE_PATTERN, fullmatch=True).filter(lambda t: len(t) <= 100)
envelopes = st.fixed_dictionaries(
    {"event_type": st.integers(0, 4).flatmap(lambda i: texts if i == 0 else event_types),
     "user": emails},
    optional={"occurred_at": occurred, "data": st.dictionaries(texts, json_values, max_size=4)},
)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON types all the way down (1e23 != 10**23 here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


@pytest.fixture(scope="module")
def triggers() -> TriggerCache:
    return TriggerCache(refresh_seconds=3600)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(envelopes, max_size=8))
@example([{"event_type": "test.db_edge", "user": "a" * 64 + "@" + "İ" * 90 + "b" * 96 + ".com"}])
@example([{"event_type": "test.db_edge", "user": "a@b.co", "occurred_at": "2026-01-02T03:04:05+18:00"}])
@example([{"event_type": "test.db_edge", "user": "a@b.co", "data": {"f": 1e23, "i": 10**300}}])
@example([{"event_type": "test.db_edge", "user": "a\ud800@b.co"}])
def test_every_accepted_envelope_is_stored_and_read_back_unchanged(
        engine: Engine, triggers: TriggerCache, raws: list[dict[str, Any]]) -> None:
    accepted = []
    for raw in raws:
        try:
            accepted.append(parse_event(raw))
        except InvalidEvent:
            continue
    with Session(engine) as session:  # rolled back at the end: the database stays clean
        result = ingest(session, [e.to_message() for e in accepted], source="test", triggers=triggers)
        assert (result.accepted, result.rejected) == (len(accepted), 0)
        for zone in ("UTC", "Pacific/Kiritimati", "Etc/GMT+12"):  # +14 and -12: read back anywhere
            session.execute(text(f"SET LOCAL timezone = '{zone}'"))
            rows = {r.event_id: r for r in session.execute(text(
                "SELECT l.event_id, l.event_data, l.occurred_at, u.email FROM lifecycle_events l "
                "JOIN users u ON u.id = l.user_id WHERE l.event_id = ANY(CAST(:ids AS uuid[]))"),
                {"ids": [e.event_id for e in accepted]})}
            for event in accepted:
                row = rows[event.event_id]
                assert _same(row.event_data, event.data), (row.event_data, event.data)
                assert row.occurred_at == event.occurred_at and row.email == event.email
        session.rollback()


@pytest.fixture()
def refusing_engine(fresh_database: str) -> Iterator[Engine]:
    """A migrated database that refuses what no envelope rule knows about (its own CHECKs)."""
    from db.migrate import upgrade

    upgrade(fresh_database)
    eng = create_engine(fresh_database)
    with eng.begin() as conn:
        conn.execute(text("ALTER TABLE users ADD CONSTRAINT no_refused_users "
                          "CHECK (email NOT LIKE 'refused%')"))
        conn.execute(text("ALTER TABLE lifecycle_events ADD CONSTRAINT no_refused_data "
                          "CHECK (event_data->>'refuse' IS NULL)"))
    yield eng
    eng.dispose()


@pytest.mark.parametrize(("bad", "constraint"), [
    ({"user": "refused@example.com"}, "no_refused_users"),  # the users insert
    ({"data": {"refuse": True}}, "no_refused_data"),  # the COPY of the audit rows
])
def test_an_event_the_database_refuses_is_dead_lettered_alone(
        refusing_engine: Engine, bad: dict[str, Any], constraint: str) -> None:
    good = [{"event_id": str(uuid.uuid4()), "event_type": "test.split", "user": f"u{i % 40}@example.com",
             "data": {"i": i}} for i in range(999)]
    refused = {"event_id": str(uuid.uuid4()), "event_type": "test.split",
               "user": "lone@example.com", **bad}
    batch = good[:500] + [refused] + good[500:]
    with Session(refusing_engine) as session, session.begin():
        result = ingest(session, batch, source="test", triggers=TriggerCache())
    assert (result.accepted, result.rejected) == (999, 1)
    with refusing_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM lifecycle_events")).scalar() == 999
        [letter] = conn.execute(text("SELECT event_id, reason, error_type FROM dead_letters")).all()
        # Nothing of the refused event stays: no inbox claim (a replay can still ingest it), no user.
        assert conn.execute(text("SELECT count(*) FROM event_inbox WHERE event_id = :e"),
                            {"e": refused["event_id"]}).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM users WHERE email = :e"),
                            {"e": refused["user"]}).scalar() == 0
    assert str(letter.event_id) == refused["event_id"] and letter.error_type == "CheckViolation"
    assert letter.reason.startswith("refused by the database:") and constraint in letter.reason


def test_one_user_per_email_and_the_cli_finds_it(engine: Engine, triggers: TriggerCache) -> None:
    tag = uuid.uuid4().hex[:8]
    variants = [f"ade\u0301le.{tag}@example.com", f"ad\u00e9le.{tag}@example.com",
                f"AD\u00c9LE.{tag}@EXAMPLE.COM", f"ＡＤÉＬＥ.{tag}@ｅｘａｍｐｌｅ.com"]
    with Session(engine) as session, session.begin():
        result = ingest(session, [{"event_type": "test.variant", "user": v} for v in variants],
                        source="test", triggers=triggers)
    assert result.accepted == 4
    with engine.begin() as conn:
        emails = conn.execute(text("SELECT email FROM users WHERE email LIKE :p"),
                              {"p": f"%.{tag}@%"}).scalars().all()
        assert emails == [f"ad\u00e9le.{tag}@example.com"]
        conn.execute(text("INSERT INTO user_segments (name, conditions, kind) "
                          "VALUES (:n, '{}', 'static')"), {"n": f"variants-{tag}"})
    added = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "segment", "add", f"variants-{tag}", variants[3]],
        cwd=ROOT, env=dict(os.environ, COLUMNS="250"), capture_output=True, text=True, timeout=120)
    assert "added 1 of 1 users" in added.stdout, added.stdout + added.stderr


def test_a_reused_event_id_with_other_content_is_dead_lettered_and_creates_no_user(
        engine: Engine, triggers: TriggerCache) -> None:
    event_id, tag = str(uuid.uuid4()), uuid.uuid4().hex[:8]
    first = {"event_id": event_id, "event_type": "test.reused", "user": f"first-{tag}@example.com"}

    def run(batch: list[dict[str, Any]]) -> tuple[int, int, int]:
        with Session(engine) as session, session.begin():
            result = ingest(session, batch, source="test", triggers=triggers)
        return result.accepted, result.duplicates, result.rejected

    assert run([first]) == (1, 0, 0)
    assert run([{**first, "user": f"second-{tag}@example.com"}]) == (0, 0, 1)  # a later message
    assert run([first, {**first, "data": {"other": 1}}]) == (0, 1, 1)  # both in one message
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM users WHERE email = :e"),
                            {"e": f"second-{tag}@example.com"}).scalar() == 0
        reasons = conn.execute(text("SELECT reason FROM dead_letters WHERE event_id = :e"),
                               {"e": event_id}).scalars().all()
        assert conn.execute(text("SELECT u.email FROM lifecycle_events l JOIN users u "
                                 "ON u.id = l.user_id WHERE l.event_id = :e"),
                            {"e": event_id}).scalars().all() == [first["user"]]
    assert len(reasons) == 2 and all("duplicate event_id with different content" in r
                                     for r in reasons)


def test_the_migration_moves_stored_emails_to_the_normal_form(fresh_database: str) -> None:
    from db.migrate import upgrade

    upgrade(fresh_database, "0009")
    eng = create_engine(fresh_database)
    stored = {"folded": "straße@example.de", "fullwidth": "ａｄａ@example.com",
              "taken": "ade\u0301le@example.com", "owner": "ad\u00e9le@example.com",
              "ascii": "plain@example.com"}
    with eng.begin() as conn:
        for name, email in stored.items():
            conn.execute(text("INSERT INTO users (email, current_lifecycle_stage, attributes) "
                              "VALUES (:e, 'Acquisition', CAST(:a AS jsonb))"),
                         {"e": email, "a": f'{{"name": "{name}"}}'})
    upgrade(fresh_database)
    with eng.connect() as conn:
        emails = dict(conn.execute(text("SELECT attributes->>'name', email FROM users")).all())
    eng.dispose()
    assert emails == {"folded": "strasse@example.de", "fullwidth": "ada@example.com",
                      "taken": "ade\u0301le@example.com",  # its normal form has a user already
                      "owner": "ad\u00e9le@example.com", "ascii": "plain@example.com"}
