"""The envelope (pure) and the producer's behaviour when the broker is unreachable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import ROOT
from workers.events.envelope import (
    MAX_DATA_BYTES,
    InvalidEvent,
    build_event,
    normalise_email,
    parse_event,
    with_event_id,
    with_message_ids,
)

GOOD = {"event_type": "user.signed_up", "user": "Ada@Example.com", "data": {"plan": "pro"}}


def test_defaults_and_normalisation() -> None:
    event = parse_event(GOOD)
    assert event.user == "ada@example.com" and event.email == "ada@example.com"
    assert event.user_id is None
    assert event.occurred_at.tzinfo is not None
    naive = parse_event({**GOOD, "occurred_at": "2026-01-02T03:04:05"})
    assert naive.occurred_at.utcoffset().total_seconds() == 0
    assert parse_event(event.to_message()) == event  # the message form round-trips


@pytest.mark.parametrize(("raw", "fragment"), [
    ({**GOOD, "event_type": "x" * 101}, "event_type"),
    ({**GOOD, "event_type": "UserSignedUp"}, "lowercase dotted"),
    ({**GOOD, "user": 42}, "user"),
    ({**GOOD, "data": [1, 2]}, "data"),
    ({**GOOD, "data": {"k": "x" * MAX_DATA_BYTES}}, "larger than"),
    ({**GOOD, "data": {"k": "a\x00b"}}, "NUL"),
    ({**GOOD, "data": {"k": "\ud800"}}, "surrogates"),
    ({**GOOD, "event_id": "123"}, "event_id"),
    ({**GOOD, "other": 1}, "other"),
    ("[1, 2", "malformed JSON"),
    ("[" * 100_000, "malformed JSON"),
    (b"\xff\xfe", "malformed JSON"),
])
def test_bad_envelopes_say_why(raw: Any, fragment: str) -> None:
    with pytest.raises(InvalidEvent, match=fragment):
        parse_event(raw)


# 255 characters that grow past users.email's varchar(255) when case-folded ('İ' = 'i' + U+0307).
GROWING_EMAIL = "a" * 64 + "@" + "İ" * 90 + "b" * 96 + ".com"


@pytest.mark.parametrize(("raw", "fragment"), [
    ({**GOOD, "occurred_at": "2026-01-02T03:04:05+18:00"}, "UTC offset"),
    ({**GOOD, "occurred_at": "2026-01-02T03:04:05-20:00"}, "UTC offset"),
    ({**GOOD, "occurred_at": "2026-01-02T03:04:05+16:00"}, "UTC offset"),
    ({**GOOD, "occurred_at": "9999-12-31T23:00:00-05:00"}, "1970-01-01 to 9998-12-31"),  # 10000 UTC
    ({**GOOD, "occurred_at": "0001-01-01T00:00:00+05:00"}, "1970-01-01 to 9998-12-31"),  # 1 BC UTC
    ({**GOOD, "occurred_at": "1969-12-31T23:59:59Z"}, "1970-01-01 to 9998-12-31"),
    ({**GOOD, "user": GROWING_EMAIL}, "longer than 255 characters once normalised"),
    ({**GOOD, "user": "ada\ud800@example.com"}, "surrogates"),
    ({**GOOD, "user": "a\x00@example.com"}, "NUL"),
    ({**GOOD, "user": "ada＠evil.com@example.com"}, "email"),  # '＠' is '@' once normalised
    ({**GOOD, "event_type": "user.signed_up\n"}, "lowercase dotted"),
    ({**GOOD, "data": {"big": 1e23}}, "stored as a different number"),
    ({**GOOD, "data": {"k": [{"n": -1.5e300}]}}, "stored as a different number"),
])
def test_values_postgresql_refuses_or_changes_are_refused(raw: Any, fragment: str) -> None:
    with pytest.raises(InvalidEvent, match=fragment):
        parse_event(raw)


@pytest.mark.parametrize(("data", "fragment"), [
    ({"k": {1: "one"}}, "not a string"),  # jsonb would give the key back as "1"
    ({"k": {1, 2}}, "not JSON"),
    ({"k": float("nan")}, "not JSON"),
])
def test_python_values_json_cannot_carry_are_refused(data: Any, fragment: str) -> None:
    with pytest.raises(InvalidEvent, match=fragment):
        build_event("user.signed_up", user="ada@example.com", data=data)


@pytest.mark.parametrize("raw", [
    {**GOOD, "occurred_at": "2026-01-02T03:04:05+15:59"},
    {**GOOD, "occurred_at": "1970-01-01T00:00:00Z"},
    {**GOOD, "occurred_at": "9998-12-31T23:59:59.999999Z"},
    {**GOOD, "data": {"near": 9.999999999999998e15, "tiny": 5e-324, "text": "a\\u0000b"}},
])
def test_values_at_the_edges_are_accepted(raw: Any) -> None:
    parse_event(raw)


@pytest.mark.parametrize("variant", [
    "ADA.LOVELACE@EXAMPLE.COM", "ａｄａ.ｌｏｖｅｌａｃｅ@ｅｘａｍｐｌｅ.ｃｏｍ", " Ada.Lovelace@Example.com ",
])
def test_email_variants_are_one_address(variant: str) -> None:
    assert parse_event({**GOOD, "user": variant}).user == "ada.lovelace@example.com"


def test_unicode_variants_of_an_email_are_one_address() -> None:
    forms = ["ade\u0301le@example.com", "ad\u00e9le@example.com", "AD\u00c9LE@EXAMPLE.COM",
             "ＡＤÉＬＥ@example.com"]
    assert {parse_event({**GOOD, "user": f}).user for f in forms} == {"ad\u00e9le@example.com"}
    assert parse_event({**GOOD, "user": "STRASSE@example.de"}).user == \
        parse_event({**GOOD, "user": "straße@example.de"}).user


@settings(max_examples=500)
@given(st.text())
def test_email_normalisation_is_a_fixed_point(value: str) -> None:
    once = normalise_email(value)
    assert normalise_email(once) == once


def test_ids_derived_from_the_message_repeat_with_the_message() -> None:
    raws = [{"event_type": "a.b", "user": "ada@example.com"}, '{"event_type": "a.c"}',
            {"event_id": "4c1e3b1e-5d39-4a7b-8e36-3f4f5b6d7e80", "event_type": "a.d"}, "{bad", 42]
    first, again = with_message_ids(raws, "task-1"), with_message_ids(raws, "task-1")
    assert first == again
    assert first[0]["event_id"] != first[1]["event_id"]  # the index is part of the id
    assert with_message_ids(raws, "task-2")[0]["event_id"] != first[0]["event_id"]
    assert first[2] == raws[2] and first[3:] == ["{bad", 42]  # kept, and kept as they came
    assert with_message_ids(raws, None) == raws


def test_the_content_hash_ignores_the_timestamp_and_key_order() -> None:
    one = parse_event({**GOOD, "data": {"a": 1, "b": 2}, "occurred_at": "2026-01-01T00:00:00Z"})
    same = parse_event({**GOOD, "data": {"b": 2, "a": 1}})
    other = parse_event({**GOOD, "data": {"a": 1, "b": 3}})
    assert one.content_hash == same.content_hash != other.content_hash


def test_an_id_is_added_only_where_an_object_has_none() -> None:
    new = uuid.uuid4()
    assert with_event_id('{"event_type": "a.b"}', new) == {"event_type": "a.b", "event_id": str(new)}
    assert with_event_id({"event_id": "kept"}, new) == {"event_id": "kept"}
    assert with_event_id("[1]", new) == "[1]" and with_event_id(b"\xff", new) == b"\xff"


def test_deep_nesting_is_refused() -> None:
    data: Any = "leaf"
    for _ in range(50):
        data = {"k": data}
    with pytest.raises(InvalidEvent, match="nested deeper"):
        parse_event({**GOOD, "data": data})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["event_id", "event_type", "user", "occurred_at", "data",
                                        "junk"]), json_values) | json_values | st.binary())
def test_any_input_is_accepted_or_refused_with_invalid_event(raw: Any) -> None:
    try:
        parse_event(raw)
    except InvalidEvent:
        pass


def test_publish_fails_loudly_when_the_broker_is_unreachable() -> None:
    env = dict(os.environ, CELERY_BROKER_URL="redis://127.0.0.1:1/0", FLEET_BROKER_KEY_PREFIX="")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", "from workers.producer import send_event; "
         "send_event('user.signed_up', user='ada@example.com')"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "PublishError: could not publish events.ingest" in result.stderr
    assert time.monotonic() - started < 60
