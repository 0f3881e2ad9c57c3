"""Property test: the Python and SQL back ends agree on random users, events and conditions."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text

from db.models import User
from workers.rules.conditions import COMPARISONS, ConditionError, parse
from workers.rules.python_backend import EvalContext, compile_python
from workers.rules.sql_backend import compile_sql

pytestmark = pytest.mark.servers

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
KEYS = ["a", "b", "c"]
EVENT_TYPES = ["x.a", "x.b"]
SEGMENTS = ["s1", "s2"]

scalars = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([0.5, -1.25, 2.0, 1e-7]),
    st.sampled_from(["", "a", "ab", "B", "é", "a%", "Ab_"]),
    st.booleans(),
)
timestamps = st.sampled_from([
    (NOW - dt.timedelta(hours=1)).isoformat(), (NOW - dt.timedelta(days=10)).isoformat(),
    "2026-11-21", "2026-11-22T11:00:00Z", "2026-11-22 06:30", "2026-02-31", "2026-11-22T25:00",
])
json_values = st.one_of(
    st.none(), scalars, timestamps, st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(KEYS), scalars, max_size=2),
)
documents = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=3)
fields = st.sampled_from(
    [f"event.data.{k}" for k in KEYS] + [f"user.attributes.{k}" for k in KEYS]
    + ["event.data.a.b", "user.attributes.a.c", "user.email", "user.stage", "event.type",
       "user.created_at"]
)
values = st.one_of(
    scalars, timestamps, st.sampled_from(["1h", "2d", "30d"]),
    st.lists(scalars, min_size=1, max_size=3),
    st.sampled_from(["u0@example.com", "Activation", "Revenue", "x.a", "u"]),
)


@st.composite
def comparisons(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(COMPARISONS))
    leaf: dict[str, Any] = {"field": draw(fields), "op": op}
    if op != "exists":
        leaf["value"] = draw(values)
    return leaf


leaves = st.one_of(
    comparisons(), comparisons(), comparisons(),
    st.builds(lambda s: {"in_segment": s}, st.sampled_from(SEGMENTS)),
    st.builds(lambda t, n, w: {"performed": {"event_type": t, "at_least": n,
                                             **({"within": w} if w else {})}},
              st.sampled_from(EVENT_TYPES), st.integers(1, 3), st.sampled_from([None, "1d", "7d"])),
)
conditions = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(lambda c: {"all": c}, st.lists(inner, max_size=3)),
        st.builds(lambda c: {"any": c}, st.lists(inner, max_size=3)),
        st.builds(lambda c: {"not": c}, inner),
    ),
    max_leaves=6,
)


@st.composite
def populations(draw: st.DrawFn) -> list[dict[str, Any]]:
    people = []
    for i in range(draw(st.integers(1, 6))):
        people.append({
            "id": uuid.uuid4(),
            "email": f"u{i}@example.com",
            "stage": draw(st.sampled_from(["Acquisition", "Activation", "Revenue"])),
            "attributes": draw(documents),
            "created_at": NOW - dt.timedelta(hours=draw(st.integers(0, 24 * 40))),
            "segments": {s: draw(st.sampled_from(["member", "expired", "none", "forever"]))
                         for s in SEGMENTS},
            "events": [(draw(st.sampled_from(EVENT_TYPES)), draw(st.integers(0, 24 * 10)))
                       for _ in range(draw(st.integers(0, 4)))],
        })
    return people


def _python(condition: Any, person: dict[str, Any], etype: str, data: dict[str, Any]) -> bool:
    def member(ref: str) -> bool:
        return person["segments"].get(ref) in ("member", "forever")

    def count(event_type: str, within: dt.timedelta | None) -> int:
        return sum(1 for t, hours in person["events"] if t == event_type and (
            within is None or NOW - dt.timedelta(hours=hours) >= NOW - within))

    context = EvalContext(
        event_type=etype, event_data=data, user_id=person["id"], user_email=person["email"],
        user_stage=person["stage"], user_attributes=person["attributes"],
        user_created_at=person["created_at"], now=NOW, is_member=member, count_events=count)
    return compile_python(condition)(context)


def _insert(conn: Any, people: list[dict[str, Any]]) -> None:
    segment_ids = {}
    for name in SEGMENTS:
        segment_ids[name] = conn.execute(text(
            "INSERT INTO user_segments (name, conditions) VALUES (:n, '{}') RETURNING id"
        ), {"n": name}).scalar_one()
    for p in people:
        conn.execute(text(
            "INSERT INTO users (id, email, current_lifecycle_stage, attributes, created_at) "
            "VALUES (:id, :email, :stage, CAST(:attrs AS jsonb), :created)"
        ), {"id": p["id"], "email": p["email"], "stage": p["stage"],
            "attrs": json.dumps(p["attributes"]), "created": p["created_at"]})
        for name, state in p["segments"].items():
            if state == "none":
                continue
            until = {"member": NOW + dt.timedelta(hours=1), "expired": NOW - dt.timedelta(hours=1),
                     "forever": None}[state]
            conn.execute(text("INSERT INTO user_segment_memberships (user_id, segment_id, "
                              "valid_until) VALUES (:u, :s, :v)"),
                         {"u": p["id"], "s": segment_ids[name], "v": until})
        for etype, hours in p["events"]:
            conn.execute(text("INSERT INTO lifecycle_events (event_type, user_id, created_at) "
                              "VALUES (:t, :u, :c)"),
                         {"t": etype, "u": p["id"], "c": NOW - dt.timedelta(hours=hours)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=conditions, people=populations(), etype=st.sampled_from(EVENT_TYPES),
       data=documents)
def test_python_and_sql_agree(engine: Engine, raw: Any, people: list[dict[str, Any]],
                              etype: str, data: dict[str, Any]) -> None:
    try:
        condition = parse(raw)
    except ConditionError:
        assume(False)
        return
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            conn.execute(text("SET LOCAL TimeZone = 'Pacific/Auckland'"))  # must not matter
            _insert(conn, people)
            expr = compile_sql(condition, now=NOW, event_type=etype, event_data=data)
            in_sql = set(conn.execute(select(User.id).where(
                User.id.in_([p["id"] for p in people]), expr)).scalars())
        finally:
            trans.rollback()
    in_python = {p["id"] for p in people if _python(condition, p, etype, data)}
    assert in_sql == in_python, (raw, data)
