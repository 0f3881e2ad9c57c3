"""What a chaos run or a soak puts through the fleet: one journey workflow and an event stream.

The journey has every kind of work the invariants look at: an operator that writes
(`send_message` → `message_log`), a message wait with a timer boundary (woken by
ingest or by the beat's timer sweep), a stage change and a webhook to the run's own
receiver. Each user signs up once (`max_runs_per_user: 1`), half of them activate
2.5 s later, and page views fill the stream; a few deliberately bad envelopes ride
along in batches and must end in `dead_letters`.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from workers.definitions import Definitions, TriggerDef, WorkflowDef, WorkflowSource, apply

JOURNEY = "chaos-journey"
TRIGGER = "chaos-on-signup"
SIGNED_UP = "chaos.signed_up"
ACTIVATED = "chaos.activated"
VIEWED = "chaos.page_viewed"
ACTIVATION_DELAY = 2.5  # seconds after the signup (the journey waits WAIT_SECONDS for it)
WAIT_SECONDS = 6
# Per execution: one message, one webhook effect, one stage change when activated.
JOURNEY_BPMN = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
                  xmlns:spiffworkflow="http://spiffworkflow.org/bpmn/schema/1.0/core"
                  id="chaos-journey-definitions" targetNamespace="http://lifecycle-fleet/chaos">
  <bpmn:process id="chaos_journey" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="welcome"/>
    <bpmn:serviceTask id="welcome">
      <bpmn:extensionElements>
        <spiffworkflow:serviceTaskOperator id="send_message" resultVariable="mailed">
          <spiffworkflow:parameters>
            <spiffworkflow:parameter id="channel" type="str" value="&quot;email&quot;"/>
            <spiffworkflow:parameter id="subject" type="str" value="&quot;Welcome&quot;"/>
            <spiffworkflow:parameter id="body" type="str" value="&quot;Hello&quot;"/>
          </spiffworkflow:parameters>
        </spiffworkflow:serviceTaskOperator>
      </bpmn:extensionElements>
      <bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:sequenceFlow id="f2" sourceRef="welcome" targetRef="wait_activation"/>
    <bpmn:receiveTask id="wait_activation" messageRef="activated">
      <bpmn:incoming>f2</bpmn:incoming><bpmn:outgoing>f3</bpmn:outgoing>
    </bpmn:receiveTask>
    <bpmn:boundaryEvent id="timeout" attachedToRef="wait_activation" cancelActivity="true">
      <bpmn:outgoing>f4</bpmn:outgoing>
      <bpmn:timerEventDefinition><bpmn:timeDuration>"PT{wait}S"</bpmn:timeDuration></bpmn:timerEventDefinition>
    </bpmn:boundaryEvent>
    <bpmn:sequenceFlow id="f3" sourceRef="wait_activation" targetRef="promote"/>
    <bpmn:serviceTask id="promote">
      <bpmn:extensionElements>
        <spiffworkflow:serviceTaskOperator id="set_lifecycle_stage" resultVariable="promoted">
          <spiffworkflow:parameters>
            <spiffworkflow:parameter id="stage" type="str" value="&quot;Activation&quot;"/>
          </spiffworkflow:parameters>
        </spiffworkflow:serviceTaskOperator>
      </bpmn:extensionElements>
      <bpmn:incoming>f3</bpmn:incoming><bpmn:outgoing>f5</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:sequenceFlow id="f5" sourceRef="promote" targetRef="notify"/>
    <bpmn:sequenceFlow id="f4" sourceRef="timeout" targetRef="notify"/>
    <bpmn:serviceTask id="notify">
      <bpmn:extensionElements>
        <spiffworkflow:serviceTaskOperator id="send_webhook" resultVariable="hooked">
          <spiffworkflow:parameters>
            <spiffworkflow:parameter id="url" type="str" value={url}/>
            <spiffworkflow:parameter id="payload" type="dict" value="{{&quot;user&quot;: user[&quot;id&quot;], &quot;version&quot;: &quot;{version}&quot;}}"/>
          </spiffworkflow:parameters>
        </spiffworkflow:serviceTaskOperator>
      </bpmn:extensionElements>
      <bpmn:incoming>f4</bpmn:incoming><bpmn:incoming>f5</bpmn:incoming>
      <bpmn:outgoing>f6</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:sequenceFlow id="f6" sourceRef="notify" targetRef="end"/>
    <bpmn:endEvent id="end"><bpmn:incoming>f6</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
  <bpmn:message id="activated" name="chaos.activated"/>
</bpmn:definitions>
"""


VERSIONED = "chaos-versioned"
ENROLLED = "chaos.enrolled"
# Waits on a timer, then records which definition ran it: the version-deploy scenario.
VERSIONED_BPMN = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
                  id="chaos-versioned-definitions" targetNamespace="http://lifecycle-fleet/chaos">
  <bpmn:process id="chaos_versioned" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="wait"/>
    <bpmn:intermediateCatchEvent id="wait"><bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
      <bpmn:timerEventDefinition><bpmn:timeDuration>"PT{wait}S"</bpmn:timeDuration></bpmn:timerEventDefinition>
    </bpmn:intermediateCatchEvent>
    <bpmn:sequenceFlow id="f2" sourceRef="wait" targetRef="mark"/>
    <bpmn:scriptTask id="mark"><bpmn:incoming>f2</bpmn:incoming><bpmn:outgoing>f3</bpmn:outgoing>
      <bpmn:script>ran = "{version}"</bpmn:script></bpmn:scriptTask>
    <bpmn:sequenceFlow id="f3" sourceRef="mark" targetRef="end"/>
    <bpmn:endEvent id="end"><bpmn:incoming>f3</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>
"""


def versioned_xml(version: str, wait_seconds: int) -> str:
    return VERSIONED_BPMN.format(version=version, wait=wait_seconds)


def journey_xml(webhook_url: str, wait_seconds: int = WAIT_SECONDS, version: str = "v1") -> str:
    """The journey BPMN calling `webhook_url`; its webhook payload names `version`."""
    return JOURNEY_BPMN.format(url=quoteattr(f'"{webhook_url}"'), wait=wait_seconds,
                               version=version)


def apply_program(engine: Engine, webhook_url: str, wait_seconds: int = WAIT_SECONDS,
                  versioned_wait: int = 60) -> None:
    """Both workflows and their triggers, applied as `fleet apply` would."""
    doc = Definitions(
        workflows=[WorkflowDef(name=JOURNEY, file=Path("chaos-journey.bpmn")),
                   WorkflowDef(name=VERSIONED, file=Path("chaos-versioned.bpmn"))],
        triggers=[TriggerDef(name=TRIGGER, event_type=SIGNED_UP, workflow=JOURNEY,
                             max_runs_per_user=1),
                  TriggerDef(name=f"{VERSIONED}-on-enrol", event_type=ENROLLED,
                             workflow=VERSIONED, max_runs_per_user=1)],
    )
    with Session(engine) as session, session.begin():
        apply(session, doc, {JOURNEY: WorkflowSource(journey_xml(webhook_url, wait_seconds)),
                             VERSIONED: WorkflowSource(versioned_xml("v1", versioned_wait))})


@dataclass
class SentLog:
    """What the run handed to the broker: the invariants compare the database with it."""

    good: list[str] = field(default_factory=list)  # event ids of valid envelopes
    bad: list[str] = field(default_factory=list)  # event ids of deliberately bad envelopes
    signups: int = 0  # journeys started (one per signup)

    @property
    def sent(self) -> int:
        return len(self.good) + len(self.bad)


# Envelopes the workers must dead-letter: each keeps an event_id so it can be counted.
BAD_KINDS: tuple[dict[str, Any], ...] = (
    {"event_type": "Not A Valid Type!", "user": "bad@example.com"},
    {"event_type": "chaos.bad", "user": "bad@example.com", "data": ["not", "an", "object"]},
    {"event_type": "chaos.bad", "user": "not-an-email-nor-uuid"},
    {"event_type": "chaos.bad", "user": "bad@example.com", "occurred_at": "yesterday-ish"},
    {"event_type": "chaos.bad", "user": "'; DROP TABLE users; --\x00\x07@example.com"},
)


class EventStream:
    """An endless, seeded stream of envelopes for `users` users: signups, activations, views."""

    def __init__(self, run: str, users: int, seed: int = 7, bad_every: int = 50,
                 signup_share: float = 0.4) -> None:
        self.run = run
        self.users = users
        self.signup_share = signup_share
        self.rng = random.Random(seed)
        self.bad_every = bad_every
        self.next_user = 0
        self.count = 0
        self.pending_activations: list[tuple[float, str]] = []

    def _user(self, n: int) -> str:
        return f"chaos-{self.run}-{n}@example.com"

    def _event(self, event_type: str, user: str, **data: Any) -> dict[str, Any]:
        return {"event_id": str(uuid.uuid4()), "event_type": event_type, "user": user,
                "data": {"run": self.run, **data}}

    def __iter__(self) -> Iterator[tuple[dict[str, Any], bool]]:
        """(envelope, is_good) pairs, forever."""
        while True:
            self.count += 1
            if self.count % self.bad_every == 0:
                kind = BAD_KINDS[(self.count // self.bad_every) % len(BAD_KINDS)]
                yield {"event_id": str(uuid.uuid4()), **kind}, False
            elif self.pending_activations and self.pending_activations[0][0] <= time.monotonic():
                # Late enough for the journey to be waiting for it on a busy machine.
                yield self._event(ACTIVATED, self.pending_activations.pop(0)[1]), True
            elif self.next_user < self.users and self.rng.random() < self.signup_share:
                user = self._user(self.next_user)
                self.next_user += 1
                if self.rng.random() < 0.5:
                    self.pending_activations.append((time.monotonic() + ACTIVATION_DELAY, user))
                yield self._event(SIGNED_UP, user, plan="free"), True
            else:
                user = self._user(self.rng.randrange(max(1, self.next_user)))
                yield self._event(VIEWED, user, page=self.rng.choice(("home", "pricing", "docs")),
                                  sent_at=0.0), True
