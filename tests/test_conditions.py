"""The condition language without servers: parsing, errors, Python evaluation."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from workers.rules.conditions import ConditionError, parse, parse_duration, parse_timestamp
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


@pytest.mark.parametrize(("condition", "expected"), [
    ({}, True),
    ({"all": []}, True),
    ({"any": []}, False),
    ({"field": "event.data.plan", "op": "eq", "value": "pro"}, True),
    ({"field": "event.data.plan", "op": "ne", "value": "free"}, True),
    ({"field": "event.data.missing", "op": "ne", "value": "free"}, False),
    ({"not": {"field": "event.data.missing", "op": "eq", "value": "free"}}, True),
    ({"field": "event.data.amount", "op": "gt", "value": 99.5}, True),
    ({"field": "event.data.amount", "op": "gt", "value": "99"}, False),  # number vs string
    ({"field": "event.data.amount", "op": "eq", "value": 100.0}, True),
    ({"field": "event.data.flag", "op": "eq", "value": 1}, False),  # boolean is not a number
    ({"field": "event.data.flag", "op": "eq", "value": True}, True),
    ({"field": "event.data.tags", "op": "contains", "value": "vip"}, True),
    ({"field": "event.data.plan", "op": "contains", "value": "r"}, True),
    ({"field": "event.data.plan", "op": "starts_with", "value": "pr"}, True),
    ({"field": "event.data.plan", "op": "in", "value": ["free", "pro"]}, True),
    ({"field": "event.data.plan", "op": "not_in", "value": ["free"]}, True),
    ({"field": "event.data.nested.level", "op": "gte", "value": 2}, True),
    ({"field": "event.data.nil", "op": "exists"}, False),
    ({"field": "event.data.when", "op": "within_last", "value": "2d"}, True),
    ({"field": "event.data.when", "op": "older_than", "value": "2d"}, False),
    ({"field": "user.created_at", "op": "older_than", "value": "2d"}, True),
    ({"field": "user.created_at", "op": "lt", "value": "2026-11-20T00:00:00Z"}, True),
    ({"field": "user.stage", "op": "eq", "value": "Activation"}, True),
    ({"field": "user.email", "op": "starts_with", "value": "ada@"}, True),
    ({"field": "user.attributes.country", "op": "eq", "value": "NZ"}, True),
    ({"field": "event.type", "op": "eq", "value": "order.completed"}, True),
    ({"in_segment": "vip"}, True),
    ({"in_segment": "churned"}, False),
    ({"performed": {"event_type": "order.completed", "at_least": 3, "within": "30d"}}, True),
    ({"performed": {"event_type": "order.completed", "at_least": 4}}, False),
    ({"any": [{"in_segment": "churned"}, {"not": {"in_segment": "vip"}}]}, False),
])
def test_python_evaluation(condition: dict[str, Any], expected: bool) -> None:
    context = ctx(
        data={"plan": "pro", "amount": 100, "flag": True, "tags": ["vip", "beta"], "nil": None,
              "nested": {"level": 2}, "when": (NOW - dt.timedelta(days=1)).isoformat()},
        attributes={"country": "NZ"}, members={"vip"}, counts={"order.completed": 3},
    )
    assert check(condition, context) is expected
