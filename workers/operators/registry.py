"""Every operator a service task may name. A new operator is a function added here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from workers.operators import events, messages, segments, split, split_hash, users, webhooks
from workers.operators.context import Operator

OPERATORS: Mapping[str, Operator] = MappingProxyType({
    "set_lifecycle_stage": users.set_lifecycle_stage,
    "update_user_attributes": users.update_user_attributes,
    "emit_event": events.emit_event,
    "add_to_segment": segments.add_to_segment,
    "remove_from_segment": segments.remove_from_segment,
    "send_message": messages.send_message,
    "send_webhook": webhooks.send_webhook,
    "split": split.split,
})


# Deploy-time checks of an operator's parameters (its service task's `operation_params`):
# a ValueError refuses the workflow. Operators without one are checked when they run.
PARAM_CHECKS: Mapping[str, Callable[[Mapping[str, object]], None]] = MappingProxyType({
    "split": split_hash.check_declaration,
})


def operator_names() -> frozenset[str]:
    return frozenset(OPERATORS)
