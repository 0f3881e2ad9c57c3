"""The condition language without servers: parsing, errors, Python evaluation."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from workers.rules.conditions import (
    MAX_COST,
    ConditionError,
    parse,
    parse_duration,
    parse_timestamp,
)
from workers.rules.python_backend import EvalContext, compile_python

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)


def ctx(data: dict[str, Any] | None = None, attributes: dict[str, Any] | None = None,
        members: set[str] = frozenset(), counts: dict[str, int] | None = None,  # type: ignore[assignment]
        created_at: dt.datetime | None = NOW - dt.timedelta(days=3)) -> EvalContext:
    return EvalContext(
        event_type="order.completed", event_data=data or {}, user_id=uuid.UUID(int=1),
        user_email="ada@example.com", user_stage="Activation", user_attributes=attributes or {},
        user_created_at=created_at, now=NOW, is_member=lambda ref: ref in members,
        count_events=lambda etype, within: (counts or {}).get(etype, 0),
    )


def check(condition: dict[str, Any], context: EvalContext) -> bool:
    return compile_python(parse(condition))(context)


@pytest.mark.parametrize(("condition", "path", "fragment"), [
    ({"all": [{"field": "event.data.x", "op": "eqq", "value": 1}]}, "/all/0/op", "unknown operator"),
    ({"any": "x"}, "/any", "list of conditions"),
    ({"field": "user.nickname", "op": "eq", "value": 1}, "/field", "unknown field"),
    ({"field": "event.data.x", "op": "in", "value": 3}, "/value", "needs a list"),
    ({"field": "event.data.x", "op": "gt", "value": True}, "/value", "not booleans"),
    ({"field": "event.data.x", "op": "eq"}, "/value", "needs a value"),
    ({"field": "event.data.x", "op": "exists", "value": 1}, "/value", "takes no value"),
    ({"field": "user.created_at", "op": "within_last", "value": "7 days"}, "/value", "duration"),
    ({"field": "user.created_at", "op": "gt", "value": "soon"}, "/value", "ISO-8601"),
    ({"field": "user.email", "op": "eq", "value": 3}, "/value", "string field"),
    ({"not": {"in_segment": ""}}, "/not/in_segment", "segment"),
    ({"performed": {"event_type": "a.b", "at_least": 0}}, "/performed/at_least", "integer"),
    ({"performed": {"event_type": "a.b", "within": "forever"}}, "/performed/within", "duration"),
    ({"field": "event.data.x", "op": "eq", "value": {"a": 1}}, "/value", "string, number or boolean"),
    ({"field": "event.data.x", "op": "eq", "value": 1, "extra": 2}, "/extra", "unexpected key"),
    ({"all": [{}], "any": []}, "/any", "unexpected key"),
    ({"foo": 1}, "/", "unknown condition keys"),
    ([1], "/", "expected an object"),
])
def test_invalid_conditions_point_at_the_offending_part(condition: Any, path: str,
                                                        fragment: str) -> None:
    with pytest.raises(ConditionError) as err:
        parse(condition)
    assert err.value.path == path
    assert fragment in str(err.value)
    assert str(err.value).startswith(f"invalid condition at {path}: ")


def test_bounds_reject_hostile_input() -> None:
    deep: dict[str, Any] = {}
    for _ in range(40):
        deep = {"not": deep}
    with pytest.raises(ConditionError, match="nested deeper"):
        parse(deep)
    with pytest.raises(ConditionError, match="more than 500"):
        parse({"any": [{"field": "event.data.x", "op": "exists"}] * 600})
    with pytest.raises(ConditionError, match="longer than"):
        parse({"field": "event.data.x", "op": "eq", "value": "x" * 5000})


def test_segments_may_not_read_the_event() -> None:
    with pytest.raises(ConditionError, match="event fields are not available"):
        parse({"field": "event.data.x", "op": "exists"}, allow_event=False)


def test_durations_and_timestamps() -> None:
    assert parse_duration("90m") == dt.timedelta(minutes=90)
    assert parse_duration("2w") == dt.timedelta(days=14)
    assert parse_timestamp("2026-01-02") == dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    assert parse_timestamp("2026-01-02T03:04:05.5+02:00") == dt.datetime(
        2026, 1, 2, 1, 4, 5, 500000, tzinfo=dt.UTC)
    assert parse_timestamp("2026-02-31") is None
    assert parse_timestamp("yesterday") is None
    assert parse_timestamp("2026-01-02T03:04+15:59") == dt.datetime(
        2026, 1, 1, 11, 5, tzinfo=dt.UTC)


@pytest.mark.parametrize("text", [
    "2026-11-22T24:00", "2026-11-22T24:00:00", "2026-12-31T23:59:60",  # PostgreSQL reads them
    "2026-11-22T10:00+16:00", "2026-11-22T10:00-20:00", "2026-11-22T10:00+05:75",  # Python does
    "2026-11-22\n", "２０２６-11-22", "2026-11-22T10:00:00.1234567", "0000-01-01",
])
def test_only_what_both_parsers_read_is_a_timestamp(text: str) -> None:
    assert parse_timestamp(text) is None


def _lists(sizes: list[int]) -> dict[str, Any]:
    return {"all": [{"field": "user.attributes.k", "op": "in", "value": list(range(n))}
                    for n in sizes]}


def test_the_cost_bound_counts_conditions_and_list_values() -> None:
    at_bound = [1000] * 9 + [989]  # 1 + 9 × (1 + 1000) + (1 + 989) = 10,000
    parse(_lists(at_bound), max_cost=MAX_COST)
    with pytest.raises(ConditionError) as err:
        parse(_lists([*at_bound[:-1], 990]), max_cost=MAX_COST)
    assert err.value.path == "/all/9/value"
    assert "costs more than 10,000 (conditions + list values" in str(err.value)
    with pytest.raises(ConditionError) as err:
        parse({"any": [{"field": "event.data.x", "op": "exists"}] * 400}, max_cost=300)
    assert err.value.path == "/any/299"
    # Stored definitions are parsed without the bound: an applied one keeps working.
    assert parse(_lists([1000] * 499))


@pytest.mark.parametrize(("value", "path"), [
    (10**400, "/value"), (2**1024 - 2**970, "/value"), (float("inf"), "/value"),
    ([1, -(10**309)], "/value/1"),
])
def test_numbers_a_double_cannot_hold_are_refused(value: Any, path: str) -> None:
    op = "in" if isinstance(value, list) else "eq"
    with pytest.raises(ConditionError, match="finite doubles") as err:
        parse({"field": "event.data.x", "op": op, "value": value})
    assert err.value.path == path
    assert parse({"field": "event.data.x", "op": "eq", "value": 2**1024 - 2**970 - 1})


@pytest.mark.parametrize("condition", [
    {"field": "user.attributes.a\n", "op": "exists"},
    {"field": "user.created_at", "op": "within_last", "value": "7d\n"},
    {"field": "user.created_at", "op": "within_last", "value": "７d"},
])
def test_keys_and_durations_are_matched_whole(condition: dict[str, Any]) -> None:
    with pytest.raises(ConditionError):
        parse(condition)


class _CountingStr(str):
    """A string that counts the equality tests made with it."""

    tests = 0

    def __eq__(self, other: object) -> bool:
        _CountingStr.tests += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_in_lists_are_set_lookups_whatever_their_size() -> None:
    predicate = compile_python(parse(
        {"any": [{"field": "event.data.x", "op": "in", "value": [f"v{i}-{j}" for j in range(1000)]}
                 for i in range(498)] + [
            {"field": "event.data.x", "op": "in", "value": [1.5, True, "1.5"]}]}))
    _CountingStr.tests = 0
    assert predicate(ctx(data={"x": _CountingStr("v497-999")}))
    assert _CountingStr.tests <= 1, "a scan of the lists, not one lookup per list"
    assert predicate(ctx(data={"x": 1.5})) and predicate(ctx(data={"x": True}))
    assert not predicate(ctx(data={"x": 1})) and not predicate(ctx(data={"x": "v498-0"}))
