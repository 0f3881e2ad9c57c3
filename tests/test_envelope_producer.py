"""The envelope (pure) and the producer's behaviour when the broker is unreachable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import ROOT
from workers.events.envelope import MAX_DATA_BYTES, InvalidEvent, parse_event

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
