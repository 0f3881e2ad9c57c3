"""What an event type looks like: one rule for the envelope and for BPMN message names.

A message catch waits for an event whose type is the message's name, so a name no
envelope could carry would make the execution wait forever; deploy refuses it.
"""

from __future__ import annotations

import re

EVENT_TYPE_PATTERN = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
MAX_EVENT_TYPE_LENGTH = 100  # lifecycle_events.event_type, triggers.event_type
EVENT_TYPE_RULE = "1-100 characters of lowercase dotted words, like `order.completed`"


def is_event_type(value: str) -> bool:
    return 1 <= len(value) <= MAX_EVENT_TYPE_LENGTH and EVENT_TYPE_PATTERN.fullmatch(value) is not None

# The fleet's own events: a user's membership of a segment changed (workers/rules/transitions.py).
SEGMENT_ENTERED = "segment.entered"
SEGMENT_EXITED = "segment.exited"
