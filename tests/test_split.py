"""The A/B split's pure rule (workers/operators/split_hash.py): stickiness, weights over
10,000 users, declared order, validation messages. No servers."""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from workers.engine.bpmn import parse_bpmn
from workers.engine.validate import validate_bpmn
from workers.operators.registry import OPERATORS, operator_names
from workers.operators.split_hash import (
    SplitError,
    assign,
    check_declaration,
    declared_names,
    parse_variants,
    split_bucket,
)
from workers.sends.holdout import BUCKETS

BPMN = Path(__file__).parent / "bpmn"
NAMESPACE = uuid.UUID("0c1f3a52-6a43-4b0e-9d55-7d1b1f1f0a01")
# Fixed user ids: the counts below are the same on every run and machine.
USERS = [uuid.uuid5(NAMESPACE, f"user-{i}") for i in range(10_000)]


def test_the_bucket_is_md5_of_workflow_node_and_user_as_the_holdout_reads_it() -> None:
    user = USERS[0]
    digest = hashlib.md5(f"split:welcome:ab:{user}".encode(), usedforsecurity=False).hexdigest()
    assert split_bucket(user, "welcome", "ab") == int(digest[:8], 16) % BUCKETS
    assert split_bucket(str(user).upper(), "welcome", "ab") == split_bucket(user, "welcome", "ab")


def test_the_same_user_gets_the_same_branch_every_time() -> None:
    variants = {"control": 1, "treatment": 1}
    first = [assign(u, "welcome", "ab", variants) for u in USERS[:500]]
    again = [assign(str(u), "welcome", "ab", dict(variants)) for u in USERS[:500]]
    assert first == again
    assert set(first) == {"control", "treatment"}


def test_other_splits_draw_independent_groups() -> None:
    """Another node or workflow reshuffles: about half the users land elsewhere."""
    variants = {"a": 1, "b": 1}
    base = [assign(u, "welcome", "ab", variants) for u in USERS[:2000]]
    for workflow, node in (("welcome", "ab2"), ("winback", "ab")):
        other = [assign(u, workflow, node, variants) for u in USERS[:2000]]
        same = sum(x == y for x, y in zip(base, other, strict=True))
        assert abs(same - 1000) < 4 * math.sqrt(2000 * 0.25), same


@pytest.mark.parametrize("variants", [
    {"control": 1, "treatment": 1},
    {"control": 10, "b": 30, "c": 60},
    {"small": 0.05, "rest": 0.95},
    {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1},
])
def test_shares_over_10000_users_are_the_weights_within_4_standard_deviations(
        variants: dict[str, float]) -> None:
    counts = Counter(assign(u, "welcome", "ab", variants) for u in USERS)
    total = sum(variants.values())
    n = len(USERS)
    for name, weight in variants.items():
        p = weight / total
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[name] - n * p) <= 4 * sd, (name, counts[name], n * p, sd)
    assert sum(counts.values()) == n


def test_buckets_are_dealt_by_cumulative_weight_in_the_declared_order() -> None:
    forward = parse_variants({"control": 1, "treatment": 3})
    assert [forward.choose(b) for b in (0, 2499, 2500, 9999)] == \
        ["control", "control", "treatment", "treatment"]
    backward = parse_variants({"treatment": 3, "control": 1})
    assert [backward.choose(b) for b in (0, 7499, 7500, 9999)] == \
        ["treatment", "treatment", "control", "control"]
    thirds = parse_variants({"a": 1, "b": 1, "c": 1})  # 3333.33.. and 6666.66..: exact
    assert [thirds.choose(b) for b in (3333, 3334, 6666, 6667)] == ["a", "b", "b", "c"]
    floats = parse_variants({"a": 0.1, "b": 0.2, "c": 0.7})  # 1000 and 3000, no float drift
    assert [floats.choose(b) for b in (999, 1000, 2999, 3000)] == ["a", "b", "b", "c"]
    with pytest.raises(ValueError, match="bucket"):
        forward.choose(BUCKETS)


@pytest.mark.parametrize(("value", "message"), [
    (["control", "treatment"], "must be a mapping of branch name to weight"),
    ({"only": 1}, "needs 2 to 100 branches, got 1 ('only')"),
    ({}, "needs 2 to 100 branches, got 0"),
    ({f"v{i}": 1 for i in range(101)}, "got 101"),
    ({"control": 1, "my-branch": 1}, "variant name 'my-branch' is not an identifier"),
    ({"control": 1, "2nd": 1}, "variant name '2nd' is not an identifier"),
    ({"control": 1, "x" * 65: 1}, "is not an identifier"),
    ({"control": 1, "b": 0}, "weight of variant 'b' must be a positive number, got 0"),
    ({"control": 1, "b": -2}, "weight of variant 'b' must be a positive number, got -2"),
    ({"control": 1, "b": "50"}, "weight of variant 'b' must be a positive number, got '50' (str)"),
    ({"control": 1, "b": True}, "got True (bool)"),
    ({"control": 1, "b": None}, "got None (NoneType)"),
    ({"control": 1, "b": math.inf}, "got inf"),
    ({"control": 1, "b": math.nan}, "got nan"),
    ({"control": 1, "b": 100_000}, "weight of variant 'control' is 0.0010% of the total: each "
                                    "variant needs at least one bucket in 10,000"),
])
def test_invalid_variants_are_refused_with_what_is_wrong(value: Any, message: str) -> None:
    with pytest.raises(SplitError) as raised:
        parse_variants(value)
    assert message in str(raised.value)
    with pytest.raises(SplitError):
        assign(USERS[0], "welcome", "ab", value)


def test_one_bucket_in_10000_is_enough() -> None:
    variants = parse_variants({"rare": 1, "common": 9999})
    assert [variants.choose(b) for b in (0, 1)] == ["rare", "common"]
    assert variants.shares() == {"rare": 0.0001, "common": 0.9999}


def test_declared_names_read_the_order_written() -> None:
    assert declared_names('{"treatment": 1, "control": 2}') == ("treatment", "control")
    assert declared_names(' {"b": 1,\n "a": 1} ') == ("b", "a")
    assert declared_names("variants") is None
    assert declared_names('{**base, "a": 1}') is None
    assert declared_names("{name: 1}") is None
    assert declared_names("{") is None


def test_the_deploy_check_validates_a_literal_and_leaves_expressions_to_run_time() -> None:
    check_declaration({"variants": {"value": '{"control": 1, "treatment": 1}', "type": "dict"}})
    check_declaration({"variants": "weights_from_a_script"})  # checked when it runs
    with pytest.raises(SplitError, match="parameter 'variants' is required"):
        check_declaration({})
    with pytest.raises(SplitError, match="parameter 'variants': variants needs 2 to 100"):
        check_declaration({"variants": {"value": '{"control": 1}', "type": "dict"}})
    with pytest.raises(SplitError, match="parameter 'variants': weight of variant 'b' must"):
        check_declaration({"variants": '{"a": 1, "b": -1}'})


def test_the_test_bpmn_deploys_and_its_declaration_is_what_the_check_reads() -> None:
    xml = (BPMN / "ab_split.bpmn").read_text()
    assert "split" in operator_names() and OPERATORS["split"].__name__ == "split"
    validate_bpmn(xml, operator_names())
    (spec,) = [s for s in parse_bpmn(xml).spec.task_specs.values()
               if getattr(s, "bpmn_id", None) == "ab"]
    check_declaration(spec.operation_params)
    assert declared_names(spec.operation_params["variants"]["value"]) == ("treatment", "control")
    bad = xml.replace("&quot;control&quot;: 1", "&quot;control&quot;: 0")
    (spec,) = [s for s in parse_bpmn(bad).spec.task_specs.values()
               if getattr(s, "bpmn_id", None) == "ab"]
    with pytest.raises(SplitError, match="weight of variant 'control' must be a positive number"):
        check_declaration(spec.operation_params)


def test_fleet_apply_refuses_a_split_with_bad_variants_naming_the_element() -> None:
    """`fleet apply` runs the operators' parameter checks at deploy (workers/definitions.py)."""
    from workers.definitions import OPERATORS, PARAM_CHECKS
    from workers.engine.bpmn import BpmnError
    from workers.engine.validate import validate_bpmn

    good = (BPMN / "ab_split.bpmn").read_text()
    validate_bpmn(good, OPERATORS, param_checks=PARAM_CHECKS)
    written = 'value="{&quot;treatment&quot;: 1, &quot;control&quot;: 1}"'
    assert written in good
    bad = good.replace(written, 'value="{&quot;only&quot;: 1}"')
    node = "ab"
    with pytest.raises(BpmnError, match=f"element {node}: operator split: parameter 'variants'"):
        validate_bpmn(bad, OPERATORS, param_checks=PARAM_CHECKS)
