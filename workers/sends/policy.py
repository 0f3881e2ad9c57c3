"""The send policy a worker applies: the program's messaging settings and each workflow's.

Loaded from `program_settings` and `workflows.settings` (written by `fleet apply`)
and cached per process like the triggers: a cheap fingerprint query at most every
`FLEET_TRIGGER_CACHE_SECONDS`, a reload only when it changed.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.orm import Session

from workers.log import get_logger
from workers.sends.config import MessagingDef, WorkflowSettings
from workers.sends.holdout import in_holdout
from workers.settings import get_settings

log = get_logger(__name__)

MESSAGING = "messaging"  # program_settings.name of the send policy
DEFAULT_SALT = "holdout"  # the workflow holdouts' salt when the program has no holdout

FINGERPRINT_SQL = text(
    "SELECT (SELECT coalesce(max(updated_at)::text, '') || count(*) FROM program_settings) "
    "|| '/' || (SELECT coalesce(max(updated_at)::text, '') || count(*) FROM workflows)")


@dataclass(frozen=True)
class WorkflowPolicy:
    id: uuid.UUID
    name: str
    settings: WorkflowSettings


@dataclass(frozen=True)
class SendPolicy:
    messaging: MessagingDef = field(default_factory=MessagingDef)
    workflows: Mapping[uuid.UUID, WorkflowPolicy] = field(default_factory=dict)

    def workflow(self, workflow_id: uuid.UUID) -> WorkflowPolicy | None:
        return self.workflows.get(workflow_id)

    def workflow_salt(self, name: str) -> str:
        """The salt of a workflow's own holdout: the program's, then the workflow's name."""
        holdout = self.messaging.holdout
        return f"{holdout.salt if holdout else DEFAULT_SALT}:{name}"

    def held_out(self, workflow: WorkflowPolicy | None, user_id: uuid.UUID) -> bool:
        """In the program's control group, or in this workflow's: a pure, sticky hash.

        The same rule is written in SQL for the nightly conversion metrics
        (workers/reports/metrics.py); the two must agree.
        """
        program = self.messaging.holdout
        if program is not None and in_holdout(program.salt, user_id, program.percent):
            return True
        return (workflow is not None and workflow.settings.holdout > 0
                and in_holdout(self.workflow_salt(workflow.name), user_id,
                               workflow.settings.holdout))


class PolicyCache:
    """Per-process cache of the send policy."""

    def __init__(self, refresh_seconds: float | None = None) -> None:
        self.refresh_seconds = (get_settings().trigger_cache_seconds if refresh_seconds is None
                                else refresh_seconds)
        self._fingerprint: str | None = None
        self._checked = -math.inf
        self._policy = SendPolicy()

    def get(self, session: Session) -> SendPolicy:
        if time.monotonic() - self._checked < self.refresh_seconds:
            return self._policy
        fingerprint = session.execute(FINGERPRINT_SQL).scalar_one()
        if fingerprint != self._fingerprint:
            self._policy = load(session)
            self._fingerprint = fingerprint
        self._checked = time.monotonic()
        return self._policy

    def clear(self) -> None:
        self._checked, self._fingerprint = -math.inf, None


def load(session: Session) -> SendPolicy:
    """The stored policy; a stored value the models refuse is logged and left at its default.

    `fleet apply` validates before writing, so that only happens to rows written
    around it; it must not stop every send.
    """
    raw = session.execute(text("SELECT value FROM program_settings WHERE name = :n"),
                          {"n": MESSAGING}).scalar_one_or_none()
    try:
        messaging = MessagingDef.model_validate(raw or {})
    except ValidationError as exc:
        log.error("policy.invalid", setting=MESSAGING, error=str(exc))
        messaging = MessagingDef()
    workflows: dict[uuid.UUID, WorkflowPolicy] = {}
    for row in session.execute(text("SELECT id, name, settings FROM workflows")):
        try:
            settings = WorkflowSettings.model_validate(row.settings or {})
        except ValidationError as exc:
            log.error("policy.invalid", workflow=row.name, error=str(exc))
            settings = WorkflowSettings()
        workflows[row.id] = WorkflowPolicy(row.id, row.name, settings)
    return SendPolicy(messaging, workflows)


POLICIES = PolicyCache()
