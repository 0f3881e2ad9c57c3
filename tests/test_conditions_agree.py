"""The Python and SQL back ends agree, whichever way a value reached them.

A value is seen three ways: by the Python back end as the worker parsed it from
the message (`json.loads`, what kombu does), by the Python back end as it comes
back from `users.attributes` (jsonb, which rewrites numbers: `1e23` is stored as
100000000000000000000000), and by the SQL back end reading the jsonb. All three
must give the same answer. Documents are generated as JSON text so that numbers
keep their spelling (`1e23`, `-0.0`, `1e-400`) until each path parses them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text
from sqlalchemy.dialects import postgresql

from db.models import User
from db.session import session_scope
from workers.rules.conditions import COMPARISONS, ConditionError, parse, parse_timestamp
from workers.rules.python_backend import EvalContext, compile_python
from workers.rules.segments import refresh_segment
from workers.rules.sql_backend import compile_sql

pytestmark = pytest.mark.servers

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
KEYS = ["a", "b"]
EVENT_TYPES = ["x.a", "x.b"]
SEGMENTS = ["s1", "s2"]
DBL_MAX_EDGE = 2**1024 - 2**970  # the smallest integer that rounds past the largest double


class Num(str):
    """A JSON number written verbatim (its spelling matters to the parsers)."""


def dump(value: Any) -> str:
    """JSON text of a tree whose numbers are `Num` spellings."""
    if isinstance(value, Num):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


EDGE_NUMBERS = [
    "0", "-0", "-0.0", "1", "1.0", "2", "-3", "0.5", "0.1", "0.10000000000000001", "1E2", "1e+2",
    "1e23", "100000000000000000000000", "100000000000000000000001", "99999999999999999999999",
    "99999999999999991611392",
    "1e308", "-1e308", "1.7976931348623157e308", str(DBL_MAX_EDGE - 1), str(DBL_MAX_EDGE),
    "1e400", "-1e400", "5e-324", "2.4703282292062328e-324", "2.4703282292062327e-324", "1e-400",
    "-1e-400", "9007199254740992", "9007199254740993",
]
numbers = st.one_of(
    st.sampled_from(EDGE_NUMBERS), st.sampled_from(EDGE_NUMBERS), st.sampled_from(EDGE_NUMBERS),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-(2**80), 2**80).map(str),
    st.builds(lambda m, e: f"{m}e{e}", st.integers(-99, 99), st.integers(-330, 330)),
)

EDGE_STRINGS = [
    "", "a", "ab", "B", "b", "é", "e\u0301", "É", "ß", "SS", "ss", "İ", "i\u0307", "ı", "a%",
    "Ab_", "10", "1e23", "true", "null", "\U0001f600", "\uffff", "ａ", " a", "a\n",
]
strings = st.one_of(
    st.sampled_from(EDGE_STRINGS), st.sampled_from(EDGE_STRINGS),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            max_size=3),
)

EDGE_TIMESTAMPS = [
    "2026-11-22", "2026-11-21", "2026-11-22T11:00:00Z", "2026-11-22 06:30", "2026-11-22T24:00",
    "2026-11-21T24:00:00", "2026-12-31T23:59:60", "2026-11-22T10:00+15:59",
    "2026-11-22T10:00-15:59", "2026-11-22T10:00+16:00", "2026-11-22T10:00+20:00",
    "2026-11-22T10:00-20:00", "2026-11-22T10:00+05:75", "2026-11-22\n", "２０２６-11-22",
    "2026-02-29", "2024-02-29", "0000-01-01", "9999-12-31T23:00-05:00", "2026-11-22t10:00",
    "2026-11-22T10:00z", "2026-11-22T11:00:00.1234567Z", "2026-11-22T00:00:00.000001+00:00",
    (NOW - dt.timedelta(hours=1)).isoformat(), (NOW - dt.timedelta(days=10)).isoformat(),
]


@st.composite
def timestamp_parts(draw: st.DrawFn) -> str:
    """ISO-8601-like strings from parts, near NOW or out of range on purpose."""
    two = "{:02d}".format
    date = "-".join([draw(st.sampled_from(["2026", "2026", "2025", "0001", "9999", "0000"])),
                     two(draw(st.one_of(st.just(11), st.integers(0, 13)))),
                     two(draw(st.one_of(st.integers(18, 23), st.integers(0, 32))))])
    if draw(st.booleans()):
        return date
    clock = two(draw(st.one_of(st.integers(0, 23), st.integers(0, 25)))) + ":" + two(
        draw(st.one_of(st.integers(0, 59), st.integers(0, 61))))
    if draw(st.booleans()):
        clock += ":" + two(draw(st.one_of(st.integers(0, 59), st.integers(0, 61))))
        if draw(st.booleans()):
            clock += "." + draw(st.text("0123456789", min_size=1, max_size=7))
    zone = draw(st.one_of(
        st.sampled_from(["", "", "Z", "z"]),
        st.builds(lambda s, h, m: f"{s}{two(h)}:{two(m)}", st.sampled_from("+-"),
                  st.one_of(st.integers(0, 15), st.integers(0, 24)),
                  st.one_of(st.integers(0, 59), st.integers(0, 75))),
    ))
    return date + draw(st.sampled_from(["T", "T", " ", "t"])) + clock + zone


timestamps = st.one_of(st.sampled_from(EDGE_TIMESTAMPS), st.sampled_from(EDGE_TIMESTAMPS),
                       timestamp_parts())


scalars = st.one_of(numbers.map(Num), strings, st.booleans(), timestamps)


def _in_double_range(value: Any) -> bool:
    """Numbers a condition may hold (parse refuses the rest); `1e400` loads as inf."""
    return not isinstance(value, Num) or abs(json.loads(value)) < DBL_MAX_EDGE


def _as_condition(value: Any) -> Any:
    return json.loads(value) if isinstance(value, Num) else value


@dataclass(frozen=True)
class Pools:
    """The scalars one example draws from. Documents and conditions share a few values, so
    equal values meet (independent random values almost never coincide)."""

    document: st.SearchStrategy[Any]
    event: st.SearchStrategy[Any]
    condition: st.SearchStrategy[Any]


@st.composite
def pools(draw: st.DrawFn) -> Pools:
    shared = draw(st.lists(scalars, min_size=1, max_size=4))
    own = st.one_of(st.sampled_from(shared), st.sampled_from(shared), st.sampled_from(shared),
                    scalars)
    return Pools(
        document=own,
        event=own.filter(lambda v: not isinstance(v, Num) or math.isfinite(float(v))),
        condition=own.filter(_in_double_range).map(_as_condition),
    )


def documents(scalar: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    values = st.one_of(  # simplest first: hypothesis leans towards the first branch
        scalar, scalar, scalar, st.lists(scalar, min_size=1, max_size=3),
        st.dictionaries(st.sampled_from([*KEYS, "1"]), scalar, min_size=1, max_size=2), st.none(),
    )
    return st.fixed_dictionaries({k: values for k in KEYS})


json_fields = st.sampled_from(
    [f"{root}.{k}" for root in ("event.data", "user.attributes") for k in KEYS]
    + ["event.data.a.1", "user.attributes.a.b", "user.attributes.a.1"])
column_strings = st.sampled_from(["user.email", "user.stage", "event.type", "user.id"])
column_values = st.one_of(strings, st.sampled_from(
    ["u0@example.com", "u", "@example.com", "Activation", "Revenue", "x.a", "x."]))
durations = st.sampled_from(["1h", "12h", "2d", "30d", "3660d"])
TIME_OPS = ("within_last", "older_than")


@st.composite
def comparisons(draw: st.DrawFn, pool: Pools) -> dict[str, Any]:
    """Valid leaves (parse errors are tested in test_conditions.py): a value of the kind the
    field and operator take."""
    kind = draw(st.sampled_from(["json", "json", "json", "json", "column", "created_at"]))
    if kind == "created_at":
        op = draw(st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte", "exists", *TIME_OPS]))
        leaf: dict[str, Any] = {"field": "user.created_at", "op": op}
        if op != "exists":
            leaf["value"] = draw(durations if op in TIME_OPS else timestamps.filter(
                lambda t: parse_timestamp(t) is not None))
        return leaf
    ops = [op for op in COMPARISONS if kind == "json" or op not in TIME_OPS]
    op = draw(st.sampled_from(ops))
    leaf = {"field": draw(json_fields if kind == "json" else column_strings), "op": op}
    scalar = pool.condition if kind == "json" else column_values
    if op in TIME_OPS:
        leaf["value"] = draw(durations)
    elif op in ("in", "not_in"):
        leaf["value"] = draw(st.lists(scalar, min_size=1, max_size=4))
    elif op == "starts_with":
        leaf["value"] = draw(scalar.filter(lambda v: isinstance(v, str)) | strings)
    elif op in ("gt", "gte", "lt", "lte"):
        leaf["value"] = draw(scalar.filter(lambda v: not isinstance(v, bool)) | strings)
    elif op != "exists":
        leaf["value"] = draw(scalar)
    return leaf


def conditions(pool: Pools) -> st.SearchStrategy[Any]:
    leaf = comparisons(pool)
    leaves = st.one_of(
        leaf, leaf, leaf, leaf, leaf, leaf,
        st.builds(lambda s: {"in_segment": s}, st.sampled_from(SEGMENTS)),
        st.builds(lambda t, n, w: {"performed": {"event_type": t, "at_least": n,
                                                 **({"within": w} if w else {})}},
                  st.sampled_from(EVENT_TYPES), st.integers(1, 3),
                  st.sampled_from([None, "1d", "7d"])),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.builds(lambda c: {"all": c}, st.lists(inner, min_size=1, max_size=3)),
            st.builds(lambda c: {"any": c}, st.lists(inner, max_size=3)),
            st.builds(lambda c: {"not": c}, inner),
        ),
        max_leaves=6,
    )


@st.composite
def populations(draw: st.DrawFn, pool: Pools) -> list[dict[str, Any]]:
    people = []
    for i in range(6):
        people.append({
            "id": uuid.uuid4(),
            "email": f"u{i}@example.com",
            "stage": draw(st.sampled_from(["Acquisition", "Activation", "Revenue"])),
            "attributes": dump(draw(documents(pool.document))),
            "created_at": NOW - dt.timedelta(seconds=draw(st.integers(0, 86400 * 40))),
            "segments": {s: draw(st.sampled_from(["member", "expired", "none", "forever"]))
                         for s in SEGMENTS},
            "events": [(draw(st.sampled_from(EVENT_TYPES)), draw(st.integers(0, 24 * 10)))
                       for _ in range(draw(st.integers(0, 4)))],
        })
    return people


@st.composite
def scenarios(draw: st.DrawFn, single: bool) -> tuple[Any, list[dict[str, Any]], str,
                                                      dict[str, Any]]:
    """A condition (or `single` comparison), users, and an event as the worker parsed it."""
    pool = draw(pools())
    raw = draw(comparisons(pool) if single else conditions(pool))
    data = json.loads(dump(draw(documents(pool.event))))
    return raw, draw(populations(pool)), draw(st.sampled_from(EVENT_TYPES)), data


def _context(person: dict[str, Any], attributes: dict[str, Any], etype: str,
             data: dict[str, Any]) -> EvalContext:
    def member(ref: str) -> bool:
        return person["segments"].get(ref) in ("member", "forever")

    def count(event_type: str, within: dt.timedelta | None) -> int:
        return sum(1 for t, hours in person["events"] if t == event_type and (
            within is None or NOW - dt.timedelta(hours=hours) >= NOW - within))

    return EvalContext(
        event_type=etype, event_data=data, user_id=person["id"], user_email=person["email"],
        user_stage=person["stage"], user_attributes=attributes,
        user_created_at=person["created_at"], now=NOW, is_member=member, count_events=count)


def _insert(conn: Any, people: list[dict[str, Any]]) -> None:
    segment_ids = {name: conn.execute(text(
        "INSERT INTO user_segments (name, conditions) VALUES (:n, '{}') RETURNING id"
    ), {"n": name}).scalar_one() for name in SEGMENTS}
    conn.execute(text(
        "INSERT INTO users (id, email, current_lifecycle_stage, attributes, created_at) "
        "VALUES (:id, :email, :stage, CAST(:attrs AS jsonb), :created)"
    ), [{"id": p["id"], "email": p["email"], "stage": p["stage"], "attrs": p["attributes"],
         "created": p["created_at"]} for p in people])
    until = {"member": NOW + dt.timedelta(hours=1), "expired": NOW - dt.timedelta(hours=1),
             "forever": None}
    memberships = [{"u": p["id"], "s": segment_ids[name], "v": until[state]}
                   for p in people for name, state in p["segments"].items() if state != "none"]
    if memberships:
        conn.execute(text("INSERT INTO user_segment_memberships (user_id, segment_id, "
                          "valid_until) VALUES (:u, :s, :v)"), memberships)
    events = [{"t": etype, "u": p["id"], "c": NOW - dt.timedelta(hours=hours)}
              for p in people for etype, hours in p["events"]]
    if events:
        conn.execute(text("INSERT INTO lifecycle_events (event_type, user_id, created_at) "
                          "VALUES (:t, :u, :c)"), events)


def _evaluate(engine: Engine, raw: Any, people: list[dict[str, Any]], etype: str,
              data: dict[str, Any]) -> tuple[set[uuid.UUID], set[uuid.UUID], set[uuid.UUID]]:
    """Members by SQL, by Python on the message's values, by Python on the stored values."""
    condition = parse(raw)
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            conn.execute(text("SET LOCAL TimeZone = 'Pacific/Auckland'"))  # must not matter
            _insert(conn, people)
            ids = [p["id"] for p in people]
            stored = dict(conn.execute(select(User.id, User.attributes).where(User.id.in_(ids))).all())
            expr = compile_sql(condition, now=NOW, event_type=etype, event_data=data)
            in_sql = set(conn.execute(select(User.id).where(User.id.in_(ids), expr)).scalars())
        finally:
            trans.rollback()
    predicate = compile_python(condition)
    from_message = {p["id"] for p in people
                    if predicate(_context(p, json.loads(p["attributes"]), etype, data))}
    from_database = {p["id"] for p in people
                     if predicate(_context(p, stored[p["id"]], etype, data))}
    return in_sql, from_message, from_database


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(single=False))
def test_python_and_sql_agree(engine: Engine, scenario: tuple[Any, Any, str, Any]) -> None:
    raw, people, etype, data = scenario
    try:
        parse(raw)
    except ConditionError:
        assume(False)
    in_sql, from_message, from_database = _evaluate(engine, raw, people, etype, data)
    assert in_sql == from_message == from_database, (raw, data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(single=True))
def test_single_comparisons_agree(engine: Engine, scenario: tuple[Any, Any, str, Any]) -> None:
    """Where disagreements live: one comparison, many documents, no logic to mask it."""
    leaf, people, etype, data = scenario
    in_sql, from_message, from_database = _evaluate(engine, leaf, people, etype, data)
    assert in_sql == from_message == from_database, (leaf, data)


EDGE_DOCUMENT_VALUES: list[Any] = [
    *map(Num, EDGE_NUMBERS), *EDGE_STRINGS, *EDGE_TIMESTAMPS, True, False, None,
    [Num("1e23"), "é", True], [[Num("1")]], {"1": Num("20")},
]
EDGE_CONDITION_VALUES: list[Any] = [
    *(_as_condition(n) for n in map(Num, EDGE_NUMBERS) if _in_double_range(n)),
    *EDGE_STRINGS, *EDGE_TIMESTAMPS, True, False,
]


def test_every_edge_value_against_every_edge_document(engine: Engine) -> None:
    """Each operator with each edge value, against a user holding each edge value."""
    people = [{"id": uuid.uuid4(), "email": f"e{i}@example.com", "stage": "Activation",
               "attributes": dump({"a": value, "b": [value]}), "created_at": NOW,
               "segments": {}, "events": []} for i, value in enumerate(EDGE_DOCUMENT_VALUES)]
    leaves = [{"field": "user.attributes.a", "op": op, "value": value}
              for op in ("eq", "ne", "gt", "gte", "lt", "lte", "contains", "starts_with")
              for value in EDGE_CONDITION_VALUES]
    leaves += [{"field": "user.attributes.b", "op": "contains", "value": value}
               for value in EDGE_CONDITION_VALUES]
    leaves += [{"field": "user.attributes.a", "op": op, "value": [value, "x"]}
               for op in ("in", "not_in") for value in EDGE_CONDITION_VALUES]
    leaves += [{"field": f"user.attributes.{key}", "op": op, "value": duration}
               for op in TIME_OPS for key in ("a", "a.1") for duration in ("12h", "3660d")]
    leaves += [{"field": f"user.attributes.{key}", "op": "exists"} for key in ("a", "a.1", "a.0")]
    valid = []
    for leaf in leaves:
        try:
            valid.append((leaf, parse(leaf)))
        except ConditionError:
            continue
    disagreements = []
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            _insert(conn, people)
            ids = [p["id"] for p in people]
            stored = dict(conn.execute(select(User.id, User.attributes).where(User.id.in_(ids))).all())
            in_sql: dict[uuid.UUID, tuple[bool, ...]] = {p["id"]: () for p in people}
            for start in range(0, len(valid), 100):  # a hundred conditions per statement
                chunk = [compile_sql(node, now=NOW) for _, node in valid[start:start + 100]]
                for row in conn.execute(select(User.id, *chunk).where(User.id.in_(ids))):
                    in_sql[row[0]] += tuple(row[1:])
        finally:
            trans.rollback()
    messages = [_context(p, json.loads(p["attributes"]), "x.a", {}) for p in people]
    stores = [_context(p, stored[p["id"]], "x.a", {}) for p in people]
    for i, (leaf, node) in enumerate(valid):
        predicate = compile_python(node)
        for p, message, store in zip(people, messages, stores, strict=True):
            answers = (in_sql[p["id"]][i], predicate(message), predicate(store))
            if len(set(answers)) > 1:
                disagreements.append((leaf, p["attributes"], answers))
    assert not disagreements, (len(disagreements), disagreements[:20])


def _is_timestamp(field: str) -> dict[str, Any]:
    return {"any": [{"field": field, "op": "within_last", "value": "3660d"},
                    {"field": field, "op": "older_than", "value": "3660d"}]}


def _leaf(op: str, value: Any = None, field: str = "$.n") -> dict[str, Any]:
    return {"field": field, "op": op} | ({} if op == "exists" else {"value": value})


# (condition with `$` for the JSON root, the document as JSON text, the agreed answer)
EDGE_CASES: list[tuple[dict[str, Any], str, bool]] = [
    # timestamps: both back ends' parsers must accept a string for it to be one
    *[(_is_timestamp("$.t"), json.dumps({"t": t}), ok) for t, ok in [
        ("2026-11-22T24:00", False), ("2026-11-21T24:00:00", False),
        ("2026-12-31T23:59:60", False), ("2026-11-22T10:00+15:59", True),
        ("2026-11-22T10:00-15:59", True), ("2026-11-22T10:00+16:00", False),
        ("2026-11-22T10:00+20:00", False), ("2026-11-22T10:00-20:00", False),
        ("2026-11-22T10:00+05:75", False), ("2026-11-22", True), ("2026-11-22T10:30", True),
        ("2026-11-22 10:30:00.5", True), ("2026-11-22\n", False), ("２０２６-11-22", False),
        ("2026-02-29", False), ("2024-02-29", True), ("0000-01-01", False),
        ("9999-12-31T23:00-05:00", True), ("2026-11-22t10:00", False),
        ("2026-11-22T10:00z", False), ("2026-11-22T10:00:00.1234567", False),
        ("2026-11-22T10:00:00.123456", True), ("yesterday", False),
    ]],
    (_is_timestamp("$.t"), '{"t": 1700000000}', False),
    (_is_timestamp("$.t"), '{"t": null}', False),
    # a date is midnight UTC; no offset means UTC; within_last includes its boundary
    (_leaf("within_last", "12h", "$.t"), '{"t": "2026-11-22"}', True),
    (_leaf("older_than", "12h", "$.t"), '{"t": "2026-11-22"}', False),
    (_leaf("within_last", "12h", "$.t"), '{"t": "2026-11-22T01:00+01:00"}', True),
    (_leaf("within_last", "12h", "$.t"), '{"t": "2026-11-21T23:59:59.999999"}', False),
    (_leaf("within_last", "12h", "$.t"), '{"t": "2026-11-22T00:00:00-00:01"}', True),
    (_leaf("within_last", "12h", "$.t"), '{"t": "2026-11-22T00:00:00+00:01"}', False),
    # numbers are compared as IEEE-754 doubles, whatever their spelling
    (_leaf("eq", 1e23), '{"n": 1e23}', True),
    (_leaf("eq", 1e23), '{"n": 100000000000000000000000}', True),
    (_leaf("eq", 1e23), '{"n": 99999999999999999999999}', True),
    (_leaf("eq", 1e23), '{"n": 100000000000000000000001}', False),  # the next double up
    (_leaf("gt", 99999999999999991611392), '{"n": 1e23}', False),
    (_leaf("gte", 99999999999999991611392), '{"n": 1e23}', True),
    (_leaf("eq", 1e308), '{"n": 1e308}', True),
    (_leaf("lt", 1.7976931348623157e308), '{"n": 1e308}', True),
    (_leaf("eq", 1.7976931348623157e308), f'{{"n": {DBL_MAX_EDGE - 1}}}', True),
    (_leaf("gt", 0), f'{{"n": {DBL_MAX_EDGE}}}', False),
    (_leaf("gt", 0), '{"n": 1e400}', False),
    (_leaf("lt", 0), '{"n": -1e400}', False),
    (_leaf("ne", 1), '{"n": 1e400}', False),
    (_leaf("not_in", [1]), '{"n": 1e400}', False),
    (_leaf("exists"), '{"n": 1e400}', True),
    (_leaf("eq", 0), '{"n": 1e-400}', True),
    (_leaf("gt", 0), '{"n": 1e-400}', False),
    (_leaf("gt", 0), '{"n": 5e-324}', True),
    (_leaf("gt", 0), '{"n": 2.4703282292062328e-324}', True),
    (_leaf("gt", 0), '{"n": 2.4703282292062327e-324}', False),
    (_leaf("eq", 0), '{"n": -0.0}', True),
    (_leaf("eq", -0.0), '{"n": 0}', True),
    (_leaf("lt", 0), '{"n": -0.0}', False),
    (_leaf("eq", 1.0), '{"n": 1}', True),
    (_leaf("eq", 1), '{"n": 1.0}', True),
    (_leaf("in", [1.0, "x"]), '{"n": 1}', True),
    (_leaf("eq", 0.1), '{"n": 0.10000000000000001}', True),
    (_leaf("eq", 9007199254740992), '{"n": 9007199254740993}', True),
    (_leaf("in", [1e23]), '{"n": 99999999999999999999999}', True),
    (_leaf("not_in", [2, 3]), '{"n": 1e23}', True),
    # no coercion between JSON types
    (_leaf("eq", 10), '{"n": "10"}', False),
    (_leaf("eq", "10"), '{"n": 10}', False),
    (_leaf("eq", 1), '{"n": true}', False),
    (_leaf("eq", True), '{"n": 1}', False),
    (_leaf("in", [True]), '{"n": 1}', False),
    (_leaf("in", [1]), '{"n": true}', False),
    (_leaf("not_in", [1]), '{"n": true}', True),
    (_leaf("gt", 1), '{"n": "b"}', False),
    (_leaf("eq", 1), '{"n": [1]}', False),
    (_leaf("in", [1]), '{"n": [1]}', False),
    (_leaf("gt", 0), '{"n": {"x": 1}}', False),
    # contains: string in string, or a typed element of an array
    (_leaf("contains", 1e23, "$.a"), '{"a": [99999999999999999999999]}', True),
    (_leaf("contains", 1.0, "$.a"), '{"a": [1, "x", true]}', True),
    (_leaf("contains", "x", "$.a"), '{"a": [1, "x", true]}', True),
    (_leaf("contains", True, "$.a"), '{"a": [1, "x", true]}', True),
    (_leaf("contains", "1", "$.a"), '{"a": [1, "x", true]}', False),
    (_leaf("contains", 1, "$.a"), '{"a": [[1], {"x": 1}, "1"]}', False),
    (_leaf("contains", 0, "$.a"), '{"a": [1e-400]}', True),
    (_leaf("contains", 1, "$.a"), '{"a": [1e400]}', False),
    # unicode: code points, no normalisation, no case folding
    (_leaf("eq", "e\u0301"), '{"n": "é"}', False),
    (_leaf("eq", "é"), '{"n": "é"}', True),
    (_leaf("eq", "É"), '{"n": "é"}', False),
    (_leaf("eq", "SS"), '{"n": "ß"}', False),
    (_leaf("eq", "i\u0307"), '{"n": "İ"}', False),
    (_leaf("starts_with", "e"), '{"n": "é"}', False),
    (_leaf("starts_with", "e"), '{"n": "e\u0301"}', True),
    (_leaf("contains", "\u0301"), '{"n": "e\u0301"}', True),
    (_leaf("gt", "z"), '{"n": "é"}', True),
    (_leaf("gt", "\uffff"), '{"n": "\U0001f600"}', True),
    (_leaf("in", ["a", "b"]), '{"n": "A"}', False),
    # nulls, missing keys, and keys that would index an array
    (_leaf("exists"), '{"n": null}', False),
    (_leaf("ne", 1), '{"n": null}', False),
    (_leaf("not_in", [1]), '{}', False),
    ({"not": _leaf("eq", 1)}, '{"n": null}', True),
    (_leaf("exists", field="$.a.1"), '{"a": [10, 20]}', False),
    (_leaf("eq", 20, "$.a.1"), '{"a": [10, 20]}', False),
    (_leaf("eq", 20, "$.a.-1"), '{"a": [10, 20]}', False),
    (_leaf("eq", 20, "$.a.1"), '{"a": {"1": 20}}', True),
]


def _rooted(condition: Any, root: str) -> Any:
    if isinstance(condition, dict):
        return {k: (root + v[1:] if k == "field" and v.startswith("$") else _rooted(v, root))
                for k, v in condition.items()}
    if isinstance(condition, list):
        return [_rooted(c, root) for c in condition]
    return condition


def _envelope_can_carry(data: dict[str, Any]) -> bool:
    """An envelope refuses data a float cannot hold (`1e400` parses as inf)."""
    try:
        json.dumps(data, allow_nan=False)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("condition", "document", "expected"), EDGE_CASES)
def test_edge_cases_agree(engine: Engine, condition: dict[str, Any], document: str,
                          expected: bool) -> None:
    person = {"id": uuid.uuid4(), "email": "u0@example.com", "stage": "Activation",
              "attributes": document, "created_at": NOW - dt.timedelta(days=3),
              "segments": {}, "events": []}
    in_sql, from_message, from_database = _evaluate(
        engine, _rooted(condition, "user.attributes"), [person], "x.a", {})
    answers = {"sql": bool(in_sql), "python (message)": bool(from_message),
               "python (stored)": bool(from_database)}
    assert answers == dict.fromkeys(answers, expected)
    event_data = json.loads(document)
    if _envelope_can_carry(event_data):
        person["attributes"] = "{}"
        in_sql, from_message, _ = _evaluate(engine, _rooted(condition, "event.data"), [person],
                                            "x.a", event_data)
        assert (bool(in_sql), bool(from_message)) == (expected, expected)


@pytest.mark.parametrize(("condition", "expected"), [
    ({"field": "user.created_at", "op": "eq", "value": "2026-11-19T12:00:00.25+00:00"}, True),
    ({"field": "user.created_at", "op": "eq", "value": "2026-11-19T13:00:00.25+01:00"}, True),
    ({"field": "user.created_at", "op": "eq", "value": "2026-11-19T12:00:00.25"}, True),
    ({"field": "user.created_at", "op": "gt", "value": "2026-11-19"}, True),
    ({"field": "user.created_at", "op": "lt", "value": "2026-11-20"}, True),
    ({"field": "user.created_at", "op": "ne", "value": "2026-11-19"}, True),
    ({"field": "user.created_at", "op": "within_last", "value": "3d"}, True),
    ({"field": "user.email", "op": "eq", "value": "ÉDITH@example.com"}, False),
    ({"field": "user.email", "op": "starts_with", "value": "édith"}, True),
    ({"field": "user.email", "op": "in", "value": ["e\u0301dith@example.com", 1, True]}, False),
    ({"field": "user.email", "op": "not_in", "value": ["édith@example.com", 1]}, False),
    ({"field": "user.stage", "op": "in", "value": ["Activation", "Revenue"]}, True),
])
def test_column_edge_cases_agree(engine: Engine, condition: dict[str, Any],
                                 expected: bool) -> None:
    person = {"id": uuid.uuid4(), "email": "édith@example.com", "stage": "Activation",
              "attributes": "{}", "created_at": dt.datetime(2026, 11, 19, 12, 0, 0, 250000,
                                                            tzinfo=dt.UTC),
              "segments": {}, "events": []}
    in_sql, from_message, from_database = _evaluate(engine, condition, [person], "x.a", {})
    assert (bool(in_sql), bool(from_message), bool(from_database)) == (expected,) * 3


def _big_in_lists() -> dict[str, Any]:
    """499 `in` lists of 1,000 values each (strings, numbers), under the node limit."""
    lists = [{"field": f"user.attributes.k{i % 7}", "op": "in",
              "value": [f"v{i}-{j}" for j in range(1000)] if i % 2 else
              [i * 1000 + j + 0.5 for j in range(1000)]} for i in range(499)]
    return {"any": lists}


def test_in_lists_go_to_sql_as_arrays_and_a_huge_segment_refreshes(engine: Engine) -> None:
    raw = _big_in_lists()
    statement = select(User.id).where(compile_sql(parse(raw, allow_event=False), now=NOW))
    # What reaches the server: keys and type names inline, shared constants once.
    compiled = statement.compile(dialect=postgresql.psycopg.dialect(),
                                 compile_kwargs={"render_postcompile": True})
    assert len(compiled.params) < 1000

    tag = uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        for email, attributes in [(f"s-{tag}@example.com", {"k3": "v3-999"}),
                                  (f"n-{tag}@example.com", {"k2": 2 * 1000 + 17.5}),
                                  (f"no-{tag}@example.com", {"k3": "v4-1", "k2": 2017})]:
            conn.execute(text("INSERT INTO users (email, current_lifecycle_stage, attributes) "
                              "VALUES (:e, 'Activation', CAST(:a AS jsonb))"),
                         {"e": email, "a": json.dumps(attributes)})
        segment = conn.execute(text(
            "INSERT INTO user_segments (name, conditions, ttl_seconds) "
            "VALUES (:n, CAST(:c AS jsonb), 600) RETURNING id"),
            {"n": f"huge-{tag}", "c": json.dumps(raw)}).scalar_one()
    with session_scope() as session:
        result = refresh_segment(session, segment)
    assert result is not None
    with engine.connect() as conn:
        members = set(conn.execute(text(
            "SELECT u.email FROM user_segment_memberships m JOIN users u ON u.id = m.user_id "
            "WHERE m.segment_id = :s"), {"s": segment}).scalars())
    assert members == {f"s-{tag}@example.com", f"n-{tag}@example.com"}


def test_timestamp_conditions_run_in_parallel_scans(engine: Engine) -> None:
    """A segment refresh over many users gets a parallel plan; reading a timestamp must not
    need what a parallel worker cannot do (a subtransaction per row)."""
    person = {"id": uuid.uuid4(), "email": "p@example.com", "stage": "Activation",
              "attributes": json.dumps({"t": "2026-11-22T10:00Z", "u": "2026-02-31"}),
              "created_at": NOW, "segments": {}, "events": []}
    condition = parse({"any": [{"field": "user.attributes.t", "op": "within_last", "value": "1d"},
                               {"field": "user.attributes.u", "op": "older_than", "value": "1d"}]})
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            _insert(conn, [person])
            version = conn.execute(text("SHOW server_version_num")).scalar_one()
            force = "debug_parallel_query" if int(version) >= 160000 else "force_parallel_mode"
            for setting in (force, "parallel_setup_cost", "parallel_tuple_cost",
                            "min_parallel_table_scan_size"):
                conn.execute(text("SELECT set_config(:s, :v, true)"),
                             {"s": setting, "v": "on" if setting == force else "0"})
            found = conn.execute(select(User.id).where(
                User.id == person["id"], compile_sql(condition, now=NOW))).scalars().all()
        finally:
            trans.rollback()
    assert found == [person["id"]]
